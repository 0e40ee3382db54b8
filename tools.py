"""Native OpenAI tools over Dify, which takes only a text `query`.

A request's `tools` (or legacy `functions`) become text appended to the query: a compact
catalogue plus a calling protocol. The model answers in text; this module finds the calls in
that text, streaming or not, and turns them into OpenAI `tool_calls`. History turns go the
other way: past calls and their results are rendered in the same protocol, so the model sees
each call next to its result (paired by `tool_call_id`).

The envelope: one block per call, the Hermes/Qwen form

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Why this form and not a single `<tool_calls>[...]</tool_calls>` list:
* It is what the Qwen/Hermes model families (the usual LLMs behind self-hosted Dify apps) are
  fine-tuned to emit, so a model follows it with the least prompting, and our "own envelope"
  and the most common native form are one and the same thing.
* One call per block keeps faults local: a block that does not parse is released as text on
  its own, and each call is emitted as soon as its closing tag arrives.
* The opening tag is distinctive (no prose or Markdown starts with `<tool_call`), so text
  only needs to be held back while it could still be that tag.
* The body is plain JSON with `arguments` as an *object* (models get nested quoting of a JSON
  string wrong); we serialise it to the compact JSON string OpenAI clients expect.

Also recognised, because real models answer that way whatever the prompt says:
`<tool_calls>` holding a call or a list; `parameters`/`args`/`input` for `arguments`;
`arguments` as a JSON string; HAN's `{"tool_calls": [{"function": {...}}]}`; OpenAI's
`{"type": "function", "function": {...}}`; attributes in the opening tag (`<tool_call
id="…">`, older renderings); a missing closing tag (the next `<tool_call>` or the end of the
answer closes it); and fenced ```` ```json ```` / ```` ``` ```` blocks (also `jsonc`, `json5`,
`xml`, `tool_call(s)`) whose content is a call, a list of calls or `<tool_call>` blocks. A
fenced block that is not a call stays content, decided at its closing fence. A call must name
an offered tool and contain only call keys (`name`, arguments, `id`, `type`, `function`), so a
tool *definition* or arbitrary JSON shown to the user is never taken for a call. After a call,
a `<tool_result` the model writes itself is a hallucinated result: it and the rest of the
answer are dropped.

Holdback (streaming): ordinary text goes out at once. Held back are only
* a `<` plus what could still become `<tool_call`, `<tool_calls` or, after a call,
  `<tool_result` / `</tool_call(s)` (at most 12 characters), or such a tag with attributes
  until its `>` (the whole tag is capped at TAG_MAX = 64 characters, so at most 63 held);
* at a line start, up to 3 spaces plus what could still become an opening fence line
  (```` ``` ```` + one of the info strings above + spaces), at most FENCE_LINE_MAX = 24 chars;
* whitespace at the very start of the answer or right after a call (at most WS_MAX = 16
  characters), because whitespace next to calls is dropped rather than shown.
Measured maximum (tests/test_tools.py::test_holdback_measured and the adversarial
test_holdback_is_bounded): MAX_HOLDBACK = 79 characters (16 whitespace + a 63-character
unterminated tag with attributes); with the tags as we ask for them it is at most 12 (+16
whitespace). Once an envelope has opened, its text is held until it closes (it is the
envelope, never shown) -- but only while it can still be a call: a `<tool_call>` followed by
prose, or a fence whose first visible character is not `{`, `[` or `<tool_call` (code,
shell, prose), is released as soon as that character arrives, and such a fence is then
tracked as a code block so its closing ``` is not taken for an opening one. A JSON-looking
fenced block is held while it is open and decided at its closing fence. If the answer ends
with a broken envelope, everything held is released as content. feed() scans only the new
text plus the small held tail (and an open envelope's last few characters for its end), with
compiled patterns anchored at candidate positions, so it stays linear in the answer length.

Arguments are checked against the tool's JSON Schema and coerced where that is safe ("42" →
42 for integer/number, "true" → True for boolean, a scalar → [scalar] for arrays, JSON text
→ object/array, numbers → string, case-insensitive enum match), recursively through nested
properties and items. Properties the schema does not list are kept unless the schema says
`additionalProperties: false`. Small JSON faults are repaired without third-party code:
trailing commas, missing closing brackets/braces (mismatched ones too), single quotes, Python
literals, raw newlines in strings, an unclosed string when the closing tag did arrive. An
envelope with no closing tag at the end of the answer is only repaired by closing brackets:
an unclosed string there means the answer was cut off, and a truncated argument must not
become a call.

Ids are always fresh (`call_` + 24 alphanumerics): ids a model copies from the rendered
history would collide. With `parallel_tool_calls: false` only the first call is emitted (the
model will repeat the others after seeing the first result).
"""

import json
import math
import re
import secrets
import string
from dataclasses import dataclass

from content import content_text

__all__ = [
    "ToolSpec", "ToolRequest", "ToolRequestError", "tool_request", "tool_instructions", "catalogue", "turn_rule",
    "for_policy",
    "render_tool_calls", "render_tool_result", "ToolCallParser", "parse_tool_calls",
    "new_call_id", "MAX_HOLDBACK", "lenient_json",
]

