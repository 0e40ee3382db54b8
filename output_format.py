"""Structured output (`response_format` in chat, `text.format` in the Responses API), asked in words.

Dify's Service API has no structured-output switch, so a requested JSON format becomes an
instruction appended to the query, next to the tool catalogue, in every memory mode.
"""

import json

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
