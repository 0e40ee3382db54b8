"""tool_schema.py and lenient_json.py through the call parser: JSON faults repaired, arguments fitted to the
tool's schema."""

import json

import pytest

from tool_prompt import tool_instructions
from tool_request import ToolRequest, ToolSpec
from tool_samples import call_args, envelope, parse, stream, streamed


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>{"name": "search", "arguments": {"query": "a",},}</tool_call>', {"query": "a"}),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"}</tool_call>', {"query": "a"}),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"</tool_call>', {"query": "a"}),
    ('<tool_call>{"name": "search", "arguments": {"query": "a</tool_call>', {"query": "a"}),
    ("<tool_call>{'name': 'search', 'arguments': {'query': 'it\\'s'}}</tool_call>", {"query": "it's"}),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "X", "detailed": True, "tags": ["a",]}}</tool_call>',
     {"city": "X", "detailed": True, "tags": ["a"]}),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "X", "filters": {"kind": "k"]}}</tool_call>',
     {"city": "X", "filters": {"kind": "k"}}),
    ('<tool_call>{"name": "search", "arguments": {"query": "line1\nline2"}}</tool_call>', {"query": "line1\nline2"}),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"}}}</tool_call>', {"query": "a"}),
    ('```json\n{"name": "search", "arguments": {"query": "a",}\n```', {"query": "a"}),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"}', {"query": "a"}),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"', {"query": "a"}),
])
def test_repaired_json(text, expected):
    content, calls = parse(text)
    assert content is None
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == expected
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


def test_coercion():
    args = {"city": 7, "days": "3", "ratio": "0.5", "detailed": "true", "tags": "rain", "unit": "Celsius",
            "filters": '{"kind": "k", "max": "9"}', "points": [{"x": "1.5"}], "extra": "kept"}
    _, calls = parse(envelope("get_weather", args))
    assert call_args(calls) == [("get_weather", {
        "city": "7", "days": 3, "ratio": 0.5, "detailed": True, "tags": ["rain"], "unit": "celsius",
        "filters": {"kind": "k", "max": 9}, "points": [{"x": 1.5}], "extra": "kept"})]
    assert calls[0]["function"]["arguments"] == json.dumps(json.loads(calls[0]["function"]["arguments"]),
                                                           separators=(",", ":"))


def test_coercion_leaves_unsafe_values_alone():
    args = {"city": "Paris", "days": "three", "detailed": "maybe", "ratio": "1e3", "tags": ["a", 2]}
    _, calls = parse(envelope("get_weather", args))
    assert call_args(calls)[0][1] == {"city": "Paris", "days": "three", "detailed": "maybe", "ratio": 1000.0,
                                      "tags": ["a", "2"]}


def test_self_referencing_and_deep_inputs_do_not_break():
    tree = {"$defs": {"Node": {"type": "object", "properties": {
        "label": {"type": "string"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
        "alt": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}},
        "type": "object", "properties": {"root": {"$ref": "#/$defs/Node"}}}
    req = ToolRequest((ToolSpec("draw", "", tree),), "auto")
    text = tool_instructions(req)
    assert "- draw(root?: {label?: string, children?: object[], alt?: object|null})" in text
    _, calls = parse('<tool_call>{"name": "draw", "arguments": {"root": {"label": 1, "children": '
                     '[{"label": 2, "children": "x"}]}}}</tool_call>', req)
    assert call_args(calls) == [("draw", {"root": {"label": "1", "children": [{"label": "2", "children": ["x"]}]}})]
    deep = "<tool_call>" + "[" * 5000 + "</tool_call>"
    assert parse(deep) == (deep, [])
    huge = envelope("get_weather", {"city": "x", "ratio": "1e999", "days": "1e999"})
    assert call_args(parse(huge)[1])[0][1] == {"city": "x", "ratio": "1e999", "days": "1e999"}


def test_additional_properties_false_drops_only_unknown_keys():
    _, calls = parse(envelope("search", {"query": "q", "page": 2}))
    assert call_args(calls) == [("search", {"query": "q"})]


def test_scalar_arguments_for_single_parameter_tool():
    _, calls = parse('<tool_call>{"name": "search", "arguments": "cats"}</tool_call>')
    assert call_args(calls) == [("search", {"query": "cats"})]


def test_double_wrapped_arguments_are_unwrapped():
    _, calls = parse('<tool_call>{"name": "search", "arguments": {"arguments": {"query": "q"}}}</tool_call>')
    assert call_args(calls) == [("search", {"query": "q"})]
