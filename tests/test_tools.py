import itertools
import json
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tools  # noqa: E402
from tools import (  # noqa: E402
    MAX_HOLDBACK,
    ToolCallParser,
    ToolRequest,
    ToolRequestError,
    ToolSpec,
    parse_tool_calls,
    render_tool_calls,
    render_tool_result,
    tool_instructions,
    tool_request,
)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14, "description": "Forecast days"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "detailed": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ratio": {"type": "number"},
        "filters": {
            "type": "object",
            "properties": {"kind": {"type": "string"}, "max": {"type": "integer"}},
            "required": ["kind"],
        },
        "points": {
            "type": "array",
            "items": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
        },
    },
    "required": ["city"],
}
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {"query": {"type": "string"}},
    "required": ["query"],
    "additionalProperties": False,
}


def body(**extra):
    data = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city.",
                                              "parameters": WEATHER_SCHEMA}},
            {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                              "parameters": SEARCH_SCHEMA}},
            {"type": "function", "function": {"name": "now"}},
        ],
    }
    data.update(extra)
    return data


REQ = tool_request(body())
SERIAL = tool_request(body(parallel_tool_calls=False))


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter):024d}"


def parse(text, request=REQ):
    return parse_tool_calls(text, request, id_factory=ids())


def stream(chunks, request=REQ):
    parser = ToolCallParser(request, id_factory=ids())
    pieces = []
    for chunk in chunks:
        pieces.extend(parser.feed(chunk))
    pieces.extend(parser.finish())
    return parser, pieces


def streamed(pieces):
    content = "".join(v for k, v in pieces if k == "content")
    calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
             for k, c in pieces if k == "tool_call"]
    return content or None, calls