TAG_MAX = 64
FENCE_LINE_MAX = 24
WS_MAX = 16
MAX_HOLDBACK = WS_MAX + TAG_MAX - 1


# --------------------------------------------------------------------------- request side

@dataclass(frozen=True)
class ToolSpec:
    """One callable function the client offered."""
    name: str
    description: str
    parameters: dict  # JSON Schema, may be {}


@dataclass(frozen=True)
class ToolRequest:
    """What the request asked for, normalised.

    `legacy` (an addition, defaulted) says the tools came from the deprecated `functions`
    field, whose answer shape (`function_call`) holds a single call.
    """
    tools: tuple[ToolSpec, ...]
    choice: str  # "auto" | "required" | "none" | "function"
    forced_name: str | None = None
    parallel: bool = True
    legacy: bool = False

    def tool(self, name):
        for spec in self.tools:
            if spec.name == name:
                return spec
        return None


class ToolRequestError(ValueError):
    """An ill-typed tools request; `param` names the offending field for the 400 body."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param
        self.message = message


def _function_spec(fn, param):
    if not isinstance(fn, dict):
        raise ToolRequestError(param, f"'{param}' must be an object with a 'name'.")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolRequestError(f"{param}.name", f"'{param}.name' is required and must be a non-empty string.")
    description = fn.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise ToolRequestError(f"{param}.description", f"'{param}.description' must be a string.")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise ToolRequestError(f"{param}.parameters", f"'{param}.parameters' must be a JSON Schema object.")
    return ToolSpec(name.strip(), description.strip(), parameters)


def _choice_name(value):
    """The function a dict-shaped choice names (Chat, Responses and Anthropic spellings)."""
    fn = value.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return fn["name"]
    return value.get("name") if isinstance(value.get("name"), str) else None


def tool_request(body):
    """The normalised tools request of an OpenAI body, or None when no tool can be called.

    `tools` entries of type function are used (custom and other types are ignored: Dify
    cannot honour them); legacy `functions` too. `tool_choice` (or legacy `function_call`)
    "none" turns tools off. Raises ToolRequestError for ill-typed tools and for a choice
    naming a function that was not offered.
    """
    specs = []
    seen = set()
    legacy = False
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ToolRequestError("tools", "'tools' must be an array of tools.")
    for index, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise ToolRequestError(f"tools[{index}]", f"'tools[{index}]' must be an object.")
        if tool.get("type", "function") != "function":
            continue
        spec = _function_spec(tool.get("function"), f"tools[{index}].function")
        if spec.name not in seen:
            seen.add(spec.name)
            specs.append(spec)
    functions = body.get("functions")
    if functions is not None and not isinstance(functions, list):
        raise ToolRequestError("functions", "'functions' must be an array of functions.")
    if functions and not specs:
        legacy = True
    for index, fn in enumerate(functions or ()):
        spec = _function_spec(fn, f"functions[{index}]")
        if spec.name not in seen:
            seen.add(spec.name)
            specs.append(spec)
    if not specs:
        return None

    param = "tool_choice"
    choice = body.get("tool_choice")
    if choice is None and body.get("function_call") is not None:
        param, choice = "function_call", body.get("function_call")
    forced = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, str):
        choice = {"any": "required"}.get(choice, choice)
        if choice not in ("none", "auto", "required"):
            raise ToolRequestError(param, f"'{param}' must be \"none\", \"auto\", \"required\" or name a function.")
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "allowed_tools":
            allowed = choice.get("allowed_tools")
            if not isinstance(allowed, dict):
                allowed = choice
            mode = allowed.get("mode", "auto")
            if mode not in ("auto", "required"):
                raise ToolRequestError(param, "'tool_choice.allowed_tools.mode' must be \"auto\" or \"required\".")
            entries = allowed.get("tools")
            if not isinstance(entries, list):
                raise ToolRequestError(param, "'tool_choice.allowed_tools.tools' must be an array.")
            names = []
            for entry in entries:
                if isinstance(entry, dict) and entry.get("type", "function") != "function":
                    continue
                name = _choice_name(entry) if isinstance(entry, dict) else None
                if name is None or name not in seen:
                    raise ToolRequestError(param, f"'tool_choice' allows a function that is not among the tools: {name!r}.")
                names.append(name)
            specs = [spec for spec in specs if spec.name in names]
            if not specs:
                return None
            choice = mode
        elif kind in ("none", "auto", "required", "any"):
            choice = "required" if kind == "any" else kind
        elif kind in (None, "function", "tool"):
            forced = _choice_name(choice)
            if forced is None:
                raise ToolRequestError(param, f"'{param}' must name a function: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.")
            if forced not in seen:
                raise ToolRequestError(param, f"'{param}' names a function that is not among the tools: {forced!r}.")
            choice = "function"
        else:
            choice = "auto"  # e.g. a custom tool: ignored like custom tools themselves
    else:
        raise ToolRequestError(param, f"'{param}' must be a string or an object.")
    if choice == "none":
        return None

    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = not legacy
    elif not isinstance(parallel, bool):
        raise ToolRequestError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    elif legacy:
        parallel = False
    return ToolRequest(tuple(specs), choice, forced, parallel, legacy)


# --------------------------------------------------------------------------- instructions

def _dump(value):
    return json.dumps(value, ensure_ascii=False)


def _deref(schema, root, depth=0):
    """Resolve a local `$ref` (`#/$defs/X`, `#/definitions/X`): tools generated from
    Pydantic models put every nested model there."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < 8:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            return {k: v for k, v in schema.items() if k != "$ref"}
        target = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            return {k: v for k, v in schema.items() if k != "$ref"}
        merged = dict(target)
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        schema = merged
        depth += 1
    return schema if isinstance(schema, dict) else {}


