"""A tool's JSON Schema: resolving its `$ref`s, the types it allows, and fitting a call's
arguments to it.

The catalogue (tool_prompt.py) reads schemas to describe the tools; the call parser (tool_calls.py)
fits each call's arguments to its tool's schema, coercing where that is safe ("42" -> 42 for
integer/number, "true" -> True for boolean, a scalar -> [scalar] for arrays, JSON text ->
object/array, numbers -> string, a case-insensitive enum match), recursively through nested
properties and items. Properties the schema does not list are kept unless it says
`additionalProperties: false`. Anything else is left as the model wrote it: the client's own
validation then reports it.
"""

import json
import math
import re

import lenient_json


def deref(schema, root, depth=0):
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


def types_of(schema):
    """The JSON types a schema allows (`object`/`array` when it names none but has properties/items)."""
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
            parsed = lenient_json.parse(value)
        except ValueError:
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
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, (dict, list)):
            return json.dumps(value, ensure_ascii=False)
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
    schema = deref(schema, root)
    types = types_of(schema)
    if not types:
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                branches = [deref(b, root) for b in branches if isinstance(b, dict)]
                for branch in branches:
                    if any(_is(value, t) for t in types_of(branch)):
                        return _coerce(value, branch, root, depth + 1)
                for branch in branches:
                    converted = _coerce(value, branch, root, depth + 1)
                    if converted is not value and any(_is(converted, t) for t in types_of(branch)):
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


def fit_arguments(raw, parameters):
    """A call's raw arguments (an object, JSON text, a scalar or None) as an object fitted to the
    tool's `parameters` schema, or None if they cannot be one."""
    schema = deref(parameters, parameters) if parameters else {}
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
                value = lenient_json.parse(text)
            except ValueError:
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
    return _coerce_object(value, schema, parameters, 0)