def call_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def envelope(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


ENVELOPE_MARKS = ("<tool_call", "</tool_call", "tool_call>", '"arguments"', "```json")


# ---------------------------------------------------------------- tool_request

def test_tool_request_defaults():
    req = tool_request(body())
    assert req.choice == "auto" and req.forced_name is None and req.parallel is True
    assert [t.name for t in req.tools] == ["get_weather", "search", "now"]
    assert req.tools[0] == ToolSpec("get_weather", "Get the weather for a city.", WEATHER_SCHEMA)
    assert req.tools[2].parameters == {} and req.tools[2].description == ""


def test_tool_request_none_cases():
    assert tool_request({"model": "m", "messages": []}) is None
    assert tool_request(body(tools=[])) is None
    assert tool_request(body(tool_choice="none")) is None
    assert tool_request(body(tools=[{"type": "custom", "custom": {"name": "x"}}])) is None
    assert tool_request(body(function_call="none", tools=None,
                             functions=[{"name": "f", "parameters": {}}])) is None


def test_tool_request_ignores_custom_tools():
    data = body()
    data["tools"].append({"type": "custom", "custom": {"name": "grammar"}})
    assert [t.name for t in tool_request(data).tools] == ["get_weather", "search", "now"]


def test_tool_request_choices():
    assert tool_request(body(tool_choice="required")).choice == "required"
    named = tool_request(body(tool_choice={"type": "function", "function": {"name": "search"}}))
    assert (named.choice, named.forced_name) == ("function", "search")
    assert len(named.tools) == 3
    allowed = tool_request(body(tool_choice={"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "now"}}]}}))
    assert allowed.choice == "required" and [t.name for t in allowed.tools] == ["now"]
    assert tool_request(body(parallel_tool_calls=False)).parallel is False


def test_tool_request_legacy_functions():
    req = tool_request({"functions": [{"name": "f", "description": "d", "parameters": {"type": "object"}}],
                        "function_call": {"name": "f"}})
    assert req.legacy and req.choice == "function" and req.forced_name == "f" and req.parallel is False
    assert tool_request({"functions": [{"name": "f"}], "function_call": "auto"}).choice == "auto"


@pytest.mark.parametrize("data, param", [
    (body(tools={"type": "function"}), "tools"),
    (body(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0].function.name"),
    (body(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name"),
    (body(tools=[{"type": "function"}]), "tools[0].function"),
    (body(tools=["x"]), "tools[0]"),
    (body(tools=[{"type": "function", "function": {"name": "a", "parameters": []}}]), "tools[0].function.parameters"),
    (body(tool_choice={"type": "function", "function": {"name": "missing"}}), "tool_choice"),
    (body(tool_choice="sometimes"), "tool_choice"),
    (body(tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "missing"}}]}}), "tool_choice"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    (body(parallel_tool_calls="no"), "parallel_tool_calls"),
])
def test_tool_request_errors(data, param):
    with pytest.raises(ToolRequestError) as info:
        tool_request(data)
    assert info.value.param == param
    assert isinstance(info.value, ValueError) and str(info.value)


# ---------------------------------------------------------------- instructions

def test_instructions_auto():
    text = tool_instructions(REQ)
    assert ("- get_weather(city: string, days?: integer (1..14), unit?: \"celsius\"|\"fahrenheit\" = \"celsius\", "
            "detailed?: boolean, tags?: string[], ratio?: number, filters?: {kind: string, max?: integer}, "
            "points?: {x: number}[]) — Get the weather for a city.\n  city: City name, e.g. Paris") in text
    assert "- search(query: string) — Search the web." in text and "\n- now()\n" in text
    assert '<tool_call>\n{"name": "TOOL_NAME", "arguments": {"PARAMETER": "value"}}\n</tool_call>' in text
    assert "Call a tool only when it helps" in text
    assert "one block per call" in text
    assert "never write those yourself" in text
    assert "must call" not in text


def test_instructions_required_named_serial():
    required = tool_instructions(tool_request(body(tool_choice="required")))
    assert required.endswith("You must call at least one tool in this reply; do not answer with text only.")
    named = tool_instructions(tools.for_policy(
        tool_request(body(tool_choice={"type": "function", "function": {"name": "search"}})), "all"))
    assert named.endswith('You must call the tool "search" in this reply; do not answer with text only.')
    assert '{"name": "search", "arguments"' in named
    assert "- search(query: string)" in named and "get_weather" not in named
    serial = tool_instructions(SERIAL)
    assert "Call at most one tool per reply" in serial and "one block per call" not in serial
    assert tool_instructions(REQ, with_catalogue=False) == ""
    assert tool_instructions(tool_request(body(tool_choice="required")), with_catalogue=False) == (
        "You must call at least one tool in this reply; do not answer with text only.")


def test_policy_keeps_tools_or_forced_ones_or_none():
    forced = tool_request(body(tool_choice={"type": "function", "function": {"name": "search"}}))
    required = tool_request(body(tool_choice="required"))
    assert tools.for_policy(REQ, "all") is REQ and tools.for_policy(REQ, "forced") is None
    assert tools.for_policy(REQ, "off") is None and tools.for_policy(None, "all") is None
    assert tools.for_policy(required, "forced") is required
    assert [spec.name for spec in tools.for_policy(forced, "forced").tools] == ["search"]
    assert tools.for_policy(forced, "off") is None


def test_open_webui_catalogue_is_compact():
    """Open WebUI's 36 built-in tools: 26 KB of schema, 19,027 characters in the old rendering."""
    captured = json.loads(open(Path(__file__).with_name("data") / "open-webui-0.12.4.jsonl").readlines()[1])
    text = tool_instructions(tool_request(captured["request"]))
    assert len(text) < 7600
    assert text.count("\n- ") == 36
    assert ('- create_calendar_event(title: string, start: string, end?: string, description?: string, '
            'calendar_id?: string, all_day?: boolean = false, location?: string, reminder_minutes?: integer) — '
            'Create a calendar event, reminder, or alarm.') in text
    assert 'start: Start datetime in the user\'s local time (e.g. "2026-04-20 09:00")' in text
    assert ('create_tasks(tasks: ({id?: string, content: string, status?: "pending"|"in_progress"|"completed"|'
            '"cancelled" = "pending"})[])') in text


def test_instructions_deterministic_and_schema_features():
    assert tool_instructions(REQ) == tool_instructions(tool_request(body()))
    schema = {
        "$defs": {"Address": {"type": "object", "properties": {"street": {"type": "string"}},
                              "required": ["street"]}},
        "type": "object",
        "properties": {
            "address": {"$ref": "#/$defs/Address"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Optional\n  note"},
            "mode": {"const": "fast"},
            "when": {"type": "string", "format": "date-time"},
            "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {
                "b": {"type": "object", "properties": {"c": {"type": "integer"}}}}}}},
        },
    }
    req = ToolRequest((ToolSpec("save", "Save.", schema),), "auto")
    text = tool_instructions(req)
    assert ('- save(address?: {street: string}, note?: string|null, mode?: "fast", when?: string (date-time), '
            'deep?: {a?: {b?: object}}) — Save.') in text
    assert '\n  deep.a.b is: {"type":"object","properties":{"c":{"type":"integer"}}}\n' in text
    assert tool_instructions(ToolRequest((ToolSpec("a", "", {}),), "none")) == ""