def _types(schema):
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [t for t in kind if isinstance(t, str)]
    if "properties" in schema:
        return ["object"]
    if "items" in schema:
        return ["array"]
    return []


_INLINE_DEPTH = 2       # nested objects written inline this deep; deeper ones get their JSON Schema
_DESCRIPTION_MAX = 160  # a tool's description: its first sentence, at most this long
_NOTE_MAX = 120         # a parameter's note, when it has one worth its cost
_GUIDANCE = re.compile(r"e\.g\.|for example|example|format|\"[^\"]+\"|'[^']+'|\b(?:ISO|RFC|RRULE|regex|UTC)\b"
                       r"|YYYY|\d{4}-\d{2}", re.I)


_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)[.!?](?=\s|$)")


def _first_sentence(text, limit):
    """The first sentence (or line) of a description, cut at `limit` characters."""
    text = " ".join(str(text or "").split())
    if not text:
        return ""
    match = _SENTENCE_END.search(text)
    sentence = text[:match.end()] if match else text
    return sentence if len(sentence) <= limit else sentence[:limit - 1].rstrip() + "…"


class _Catalogue:
    """Writes one tool's parameters tersely: `name: type`, `?` when optional, `= default`.
    Objects nested up to _INLINE_DEPTH are written inline as `{key: type}`; anything the terse
    form cannot say (deeper nesting, patterns, combinators of objects) gets its JSON Schema on a
    line of its own, so the model still knows how to call the tool correctly."""

    def __init__(self, root):
        self.root = root
        self.schemas = []  # (parameter path, schema) written out in full

    def type_text(self, schema, path, depth=0):
        schema = _deref(schema, self.root)
        if depth > 6:
            return "object" if _types(schema) == ["object"] else "any"
        if "const" in schema:
            return _dump(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return "|".join(_dump(value) for value in schema["enum"])
        branches = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(branches, list) and branches and not _types(schema):
            return "|".join(dict.fromkeys(self.type_text(branch, path, depth + 1) for branch in branches))
        types = _types(schema)
        if not types:
            return "any"
        return "|".join(self._one_type(kind, schema, path, depth) for kind in types)

    def _one_type(self, kind, schema, path, depth):
        if kind == "array":
            items = schema.get("items")
            inner = self.type_text(items, path + "[]", depth + 1) if isinstance(items, dict) else "any"
            return f"({inner})[]" if "|" in inner else f"{inner}[]"
        if kind == "object":
            properties = schema.get("properties")
            if isinstance(properties, dict) and properties:
                if depth >= _INLINE_DEPTH:
                    self.schemas.append((path, schema))
                    return "object"
                return "{" + ", ".join(self.parameters(schema, path, depth + 1)) + "}"
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                return "{string: " + self.type_text(extra, path + "{}", depth + 1) + "}"
            return "object"
        text = kind
        bits = []
        if isinstance(schema.get("format"), str):
            bits.append(schema["format"])
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(low, (int, float)) and not isinstance(low, bool) and isinstance(high, (int, float)) \
                and not isinstance(high, bool):
            bits.append(f"{low}..{high}")
        elif isinstance(low, (int, float)) and not isinstance(low, bool):
            bits.append(f">={low}")
        elif isinstance(high, (int, float)) and not isinstance(high, bool):
            bits.append(f"<={high}")
        if isinstance(schema.get("pattern"), str):
            bits.append("pattern " + schema["pattern"])
        return f"{text} ({', '.join(bits)})" if bits else text

    def parameters(self, schema, path="", depth=0):
        """`name: type` for each property, required ones first as listed."""
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return []
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        out = []
        for name, sub in properties.items():
            sub = _deref(sub, self.root)
            text = f"{name}{'' if name in required else '?'}: {self.type_text(sub, f'{path}.{name}' if path else name, depth)}"
            if "default" in sub and sub["default"] is not None:
                text += " = " + _dump(sub["default"])
            out.append(text)
        return out

    def notes(self, schema):
        """Parameter notes worth sending: descriptions that show a format, allowed values or an
        example (what the model cannot guess from the name and type)."""
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return []
        notes = []
        for name, sub in properties.items():
            sub = _deref(sub, self.root)
            description = str(sub.get("description") or "")
            if description and _GUIDANCE.search(description):
                notes.append(f"{name}: {_first_sentence(description, _NOTE_MAX)}")
        return notes


def _tool_line(spec):
    """One tool in the catalogue: `- name(params) — first sentence of its description`, then a
    short line of parameter notes and any JSON Schema the terse form could not express."""
    schema = _deref(spec.parameters, spec.parameters)
    writer = _Catalogue(spec.parameters)
    head = f"- {spec.name}({', '.join(writer.parameters(schema))})"
    description = _first_sentence(spec.description, _DESCRIPTION_MAX)
    lines = [f"{head} — {description}" if description else head]
    notes = writer.notes(schema)
    if notes:
        lines.append("  " + "; ".join(notes))
    for path, sub in writer.schemas:
        lines.append(f"  {path} is: " + json.dumps(sub, ensure_ascii=False, separators=(",", ":")))
    if not isinstance(schema.get("properties"), dict) and set(schema) - {
            "type", "properties", "required", "additionalProperties", "$schema", "title", "description"}:
        lines.append("  arguments (JSON Schema): " + json.dumps(spec.parameters, ensure_ascii=False,
                                                                separators=(",", ":")))
    return "\n".join(lines)


def catalogue(request):
    """The tools and how to call them: what a conversation needs to be told once. Deterministic
    (same tools -> same text), so its fingerprint tells whether a conversation has seen it."""
    if request is None or not request.tools:
        return ""
    example = request.forced_name if request.choice == "function" else "TOOL_NAME"
    rules = [
        "One call per block; \"arguments\" is a JSON object with the parameters above (valid JSON, "
        "every required one). Write blocks as plain text, not in a code fence.",
        "To call several tools at once, write one block per call." if request.parallel else
        "Call at most one tool per reply, then wait for its result.",
        "After your last </tool_call> stop. Results come back as <tool_result id=\"…\" name=\"…\"> blocks; "
        "never write those yourself. Call a tool only when it helps; otherwise answer normally.",
    ]
    return "\n".join([
        "# Tools",
        "You can call these tools. Parameters are `name: type`; `?` marks optional ones, `= x` a default.",
        *(_tool_line(spec) for spec in request.tools),
        "To call a tool, write:",
        "<tool_call>\n" + _dump({"name": example, "arguments": {"PARAMETER": "value"}}) + "\n</tool_call>",
        *rules,
    ])


def turn_rule(request):
    """What this request's `tool_choice` demands of this one reply (sent every turn, unlike the catalogue)."""
    if request is None:
        return ""
    if request.choice == "required":
        return "You must call at least one tool in this reply; do not answer with text only."
    if request.choice == "function":
        return f"You must call the tool \"{request.forced_name}\" in this reply; do not answer with text only."
    return ""


def tool_instructions(request, with_catalogue=True):
    """The text appended to the Dify query: the catalogue (unless the conversation already has it)
    and the turn's tool_choice rule."""
    if request is None or request.choice == "none" or not request.tools:
        return ""
    parts = [catalogue(request) if with_catalogue else "", turn_rule(request)]
    return "\n\n".join(part for part in parts if part)


def for_policy(request, policy):
    """The tools a request keeps under the operator's CLIENT_TOOLS policy: `all`; `forced` (only
    when tool_choice forces a call: all tools for "required", the named one for a function);
    `off` (none). None when no tool is left."""
    if request is None or policy == "off":
        return None
    if request.choice == "function":
        kept = tuple(spec for spec in request.tools if spec.name == request.forced_name) or request.tools
        return ToolRequest(kept, request.choice, request.forced_name, request.parallel, request.legacy)
    if policy == "forced" and request.choice != "required":
        return None
    return request


# --------------------------------------------------------------------------- history rendering

def _attribute(value):
    return str(value).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def render_tool_calls(tool_calls):
    """An assistant turn's `tool_calls` in our envelope, so the model sees its own past calls
    in the protocol it is asked to use. The id rides inside the JSON (a call key the parser
    accepts and ignores), next to the result block that names the same id."""
    blocks = []
    for call in tool_calls or ():
        if not isinstance(call, dict):
            continue
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        name = fn.get("name") or ""
        raw = fn.get("arguments")
        if isinstance(raw, str):
            try:
                arguments = _loads(raw) if raw.strip() else {}
            except ValueError:
                arguments = raw
        else:
            arguments = raw if raw is not None else {}
        obj = {"id": call["id"]} if isinstance(call.get("id"), str) and call["id"] else {}
        obj.update({"name": name, "arguments": arguments})
        blocks.append("<tool_call>\n" + _dump(obj) + "\n</tool_call>")
    return "\n".join(blocks)


def render_tool_result(message, names_by_id):
    """A `role: tool` (or legacy `role: function`) message as a delimited result block that
    names the tool and the tool_call_id, so the model can pair it with its call."""
    call_id = message.get("tool_call_id") or ""
    name = message.get("name") or names_by_id.get(call_id) or ""
    attributes = (f' id="{_attribute(call_id)}"' if call_id else "") + f' name="{_attribute(name)}"'
    return f"<tool_result{attributes}>\n{content_text(message.get('content'))}\n</tool_result>"


# --------------------------------------------------------------------------- lenient JSON

def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(strict=False, parse_constant=_no_constants)
_CLOSER = {"{": "}", "[": "]"}
_LITERALS = {"True": "true", "False": "false", "None": "null", "true": "true", "false": "false", "null": "null"}


def _loads(text):
    text = text.strip()
    try:
        value, end = _DECODER.raw_decode(text)
    except RecursionError:
        raise ValueError("too deeply nested") from None
    if end != len(text):
        raise ValueError("extra data")
    return value


def _repair(text, close_string=True, close_brackets=True):
    """Rewrite almost-JSON into JSON: single quotes, Python literals, trailing commas,
    mismatched or missing closing brackets, an unclosed string at the end."""
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
    if stack and not close_brackets:
        raise ValueError("unclosed brackets")
    drop_comma()
    tail = "".join(out).rstrip()
    if tail.endswith(":"):
        out.append("null")
    while stack:
        drop_comma()
        out.append(_CLOSER[stack.pop()])
    return _loads("".join(out))


_SEPARATORS = " \t\r\n,;"
_JUNK = set(" \t\r\n,;}])`")


def _json_values(text, closed):
    """The JSON values in a body, in order, and the unparsed rest. A closed body (its end
    tag or fence arrived) gets every repair; an unclosed one (the answer ended) only gets
    its brackets closed, and leaves trailing non-JSON text as the rest."""
    values = []
    i = after = 0
    n = len(text)
    while True:
        while i < n and text[i] in _SEPARATORS:
            i += 1
        if i >= n:
            return values, ""
        if text[i] not in "{[":
            break
        try:
            value, i = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError):
            break
        values.append(value)
        after = i
    tail = text[i:]
    if values and set(tail) <= _JUNK:
        return values, ""
    if closed or not values or tail[:1] in ("{", "["):
        try:
            values.append(_repair(tail, close_string=closed))
            return values, ""
        except (ValueError, RecursionError):
            if values and tail[:1] in ("{", "["):
                return values, ""  # a further call cut off by the end of the answer: not text
    return values, (text[after:] if values else tail)


