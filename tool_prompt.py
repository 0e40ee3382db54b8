"""The text that teaches an app the tool-calling protocol: the compact tool catalogue and the turn's rule.

Dify takes only a text `query`, so a request's `tools` (or legacy `functions`) become text appended
to it: a catalogue of the tools (sent once per Dify conversation in mode 2, see completions.py) and
the rule `tool_choice` sets for this reply (sent every turn). The model is asked to answer with one
block per call, the Hermes/Qwen form

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
  string wrong); the parser (tool_calls.py) serialises it to the compact JSON string OpenAI
  clients expect.

The catalogue is terse (Open WebUI's 36 built-in tools: about 7,500 characters instead of 19,000
as JSON Schema) and deterministic, so its fingerprint tells whether a conversation has seen it.
"""

import json
import re

from tool_schema import deref, types_of


def _dump(value):
    return json.dumps(value, ensure_ascii=False)


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
        schema = deref(schema, self.root)
        if depth > 6:
            return "object" if types_of(schema) == ["object"] else "any"
        if "const" in schema:
            return _dump(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return "|".join(_dump(value) for value in schema["enum"])
        branches = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(branches, list) and branches and not types_of(schema):
            return "|".join(dict.fromkeys(self.type_text(branch, path, depth + 1) for branch in branches))
        types = types_of(schema)
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
            sub = deref(sub, self.root)
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
            sub = deref(sub, self.root)
            description = str(sub.get("description") or "")
            if description and _GUIDANCE.search(description):
                notes.append(f"{name}: {_first_sentence(description, _NOTE_MAX)}")
        return notes


def _tool_line(spec):
    """One tool in the catalogue: `- name(params) — first sentence of its description`, then a
    short line of parameter notes and any JSON Schema the terse form could not express."""
    schema = deref(spec.parameters, spec.parameters)
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