# ---------------------------------------------------------------- recognised forms

FORMS = {
    "own envelope": envelope("get_weather", {"city": "Paris"}),
    "hermes inline": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "arguments as string": '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
    "parameters synonym": '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>',
    "attributes": '<tool_call id="call_old">{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "plural tag list": '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>',
    "openai shape in tag": '<tool_call>{"type": "function", "function": {"name": "get_weather", '
                           '"arguments": "{\\"city\\":\\"Paris\\"}"}}</tool_call>',
    "fenced call": '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    "bare fence": '```\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n',
    "fenced list": '```json\n[{"name": "get_weather", "arguments": {"city": "Paris"}}]\n```',
    "fenced HAN": '```json\n{"tool_calls": [{"id": "call_x", "type": "function", "function": '
                  '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]}\n```',
    "fenced tags": '```xml\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n```',
    "fence inside tag": '<tool_call>\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n</tool_call>',
    "prefixed name": '<tool_call>{"name": "functions.get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    "missing close tag": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "upper case tag": '<TOOL_CALL>{"name": "get_weather", "arguments": {"city": "Paris"}}</TOOL_CALL>',
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_recognised_forms(name):
    text = "Let me check.\n" + FORMS[name]
    content, calls = parse(text)
    assert content == "Let me check.\n"
    assert call_args(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0]["type"] == "function" and calls[0]["id"] == "call_" + "0" * 24


@pytest.mark.parametrize("name", sorted(FORMS))
def test_forms_stream_one_char_at_a_time(name):
    text = "Let me check.\n" + FORMS[name] + "\n\n"
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)
    shown = "".join(v for k, v in pieces if k == "content")
    assert not any(mark in shown for mark in ENVELOPE_MARKS)
    assert "`" not in shown


def test_call_alone_has_null_content():
    assert parse("\n\n" + envelope("now", {}) + "\n  ") == (None, [
        {"id": "call_" + "0" * 24, "type": "function", "function": {"name": "now", "arguments": "{}"}}])


def test_several_calls_distinct_indexes_and_ids():
    text = "I'll do both.\n" + envelope("get_weather", {"city": "Paris"}) + "\n" + envelope("search", {"query": "x"}) \
        + '\n<tool_call>{"name": "now"}'
    parser = ToolCallParser(REQ)
    pieces = parser.feed(text) + parser.finish()
    calls = [c for k, c in pieces if k == "tool_call"]
    assert [c["index"] for c in calls] == [0, 1, 2]
    assert len({c["id"] for c in calls}) == 3
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 and c["id"][5:].isalnum() for c in calls)
    assert [c["name"] for c in calls] == ["get_weather", "search", "now"]
    assert parser.called


def test_duplicate_ids_from_factory_are_made_distinct():
    parser = ToolCallParser(REQ, id_factory=lambda: "call_same")
    pieces = parser.feed(envelope("now", {}) + envelope("now", {})) + parser.finish()
    assert len({c["id"] for k, c in pieces if k == "tool_call"}) == 2


def test_calls_are_emitted_as_soon_as_closed():
    parser = ToolCallParser(REQ, id_factory=ids())
    assert parser.feed("Checking.\n<tool_call>\n") == [("content", "Checking.\n")]
    assert parser.feed('{"name": "now", "arguments": {}}\n') == []
    pieces = parser.feed("</tool_call>")
    assert pieces == [("tool_call", {"index": 0, "id": "call_" + "0" * 24, "name": "now", "arguments": "{}"})]
    assert parser.finish() == []


def test_text_before_and_after_calls():
    content, calls = parse("Sure:\n" + envelope("now", {}) + "\n\nThen I will summarise.")
    assert content == "Sure:\n\n\nThen I will summarise."
    assert len(calls) == 1
    assert parse("Sure:" + envelope("now", {}) + "   \n")[0] == "Sure:"


def test_parallel_false_keeps_only_the_first_call():
    content, calls = parse(envelope("now", {}) + "\n" + envelope("search", {"query": "q"}), SERIAL)
    assert content is None and call_args(calls) == [("now", {})]


def test_hallucinated_result_after_a_call_is_dropped():
    text = envelope("now", {}) + '\n<tool_result name="now">\n12:00\n</tool_result>\nIt is noon.'
    assert parse(text)[0] is None
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


def test_stray_close_tag_after_call_is_dropped():
    content, calls = parse('<tool_call>{"name": "now"}</tool_call></tool_call>\nDone.')
    assert content == "\nDone." and len(calls) == 1


def test_missing_close_tag_before_next_call():
    text = '<tool_call>{"name": "now"}\n<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>'
    assert call_args(parse(text)[1]) == [("now", {}), ("search", {"query": "a"})]


def test_no_tools_text_is_never_held():
    parser = ToolCallParser(REQ)
    assert parser.feed("Hello, world. a < b, <div> and x<y") == [("content", "Hello, world. a < b, <div> and x<y")]
    assert parser.feed(" see <to") == [("content", " see ")]
    assert parser.held == 3
    assert parser.feed("p>") == [("content", "<top>")]
    assert parser.feed("\n``") == [("content", "\n")]
    assert parser.feed("`python\n") == [("content", "```python\n")]
    assert parser.finish() == []
    assert not parser.called


def test_code_blocks_and_tag_mentions_are_not_held():
    parser = ToolCallParser(REQ)
    assert parser.feed("Run:\n```\nnpm install\n") == [("content", "Run:\n```\nnpm install\n")]
    assert parser.feed("```\n") == [("content", "```\n")]
    assert parser.feed("```xml\n<root/>") == [("content", "```xml\n<root/>")]
    assert parser.feed("\n```\nWrite <tool_call> then") == [("content", "\n```\nWrite <tool_call> then")]
    assert parser.feed(" JSON.\n```json\n") == [("content", " JSON.\n")]
    assert parser.feed('"just a string"') == [("content", '```json\n"just a string"')]
    assert parser.finish() == []


def test_wrapper_tag_around_calls():
    text = "<tool_calls>\n" + envelope("now", {}) + "\n" + envelope("search", {"query": "q"}) + "\n</tool_calls>\n"
    assert parse(text) == (None, parse(envelope("now", {}) + envelope("search", {"query": "q"}))[1])
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


def test_unclosed_envelope_followed_by_text():
    text = 'Ok.\n<tool_call>{"name": "now", "arguments": {}}\nI am waiting for the time.'
    content, calls = parse(text)
    assert content == "Ok.\n\nI am waiting for the time." and call_args(calls) == [("now", {})]


def test_plain_answer_passes_through_verbatim():
    text = "  Indented start.\n\n```python\nprint('<b>')\n```\n\nEnd with spaces  \n"
    assert parse(text) == (text, [])
    _, pieces = stream(text)
    assert streamed(pieces) == (text, [])


# ---------------------------------------------------------------- repair and coercion

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


# ---------------------------------------------------------------- things that stay text

@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',
    '<tool_call>not json at all</tool_call>',
    '<tool_call>{"name": "get_weather", "description": "x", "parameters": {"type": "object"}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": ["a", "b"]}</tool_call>',
    '<tool_call></tool_call>',
])
def test_invalid_envelopes_stay_text(text):
    full = "Before. " + text + " After."
    assert parse(full) == (full, [])
    _, pieces = stream(full)
    assert streamed(pieces) == (full, [])