def lenient_json(text):
    """The JSON object or array `text` starts with (anything after it ignored), repaired of small faults
    if need be; None when it does not start with one."""
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


# --------------------------------------------------------------------------- schema coercion

_INT = re.compile(r"\s*[-+]?\d+\s*\Z")
_NUMBER = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*\Z")
_NO_CHANGE = object()


def _is(value, kind):
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "null":
        return value is None
    return True


def _parse_json_text(value, kind):
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            parsed = _loads(value)
        except ValueError:
            try:
                parsed = _repair(value)
            except (ValueError, RecursionError):
                return _NO_CHANGE
        if _is(parsed, kind):
            return parsed
    return _NO_CHANGE


def _convert(value, kind):
    if kind == "integer":
        if isinstance(value, str) and _INT.match(value):
            return int(value)
        if isinstance(value, str) and _NUMBER.match(value) and float(value).is_integer():
            return int(float(value))  # "3.0" -> 3; an infinity is not is_integer()
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "number":
        if isinstance(value, str) and _INT.match(value):
            return int(value)
        if isinstance(value, str) and _NUMBER.match(value) and math.isfinite(float(value)):
            return float(value)
    elif kind == "boolean":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return _dump(value)
        if isinstance(value, (dict, list)):
            return _dump(value)
    elif kind == "array":
        parsed = _parse_json_text(value, "array")
        if parsed is not _NO_CHANGE:
            return parsed
        if value is not None:
            return [value]
    elif kind == "object":
        return _parse_json_text(value, "object")
    elif kind == "null":
        if isinstance(value, str) and value.strip() == "null":
            return None
    return _NO_CHANGE


