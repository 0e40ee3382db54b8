"""What calls an envelope's body holds: the shapes of a tool call the parser accepts.

The parser (tool_calls.py) finds envelopes in the answer; this module reads one body. The form
asked for is `{"name": ..., "arguments": {...}}` (tool_prompt.py). Also accepted, because real
models answer that way whatever the prompt says: `<tool_calls>` holding a call or a list;
`parameters`/`args`/`input` for `arguments`; `arguments` as a JSON string; HAN's
`{"tool_calls": [{"function": {...}}]}`; OpenAI's `{"type": "function", "function": {...}}`; a
fenced block (```` ```json ````) inside the envelope; `<tool_call>` blocks inside a fence; a name
with a `functions.` prefix or in another case. A call must name an offered tool and contain only
call keys (`name`, arguments, `id`, `type`, `function`), so a tool *definition* or arbitrary JSON
shown to the user is never taken for a call. JSON faults are repaired (lenient_json.py) and
arguments fitted to the tool's schema (tool_schema.py).
"""

import re

import lenient_json
from tool_schema import fit_arguments


_ARG_KEYS = ("arguments", "parameters", "args", "input")
_CALL_KEYS = frozenset(("name", "id", "type", "call_id", "index") + _ARG_KEYS)
_WRAPPER_KEYS = frozenset(("id", "type", "function", "call_id", "index"))


def _call_items(values):
    items = []
    for value in values:
        if isinstance(value, list):
            items.extend(value)
        elif isinstance(value, dict) and isinstance(value.get("tool_calls"), list) \
                and set(value) <= {"tool_calls", "content", "role"}:
            items.extend(value["tool_calls"])
        elif isinstance(value, dict) and isinstance(value.get("function_call"), dict) \
                and set(value) <= {"function_call", "content", "role"}:
            items.append(value["function_call"])
        else:
            items.append(value)
    return items


def _unpack_call(item):
    """(name, raw arguments) of one call object, or None if it is not shaped like a call."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict) and "name" not in item:
        if not set(item) <= _WRAPPER_KEYS:
            return None
        item = item["function"]
    if not set(item) <= _CALL_KEYS:
        return None
    name = item.get("name")
    if not isinstance(name, str):
        return None
    raw = next((item[key] for key in _ARG_KEYS if key in item), None)
    return name, raw


_OPEN_OR_CLOSE = re.compile(r"<tool_calls?(?:\s[^<>]*)?>|</tool_calls?\s{0,3}>", re.I)


def _tag_bodies(text):
    """The bodies of `<tool_call>` blocks making up all of `text` (a fence holding them),
    or None if there is other text around them."""
    bodies, pos, current = [], 0, None
    for m in _OPEN_OR_CLOSE.finditer(text):
        between = text[pos:m.start()]
        if current is None:
            if between.strip():
                return None
        else:
            bodies.append(between)
            current = None
        if not m.group().startswith("</"):
            current = m.end()
        elif current is None and not bodies:
            return None
        pos = m.end()
    if current is not None:
        bodies.append(text[current:])
    elif text[pos:].strip():
        return None
    return bodies or None


_INNER_FENCE = re.compile(r"\A\s*```[^\n]*\n(.*?)(?:\n\s*```\s*)?\Z", re.S)



def calls_in(body, request, closed):
    """([(tool name, arguments object)], rest) if the body is made of calls to tools `request`
    offers, else (None, ""). A `closed` body's envelope was closed by its tag or fence; an unclosed
    one (the answer ended) may leave a rest of text after its calls."""
    fenced = _INNER_FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if body.lstrip().startswith("<"):
        bodies = _tag_bodies(body)
        if bodies is None:
            return None, ""
        calls = []
        for inner in bodies:
            found, _ = calls_in(inner, request, True)
            if found is None:
                return None, ""
            calls.extend(found)
        return calls, ""
    values, rest = lenient_json.values(body, closed)
    if not values or (closed and rest.strip()):
        return None, ""
    calls = []
    for item in _call_items(values):
        unpacked = _unpack_call(item)
        if unpacked is None:
            return None, ""
        spec = _offered(request, unpacked[0])
        if spec is None:
            return None, ""
        arguments = fit_arguments(unpacked[1], spec.parameters)
        if arguments is None:
            return None, ""
        calls.append((spec.name, arguments))
    return (calls or None), rest


def _offered(request, name):
    """The offered tool a call names, also when the model prefixed or re-cased the name."""
    name = name.strip()
    spec = request.tool(name)
    if spec is None:
        for prefix in ("functions.", "tools.", "functions:", "tool:"):
            if name.startswith(prefix):
                spec = request.tool(name[len(prefix):])
                break
    if spec is None:
        folded = [s for s in request.tools if s.name.lower() == name.lower()]
        spec = folded[0] if len(folded) == 1 else None
    return spec