@pytest.mark.parametrize("tail", [
    '<tool_call>{"name": "search", "arguments": {"query": "weather in Par',
    '<tool_call>{"name": "sea',
    "<tool_call",
    "<tool_call>",
    '<tool_call id="x',
    '```json\n{"name": "search", "arguments": {"query": "cut',
    "```js",
    "\n``",
])
def test_broken_envelope_at_end_is_released(tail):
    text = "Partial answer. " + tail
    assert parse(text) == (text, [])
    parser, pieces = stream(text)
    assert streamed(pieces) == (text, []) and not parser.called


def test_fenced_non_call_json_stays_content():
    text = 'Here is the JSON you asked for:\n```json\n{"name": "Alice", "age": 30}\n```\nAnything else?'
    assert parse(text) == (text, [])
    parser = ToolCallParser(REQ)
    out = parser.feed('Here is the JSON you asked for:\n```json\n{"name": "Alice",')
    assert out == [("content", "Here is the JSON you asked for:\n")]
    assert parser.feed(' "age": 30}\n') == []
    assert parser.feed("```\nAny") == [("content", '```json\n{"name": "Alice", "age": 30}\n```\nAny')]


def test_tool_definition_in_fence_is_not_a_call():
    text = '```json\n{"name": "get_weather", "description": "Get the weather", "parameters": {}}\n```'
    assert parse(text) == (text, [])