def _coerce(value, schema, root, depth=0):
    """`value` made to fit `schema` where that is safe; anything else is left as it is."""
    if depth > 16 or not isinstance(schema, dict):
        return value
    schema = _deref(schema, root)
    types = _types(schema)
    if not types:
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                branches = [_deref(b, root) for b in branches if isinstance(b, dict)]
                for branch in branches:
                    if any(_is(value, t) for t in _types(branch)):
                        return _coerce(value, branch, root, depth + 1)
                for branch in branches:
                    converted = _coerce(value, branch, root, depth + 1)
                    if converted is not value and any(_is(converted, t) for t in _types(branch)):
                        return converted
        return _fit_enum(value, schema)
    if not any(_is(value, t) for t in types):
        for kind in types:
            converted = _convert(value, kind)
            if converted is not _NO_CHANGE:
                value = converted
                break
    if isinstance(value, dict) and "object" in types:
        value = _coerce_object(value, schema, root, depth)
    elif isinstance(value, list) and "array" in types and isinstance(schema.get("items"), dict):
        value = [_coerce(item, schema["items"], root, depth + 1) for item in value]
    return _fit_enum(value, schema)


def _fit_enum(value, schema):
    enum = schema.get("enum")
    if isinstance(enum, list) and isinstance(value, str) and value not in enum:
        matches = [v for v in enum if isinstance(v, str) and v.lower() == value.strip().lower()]
        if len(matches) == 1:
            return matches[0]
    return value


def _coerce_object(value, schema, root, depth):
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    closed = schema.get("additionalProperties") is False
    result = {}
    for key, item in value.items():
        if key in properties:
            result[key] = _coerce(item, properties[key], root, depth + 1)
        elif not closed:
            result[key] = item
    return result


