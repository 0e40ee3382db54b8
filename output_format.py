"""Structured output (`response_format` in chat, `text.format` in the Responses API), asked in words.

Dify's Service API has no structured-output switch, so a requested JSON format becomes an
instruction appended to the query, next to the tool catalogue, in every memory mode. Models
behind Dify do not always obey it to the letter, and clients parse the reply with a strict JSON
parser (the openai SDK's `parse`, the agents SDK's `output_type`), so the reply is repaired where
that is safe (`json_reply`): code fences and prose around the JSON are dropped, small faults
(trailing commas, single quotes, Python literals) mended. No mode-2 mark is added to such a reply.
"""

import json
import re

import lenient_json

from errors import bad_request


def format_instructions(response_format, param="response_format"):
    """The instruction for a chat-style `response_format` ("" for plain text); 400 for an ill-formed one."""
    if response_format is None:
        return ""
    if not isinstance(response_format, dict):
        raise bad_request(f"'{param}' must be an object with a 'type'.", param=param, code="invalid_type")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return ""
    if kind == "json_object":
        return "Reply with one valid JSON object and nothing else: no prose, no Markdown code fences."
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request(f"'{param}' of type json_schema needs a JSON Schema object in 'schema'.",
                              param=param, code="invalid_value")
        name = spec.get("name")
        named = f" ({name})" if isinstance(name, str) and name else ""
        return ("Reply with one valid JSON value and nothing else (no prose, no Markdown code fences), conforming "
                f"to this JSON Schema{named}:\n" + json.dumps(schema, ensure_ascii=False, separators=(",", ":")))
    raise bad_request(f"'{param}.type' must be \"text\", \"json_object\" or \"json_schema\"; got {kind!r}.",
                      param=param, code="invalid_value")


def wants_json(response_format):
    """Whether a (checked) `response_format` asks for JSON: the reply must then parse as JSON."""
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


_FENCED = re.compile(r"```[\w-]*[ \t]*\n(.*?)\n[ \t]*```", re.S)


def json_reply(text):
    """The reply as the JSON the client asked for: as it is when it parses, else the JSON value found in
    it (inside a code fence, or from the first `{` or `[` on, prose around it dropped), repaired of
    small faults. Text holding no JSON value is returned unchanged: the client's parser then says so."""
    try:
        json.loads(text)
        return text
    except ValueError:
        pass
    stripped = text.strip()
    candidates = [m.group(1) for m in _FENCED.finditer(stripped)]
    starts = [i for i in (stripped.find("{"), stripped.find("[")) if i >= 0]
    if starts:
        candidates.append(stripped[min(starts):])
    for candidate in candidates:
        value = lenient_json.leading_value(candidate)
        if value is not None:
            return json.dumps(value, ensure_ascii=False)
    return text