def test_code_block_closing_fence_is_not_an_opening():
    text = "```python\nprint(1)\n```\n" + envelope("now", {})
    content, calls = parse(text)
    assert content == "```python\nprint(1)\n```\n" and len(calls) == 1
    _, pieces = stream(text)
    assert streamed(pieces) == parse(text)


# ---------------------------------------------------------------- history rendering round trip

def test_render_tool_calls_round_trip():
    history = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
        {"id": "call_3", "type": "function", "function": {"name": "search", "arguments": '{"query": "é \\"q\\""}'}},
    ]
    text = render_tool_calls(history)
    assert text.count("<tool_call>") == 3 and '"id": "call_1"' in text
    content, calls = parse(text)
    assert content is None
    assert call_args(calls) == [("get_weather", {"city": "Paris", "days": 2}), ("now", {}),
                                ("search", {"query": 'é "q"'})]
    assert render_tool_calls([]) == ""


def test_render_tool_result():
    names = {"call_1": "get_weather"}
    text = render_tool_result({"role": "tool", "tool_call_id": "call_1", "content": "18C"}, names)
    assert text == '<tool_result id="call_1" name="get_weather">\n18C\n</tool_result>'
    parts = render_tool_result({"role": "tool", "tool_call_id": "call_1",
                                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, names)
    assert parts == '<tool_result id="call_1" name="get_weather">\na\nb\n</tool_result>'
    legacy = render_tool_result({"role": "function", "name": "now", "content": None}, {})
    assert legacy == '<tool_result name="now">\n\n</tool_result>'
    quoted = render_tool_result({"role": "tool", "tool_call_id": 'x"y', "content": "r"}, {})
    assert 'id="x&quot;y"' in quoted


def test_rendered_history_with_result_parses_as_calls_then_stops():
    calls = [{"id": "call_9", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    text = render_tool_calls(calls) + "\n" + render_tool_result(
        {"role": "tool", "tool_call_id": "call_9", "content": "noon"}, {"call_9": "now"})
    content, parsed = parse(text)
    assert content is None and call_args(parsed) == [("now", {})]


# ---------------------------------------------------------------- streaming equals non-streaming

SAMPLES = [
    "Plain answer with <b>html</b> and `code` and\n```js\nx < y\n```\n",
    "Let me look.\n\n" + envelope("get_weather", {"city": "Paris", "days": "2"}) + "\n",
    envelope("now", {}) + envelope("search", {"query": "</tool"}),
    'Here:\n```json\n{"name": "search", "arguments": {"query": "q"}}\n```\nand ```json\n{"a": 1}\n```\n',
    '```json\n{"a": [1, 2,\n```\ntext <tool_call>{"name": "nope"}</tool_call> more',
    "<tool_call>" + envelope("now", {})[11:] + "</tool_call>trailing",
    "Two: " + envelope("now", {}) + "\n" + envelope("now", {}) + "\n<tool_result>x</tool_result>",
    "\n   \n" + '<tool_call>{"name": "get_weather", "arguments": {"city": "A"',
    "x <tool_calls\n>[]</tool_calls> y <tool_call attr='1'>{\"name\": \"now\"}</tool_call>",
    "   ```\n" + '{"name": "now"}' + "\n   ```   \nok",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_one_char_at_a_time_matches(text):
    parser, pieces = stream(text)
    assert streamed(pieces) == parse(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_every_split_point_matches(text):
    expected = parse(text)
    for i in range(len(text) + 1):
        assert streamed(stream([text[:i], text[i:]])[1]) == expected, i


def chunkings(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0] + points + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES + list(FORMS.values())), st.lists(st.integers(0, 10_000), max_size=30))
def test_random_chunkings_of_samples(text, cuts):
    assert streamed(stream(chunkings(text, cuts))[1]) == parse(text)


CALLS = st.one_of(
    st.builds(lambda q: ("search", {"query": q}), st.text(alphabet="ab <>{}\"'`\n\\", max_size=8)),
    st.builds(lambda c, d: ("get_weather", {"city": c, "days": d}), st.text(alphabet="xyz é", max_size=5),
              st.integers(0, 99)),
    st.just(("now", {})),
)
FORM_WRITERS = [
    lambda n, a: envelope(n, a),
    lambda n, a: "<tool_call>" + json.dumps({"name": n, "arguments": a}) + "</tool_call>",
    lambda n, a: "<tool_call>" + json.dumps({"name": n, "arguments": json.dumps(a)}) + "</tool_call>",
    lambda n, a: "\n```json\n" + json.dumps({"name": n, "arguments": a}) + "\n```\n",
    lambda n, a: "\n```\n" + json.dumps([{"name": n, "arguments": a}]) + "\n```\n",
    lambda n, a: "<tool_calls>" + json.dumps([{"name": n, "parameters": a}]) + "</tool_calls>",
]
TEXTS = st.text(alphabet="ab .<>/{}\n\"`", max_size=12).filter(lambda t: "``" not in t)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(TEXTS, CALLS, st.integers(0, len(FORM_WRITERS) - 1)), max_size=4), TEXTS,
       st.lists(st.integers(0, 10_000), max_size=20))
def test_generated_replies(segments, tail, cuts):
    text = "".join(t + FORM_WRITERS[f](n, a) for t, (n, a), f in segments) + tail
    expected = parse(text)
    parser, pieces = stream(chunkings(text, cuts))
    assert streamed(pieces) == expected
    content, calls = expected
    assert call_args(calls) == [(n, a) for _, (n, a), _ in segments]
    assert [c["id"] for c in calls] == ["call_%024d" % i for i in range(len(calls))]
    shown = content or ""
    plain = "".join(t for t, _, _ in segments) + tail
    assert "".join(shown.split()) == "".join(plain.split())
    if segments:
        assert "<tool_call" not in shown and '"arguments"' not in shown and '"parameters"' not in shown


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<", "tool_call", "tool_calls", "tool_result", ">", "</", "`", "```", "json",
                                  "\n", "  ", "{", "}", '"name"', ":", '"now"', ",", " x", "[", "]"]), max_size=40),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_adversarial_text_streams_like_one_shot(pieces, cuts):
    text = "".join(pieces)
    assert streamed(stream(chunkings(text, cuts))[1]) == parse(text)