def _arguments(raw, spec):
    """The call's arguments as a schema-fitted object, or None if they cannot be one."""
    schema = _deref(spec.parameters, spec.parameters) if spec.parameters else {}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    value = raw
    if value is None:
        value = {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            value = {}
        elif text[0] in "{[":
            try:
                value = _loads(text)
            except ValueError:
                try:
                    value = _repair(text)
                except (ValueError, RecursionError):
                    pass
    if isinstance(value, dict) and len(value) == 1 and not properties.keys() & value.keys():
        # {"arguments": {...}} nested once more than asked
        inner = next(iter(value.values()))
        key = next(iter(value))
        if key in ("arguments", "parameters", "args", "input") and isinstance(inner, dict):
            value = inner
    if not isinstance(value, dict):
        if len(properties) != 1:
            return None
        value = {next(iter(properties)): value}
    return _coerce_object(value, schema, spec.parameters, 0)


# --------------------------------------------------------------------------- call recognition

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


# --------------------------------------------------------------------------- streaming parser

_ALNUM = string.ascii_letters + string.digits


def new_call_id():
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


_TEXT, _TAG, _FENCE, _DISCARD = "text", "tag", "fence", "discard"
_NO, _PREFIX, _MATCH = 0, 1, 2

_CANDIDATE = re.compile(r"<|^(?= {0,3}(?:`|\Z))", re.M)
_IDENT = re.compile(r"/?[A-Za-z_]*")
_ATTRS = re.compile(r"""(?:\s+[\w:.-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*\s*/?""")
_FENCE_INFOS = ("", "json", "jsonc", "json5", "xml", "tool_call", "tool_calls")
_FENCE_OPEN = re.compile(r" {0,3}```[ \t]*([\w+.-]*)[ \t]*\r?\n")
_FENCE_PARTIAL = re.compile(r" {0,3}(?:`{0,2}|```[ \t]*([\w+.-]*)([ \t]*\r?)?)")
_TICKS = re.compile(r" {0,3}```")
_TICKS_PARTIAL = re.compile(r" {0,3}`{0,2}")
_FENCE_CLOSE = re.compile(r"\n {0,3}```[ \t]{0,8}\r?\n")
_FENCE_CLOSE_AT_END = re.compile(r"\n {0,3}```[ \t]{0,8}\r?\Z")
_TAG_END = re.compile(r"</tool_calls?\s{0,3}>|<tool_calls?[\s>]", re.I)
_TAG_NAMES = ("tool_call", "tool_calls")
_TAG_NAMES_AFTER_CALL = _TAG_NAMES + ("tool_result", "/tool_call", "/tool_calls")
_DROP = "drop"


class ToolCallParser:
    """Streaming filter over the answer text: feed text deltas, get back the content that is
    safe to show and each call as soon as it is complete.

    Pieces are ("content", str) and ("tool_call", {"index", "id", "name", "arguments"}).
    Chunking never changes the result: the concatenated content and the calls are the same
    however the answer is split (parse_tool_calls is this class fed in one piece).
    """

    def __init__(self, request, id_factory=None):
        self._request = request
        self._id_factory = id_factory or new_call_id
        self._mode = _TEXT
        self._hold = ""          # text mode: a possible opening tag/fence not yet decided
        self._line_start = True  # is the start of `_hold + next text` at a line start?
        self._in_code = False    # inside a Markdown code block that cannot hold a call
        self._quiet = True       # nothing shown since the start or the last call
        self._ws = ""            # whitespace held while quiet
        self._env = ""           # the open envelope's text (opening tag/fence included)
        self._env_open = 0       # where its body starts
        self._env_ws = ""        # whitespace held before it (released with it if broken)
        self._checked = False    # has its body shown a character a call can start with?
        self._count = 0
        self._ids = set()
        self._events = []
        self._done = False

    @property
    def called(self):
        """Whether any call was emitted (finish_reason "tool_calls")."""
        return self._count > 0

    @property
    def held(self):
        """Characters held back while deciding whether they start an envelope (not counting
        an envelope already open); bounded by MAX_HOLDBACK."""
        return len(self._ws) + len(self._hold)

    # -- public

    def feed(self, text):
        self._events = []
        if text and not self._done:
            self._process(text)
        return self._drain()

    def finish(self):
        self._events = []
        if self._done:
            return []
        for _ in range(10_000):
            if self._mode == _TAG:
                rest = self._close_at_end(self._env[self._env_open:])
            elif self._mode == _FENCE:
                m = _FENCE_CLOSE_AT_END.search(self._env, max(self._env_open - 1, 0))
                if m:
                    self._resolve(self._env[self._env_open:m.start()], self._env, True)
                    rest = ""
                else:
                    rest = self._close_at_end(self._env[self._env_open:])
            else:
                break
            self._mode, self._env = _TEXT, ""
            if rest:
                self._line_start = False
                self._process(rest)
        if self._mode == _TEXT and self._hold:
            hold, self._hold = self._hold, ""
            self._content(hold)
        if self._ws and not self.called:
            self._emit_content(self._ws)
        self._ws = ""
        self._done = True
        return self._drain()

    # -- machinery

    def _drain(self):
        merged = []
        for kind, value in self._events:
            if kind == "content" and merged and merged[-1][0] == "content":
                merged[-1] = ("content", merged[-1][1] + value)
            elif kind != "content" or value:
                merged.append((kind, value))
        self._events = []
        return merged

    def _process(self, text):
        while text is not None:
            if self._mode == _TEXT:
                buf, self._hold = self._hold + text, ""
                text = self._scan_text(buf)
            elif self._mode == _TAG:
                text = self._scan_tag(text)
            elif self._mode == _FENCE:
                text = self._scan_fence(text)
            else:
                return

    def _emit_content(self, text):
        if text:
            self._events.append(("content", text))

    def _content(self, text):
        """Show text; while quiet, whitespace waits to see whether a call follows."""
        if not text:
            return
        if self._quiet:
            if text.isspace():
                self._ws += text
                if len(self._ws) > WS_MAX:
                    self._emit_content(self._ws)
                    self._ws = ""
                    self._quiet = False
                return
            text, self._ws = self._ws + text, ""
            self._quiet = False
        self._emit_content(text)

    def _scan_text(self, buf):
        """Show what cannot start an envelope; hold a possible start; enter an envelope.
        Returns the text after an opening tag/fence (to scan in the new mode) or None."""
        line_start = self._line_start
        start = pos = 0
        n = len(buf)
        while pos <= n:
            m = _CANDIDATE.search(buf, pos)
            if m is None:
                break
            p = m.start()
            if m.group() == "<":
                status, end, kind = self._match_tag(buf, p)
            elif p == 0 and not line_start:
                pos = 1
                continue
            else:
                status, end = self._match_fence(buf, p)
                kind = _FENCE
            if status == _NO:
                pos = p + 1
                continue
            self._content(buf[start:p])
            if status == _PREFIX:
                self._hold = buf[p:]
                self._line_start = line_start if p == 0 else buf[p - 1] == "\n"
                return None
            if kind == _DROP:  # a stray </tool_call> after a call: part of no envelope, never shown
                start = pos = end
                continue
            self._begin(kind, buf[p:end])
            return buf[end:]
        self._content(buf[start:])
        if n > start:
            self._line_start = buf[-1] == "\n"
        elif start:
            self._line_start = False
        return None

    def _match_tag(self, buf, p):
        n = len(buf)
        m = _IDENT.match(buf, p + 1)
        word, j = m.group().lower(), m.end()
        names = _TAG_NAMES_AFTER_CALL if self.called else _TAG_NAMES
        if j >= n:
            if any(name.startswith(word) for name in names):
                return _PREFIX, 0, None
            return _NO, 0, None
        if word not in names:
            return _NO, 0, None
        kind = _DISCARD if word == "tool_result" else _DROP if word[0] == "/" else _TAG
        ch = buf[j]
        if ch == ">":
            return _MATCH, j + 1, kind
        if not ch.isspace() or kind == _DROP:
            return _NO, 0, None
        limit = p + TAG_MAX
        k = buf.find(">", j, limit)
        if k == -1:
            if n < limit and "<" not in buf[j:n]:
                return _PREFIX, 0, None
            return _NO, 0, None
        if "<" in buf[j:k] or not _ATTRS.fullmatch(buf, j, k):
            return _NO, 0, None
        return _MATCH, k + 1, kind

    def _match_fence(self, buf, p):
        """A line start that may open a fence. Fences that cannot hold a call (```python)
        open a code block: its closing ``` must not be taken for an opening one."""
        ticks = _TICKS.match(buf, p)
        if self._in_code:
            if ticks:
                self._in_code = False
                return _NO, 0
            return (_PREFIX, 0) if _TICKS_PARTIAL.fullmatch(buf, p) else (_NO, 0)
        m = _FENCE_OPEN.match(buf, p, p + FENCE_LINE_MAX + 1)
        if m and m.group(1).lower() in _FENCE_INFOS:
            return _MATCH, m.end()
        ok = False
        if not m and len(buf) - p <= FENCE_LINE_MAX:
            m = _FENCE_PARTIAL.fullmatch(buf, p)
            if m:
                info, tail = (m.group(1) or "").lower(), m.group(2)
                if tail:
                    ok = info in _FENCE_INFOS
                else:
                    ok = any(name.startswith(info) for name in _FENCE_INFOS)
        if ok:
            return _PREFIX, 0
        if ticks:
            self._in_code = True
        return _NO, 0

    def _begin(self, kind, opening):
        self._mode = kind
        self._env = opening
        self._env_open = len(opening)
        self._env_ws, self._ws = self._ws, ""
        self._checked = False

    def _not_a_call(self, k, line_start):
        """The envelope's first visible characters cannot start a call: show what was held
        and scan on from there, instead of holding the rest of the answer."""
        env = self._env
        self._mode, self._env = _TEXT, ""
        self._release(env[:k])
        self._line_start = line_start if k == 0 else env[k - 1] == "\n"
        return env[k:]

    # The open envelope grows by every piece of a call's text, which may be long (a file written by
    # a tool): it is kept in parts and joined only when read whole, and each piece is searched for
    # the envelope's end in a window of its own size, so a long call costs what its length costs.

    @property
    def _env(self):
        if len(self._env_parts) != 1:
            self._env_parts = ["".join(self._env_parts)]
        return self._env_parts[0]

    @_env.setter
    def _env(self, text):
        self._env_parts = [text]
        self._env_length = len(text)

    def _grow(self, text):
        self._env_parts.append(text)
        self._env_length += len(text)

    def _env_from(self, start):
        """The envelope's text from `start` on, read from its last parts."""
        need = self._env_length - start
        tail, size = [], 0
        for part in reversed(self._env_parts):
            tail.append(part)
            size += len(part)
            if size >= need:
                break
        text = "".join(reversed(tail))
        return text[len(text) - need:]

    def _scan_tag(self, text):
        start = max(self._env_open, self._env_length - 24)
        self._grow(text)
        if not self._checked:
            body = self._env[self._env_open:]
            visible = body.lstrip()
            if not visible:
                return None
            if visible[0] not in "{[<`":
                return self._not_a_call(len(self._env) - len(visible), False)
            self._checked = True
        if _TAG_END.search(self._env_from(start)) is None:
            return None
        env = self._env
        m = _TAG_END.search(env, start)
        closing = m.group().startswith("</")
        consumed = m.end() if closing else m.start()
        body = env[self._env_open:m.start()]
        self._mode, self._env = _TEXT, ""
        if not closing and not body.strip():
            # <tool_calls> wrapping <tool_call> blocks: the wrapper is dropped
            self._ws, self._env_ws = self._env_ws, ""
        else:
            self._resolve(body, env[:consumed], True)
        self._line_start = False
        return env[consumed:]

    def _scan_fence(self, text):
        start = max(self._env_open - 1, self._env_length - 24)
        self._grow(text)
        if not self._checked:
            visible = self._env[self._env_open:].lstrip()
            if not visible:
                return None
            if visible[0] == "<":
                head = visible[:10].lower()
                if not "<tool_call".startswith(head):
                    ok = False
                elif len(head) < 10:
                    return None
                else:
                    ok = True
            else:
                ok = visible[0] in "{["
            if not ok:  # a code block after all: its closing fence is not an opening one
                self._in_code = True
                return self._not_a_call(len(self._env) - len(visible), True)
            self._checked = True
        if _FENCE_CLOSE.search(self._env_from(start)) is None:
            return None
        env = self._env
        m = _FENCE_CLOSE.search(env, start)
        self._mode, self._env = _TEXT, ""
        self._resolve(env[self._env_open:m.start()], env[:m.end()], True)
        self._line_start = True
        return env[m.end():]

    def _close_at_end(self, body):
        """The answer ended inside an envelope: a complete call (or one missing only closing
        brackets) still counts; text after it is scanned again; else release everything."""
        raw = self._env
        calls, rest = self._calls(body, closed=False)
        if calls is None:
            self._release(raw)
            return ""
        self._accept(calls)
        return rest

    def _resolve(self, body, raw, closed):
        calls, _ = self._calls(body, closed)
        if calls is None:
            self._release(raw)
        else:
            self._accept(calls)

    def _release(self, raw):
        ws, self._env_ws = self._env_ws, ""
        self._content(ws + raw)

    def _accept(self, calls):
        self._env_ws = ""
        for name, arguments in calls:
            if not self._request.parallel and self._count:
                continue
            call_id = self._id_factory()
            while call_id in self._ids:
                call_id = f"{call_id}_{len(self._ids)}"
            self._ids.add(call_id)
            self._events.append(("tool_call", {
                "index": self._count,
                "id": call_id,
                "name": name,
                "arguments": json.dumps(arguments, ensure_ascii=False, separators=(",", ":")),
            }))
            self._count += 1
        self._quiet = True
        self._ws = ""

    def _calls(self, body, closed):
        """([(name, arguments)], rest) if the body is made of calls to offered tools,
        else (None, "")."""
        fenced = _INNER_FENCE.match(body)
        if fenced:
            body = fenced.group(1)
        if body.lstrip().startswith("<"):
            bodies = _tag_bodies(body)
            if bodies is None:
                return None, ""
            calls = []
            for inner in bodies:
                found, _ = self._calls(inner, True)
                if found is None:
                    return None, ""
                calls.extend(found)
            return calls, ""
        values, rest = _json_values(body, closed)
        if not values or (closed and rest.strip()):
            return None, ""
        calls = []
        for item in _call_items(values):
            unpacked = _unpack_call(item)
            if unpacked is None:
                return None, ""
            spec = self._spec(unpacked[0])
            if spec is None:
                return None, ""
            arguments = _arguments(unpacked[1], spec)
            if arguments is None:
                return None, ""
            calls.append((spec.name, arguments))
        return (calls or None), rest

    def _spec(self, name):
        name = name.strip()
        spec = self._request.tool(name)
        if spec is None:
            for prefix in ("functions.", "tools.", "functions:", "tool:"):
                if name.startswith(prefix):
                    spec = self._request.tool(name[len(prefix):])
                    break
        if spec is None:
            folded = [s for s in self._request.tools if s.name.lower() == name.lower()]
            spec = folded[0] if len(folded) == 1 else None
        return spec


def openai_tool_call(call):
    """A parsed call ({"id", "name", "arguments"}) in the OpenAI `tool_calls` shape."""
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def parse_tool_calls(text, request, id_factory=None):
    """Non-streaming: (content around the calls or None if empty, OpenAI tool_calls).
    It is the streaming parser fed in one piece, so both paths always agree."""
    parser = ToolCallParser(request, id_factory)
    pieces = parser.feed(text or "") + parser.finish()
    content = "".join(value for kind, value in pieces if kind == "content")
    calls = [openai_tool_call(call) for kind, call in pieces if kind == "tool_call"]
    return (content or None), calls
