"""tool_history.py: past calls and results rendered in the protocol, and read back by the parser."""

from tool_history import render_tool_calls, render_tool_result
from tool_samples import call_args, parse


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