# ---------------------------------------------------------------- holdback bound

def max_held(text, request=REQ):
    parser = ToolCallParser(request)
    worst = 0
    for ch in text:
        parser.feed(ch)
        worst = max(worst, parser.held)
    parser.finish()
    return worst


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<", "tool_call", "tool_calls", "tool_result", "/", ">", " ", "\n", "\t", "`",
                                  "json", 'id="', "x", "\"", "{}"]), max_size=60).map("".join))
def test_holdback_is_bounded(text):
    assert max_held(text) <= MAX_HOLDBACK
    assert max_held(envelope("now", {}) + text) <= MAX_HOLDBACK


def test_holdback_measured():
    assert MAX_HOLDBACK == 79
    assert max_held("Hi <tool_calls") == 11
    assert max_held(envelope("now", {}) + "</tool_calls") == 12
    assert max_held("x\n   ```tool_calls  \r") == 19
    assert max_held("x\n   ```tool_calls" + " " * 7 + "\r") == 24  # FENCE_LINE_MAX
    assert max_held("x\n   ```tool_calls" + " " * 20) == 24
    assert max_held(" " * 16 + "<tool_call " + "a" * 51) == 16 + 62
    assert max_held(" " * 16 + "<tool_call " + "a" * 52) == MAX_HOLDBACK
    assert max_held(" " * 16 + "<tool_call " + "a" * 60) == MAX_HOLDBACK
    assert max_held("Ordinary prose, with punctuation; no tags at all.\nSecond line.") == 0


def test_feed_is_linear():
    text = ("Some ordinary text with a < sign and `code`.\n" * 2000)
    parser = ToolCallParser(REQ)
    started = time.perf_counter()
    out = [parser.feed(ch) for ch in text]
    parser.finish()
    elapsed = time.perf_counter() - started
    assert "".join(v for pieces in out for _, v in pieces) == text
    assert elapsed < 5


def test_long_envelope_streams_in_linear_time():
    arguments = {"query": "q" * 100_000}
    text = envelope("search", arguments)
    started = time.perf_counter()
    _, pieces = stream([text[i:i + 7] for i in range(0, len(text), 7)])
    assert time.perf_counter() - started < 5
    assert call_args(streamed(pieces)[1]) == [("search", arguments)]


def test_module_names():
    for name in ("ToolSpec", "ToolRequest", "ToolRequestError", "tool_request", "tool_instructions",
                 "render_tool_calls", "render_tool_result", "ToolCallParser", "parse_tool_calls"):
        assert hasattr(tools, name)
