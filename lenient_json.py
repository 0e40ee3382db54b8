"""JSON as models write it: strict where it is JSON, repaired where it is almost JSON.

Models asked for JSON (a tool call's body, a structured-output answer) make small faults. They are
repaired here without third-party code: trailing commas, missing closing brackets/braces
(mismatched ones too), single quotes, Python literals (`True`, `None`), raw newlines in strings,
an unclosed string at the end. `NaN` and `Infinity` are refused: they are not JSON and a client's
parser would choke on them. Separate from the tool-call parser because structured output reads
answers with it too.
"""

import json


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(strict=False, parse_constant=_no_constants)
_CLOSER = {"{": "}", "[": "]"}
_LITERALS = {"True": "true", "False": "false", "None": "null", "true": "true", "false": "false", "null": "null"}


def loads(text):
    """`text` as one JSON value (raw newlines in strings allowed); ValueError otherwise."""
    text = text.strip()
    try:
        value, end = _DECODER.raw_decode(text)
    except RecursionError:
        raise ValueError("too deeply nested") from None
    if end != len(text):
        raise ValueError("extra data")
    return value


def _repair(text, close_string=True):
    """Rewrite almost-JSON into JSON and parse it: single quotes, Python literals, trailing commas,
    mismatched or missing closing brackets, an unclosed string at the end (unless `close_string`
    is false: then a cut-off string is a ValueError)."""
    out, stack = [], []
    i, n = 0, len(text)

    def drop_comma():
        j = len(out)
        while j and out[j - 1].isspace():
            j -= 1
        if j and out[j - 1] == ",":
            del out[j - 1]

    while i < n:
        ch = text[i]
        if ch in "\"'":
            quote = ch
            out.append('"')
            i += 1
            closed = False
            while i < n:
                c = text[i]
                if c == "\\":
                    if i + 1 >= n:
                        i += 1
                        break
                    nxt = text[i + 1]
                    out.append("'" if (nxt == "'" and quote == "'") else "\\" + nxt)
                    i += 2
                    continue
                if c == quote:
                    closed = True
                    i += 1
                    break
                out.append('\\"' if c == '"' else c)
                i += 1
            if not closed:
                if not close_string:
                    raise ValueError("unterminated string")
            out.append('"')
            continue
        if ch in "{[":
            stack.append(ch)
            out.append(ch)
        elif ch in "}]":
            opener = "{" if ch == "}" else "["
            if opener in stack:
                while stack[-1] != opener:
                    drop_comma()
                    out.append(_CLOSER[stack.pop()])
                drop_comma()
                stack.pop()
                out.append(ch)
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(_LITERALS.get(text[i:j], text[i:j]))
            i = j
            continue
        else:
            out.append(ch)
        i += 1
    drop_comma()
    tail = "".join(out).rstrip()
    if tail.endswith(":"):
        out.append("null")
    while stack:
        drop_comma()
        out.append(_CLOSER[stack.pop()])
    return loads("".join(out))


def parse(text):
    """`text` as one JSON value, repaired if need be; ValueError when even repair cannot make it one."""
    try:
        return loads(text)
    except ValueError:
        pass
    try:
        return _repair(text)
    except RecursionError:
        raise ValueError("too deeply nested") from None


def leading_value(text):
    """The JSON object or array `text` starts with (anything after it ignored), repaired of small
    faults if need be; None when it does not start with one."""
    text = text.strip()
    if text[:1] not in ("{", "["):
        return None
    try:
        return _DECODER.raw_decode(text)[0]
    except (ValueError, RecursionError):
        pass
    try:
        return _repair(text)
    except (ValueError, RecursionError):
        return None


_SEPARATORS = " \t\r\n,;"
_JUNK = set(" \t\r\n,;}])`")


def values(text, closed):
    """The JSON values in a body, in order, and the unparsed rest. A closed body (its end tag or
    fence arrived) gets every repair; an unclosed one (the answer ended) only gets its brackets
    closed, and leaves trailing non-JSON text as the rest: an unclosed string there means the
    answer was cut off, and a truncated value must not pass for a whole one."""
    found = []
    i = after = 0
    n = len(text)
    while True:
        while i < n and text[i] in _SEPARATORS:
            i += 1
        if i >= n:
            return found, ""
        if text[i] not in "{[":
            break
        try:
            value, i = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError):
            break
        found.append(value)
        after = i
    tail = text[i:]
    if found and set(tail) <= _JUNK:
        return found, ""
    if closed or not found or tail[:1] in ("{", "["):
        try:
            found.append(_repair(tail, close_string=closed))
            return found, ""
        except (ValueError, RecursionError):
            if found and tail[:1] in ("{", "["):
                return found, ""  # a further call cut off by the end of the answer: not text
    return found, (text[after:] if found else tail)
