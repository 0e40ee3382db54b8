"""OpenAI function calling and prompt-mode MCP clients, end to end over a Dify chat app."""

import json

import openai
import pytest

import marks
from fake_dify import End, Event, Text
from support import sse_events

CHAT = "Chat Bot"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}\n</tool_call>'


def script(harness, *pieces):
    harness.dify.script(harness.key_of(CHAT), Text(*pieces), End())


def ask(harness, messages, **kwargs):
    return harness.client().chat.completions.create(model=CHAT, messages=messages, tools=[WEATHER, TIME], **kwargs)


def test_non_streaming_tool_call(harness):
    script(harness, "Let me check. ", CALL[:20], CALL[20:])
    answer = ask(harness, [{"role": "user", "content": "Weather in Paris?"}])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.strip() == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}, "\"2\" coerced to the schema's integer"
    query = harness.chat_bodies()[-1]["query"]
    assert query.startswith("Weather in Paris?\n\n# Tools")
    assert "\n- get_weather(city: string, days?: integer) — Current weather for a city.\n" in query
    assert "\n- get_time(zone?: string)\n" in query and "<tool_call>" in query


def test_streaming_tool_call_deltas_on_the_wire(harness):
    script(harness, "Checking", " now.\n<tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Paris\"}}",
           "\n</tool_call>")
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "tools": [WEATHER], "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(body)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.strip() == "Checking now." and "<" not in content
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(c) == {"index", "function"} and "name" not in c["function"] for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "[DONE]"


def test_stream_helper_assembles_several_calls(harness):
    script(harness, "```json\n[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\",}},",
           " {\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}]\n```")
    with harness.client().chat.completions.stream(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                  tools=[WEATHER, TIME]) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}, "trailing comma repaired"
    assert len({c.id for c in calls}) == 2
    assert final.choices[0].finish_reason == "tool_calls" and not final.choices[0].message.content


def test_hermes_blocks_give_distinct_indexes(harness):
    script(harness, CALL + "\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>")
    _, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "tools": [WEATHER, TIME], "messages": [{"role": "user", "content": "x"}]})
    firsts = [d["tool_calls"][0] for e in sse_events(body)[:-1] if e["choices"]
              for d in [e["choices"][0]["delta"]] if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [f["index"] for f in firsts] == [0, 1] and firsts[0]["id"] != firsts[1]["id"]


def test_unknown_tool_and_broken_envelope_stay_text(harness):
    script(harness, "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>")
    answer = ask(harness, [{"role": "user", "content": "x"}])
    assert answer.choices[0].finish_reason == "stop" and "rm_rf" in answer.choices[0].message.content
    script(harness, "Sure: <tool_call>{\"name\": \"get_weather\", \"argu")
    stream = ask(harness, [{"role": "user", "content": "x"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Sure: <tool_call>{\"name\": \"get_weather\", \"argu" and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("choice, expected", [
    ("required", "You must call at least one tool"),
    ({"type": "function", "function": {"name": "get_time"}}, 'You must call the tool "get_time"'),
])
def test_tool_choice_shapes_the_instructions(harness, choice, expected):
    ask(harness, [{"role": "user", "content": "x"}], tool_choice=choice)
    assert expected in harness.chat_bodies()[-1]["query"]


def test_tool_choice_none_sends_no_tools_and_parses_nothing(harness):
    script(harness, CALL)
    answer = ask(harness, [{"role": "user", "content": "x"}], tool_choice="none")
    assert "# Tools" not in harness.chat_bodies()[-1]["query"]
    assert answer.choices[0].message.tool_calls is None and "<tool_call>" in answer.choices[0].message.content


def test_bad_tools_are_a_400_with_param(harness):
    with pytest.raises(openai.BadRequestError) as caught:
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                 tools=[WEATHER], tool_choice={"type": "function",
                                                                               "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"


def run_loop(harness):
    """Call, tool result, final answer: returns the three request messages lists' Dify bodies."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    script(harness, CALL)
    first = ask(harness, messages).choices[0].message
    assert first.tool_calls
    messages.append(first.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18C, cloudy"})
    script(harness, "It is 18C and cloudy.")
    final = ask(harness, messages).choices[0]
    assert final.finish_reason == "stop" and final.message.content.startswith("It is 18C and cloudy.")
    return first, harness.chat_bodies()[-1]


def test_two_request_loop_in_mode_one(harness):
    first, sent = run_loop(harness)
    query = sent["query"]
    assert sent["conversation_id"] == "" and query.count("Be brief.") == 1
    call_at = query.index('"name": "get_weather"')
    result_at = query.index(f'<tool_result id="{first.tool_calls[0].id}" name="get_weather">\n18C, cloudy')
    assert call_at < result_at


def test_two_request_loop_in_mode_two(make_harness):
    harness = make_harness(env={"CONVERSATION_MEMORY_MODE": "2"})
    first, sent = run_loop(harness)
    assert marks.has_mark_characters(first.content or "")
    assert sent["conversation_id"] != ""
    assert sent["query"].startswith(f'<tool_result id="{first.tool_calls[0].id}" name="get_weather">\n18C, cloudy')
    assert "Be brief." not in sent["query"] and "Weather in Paris?" not in sent["query"]


MCP_SYSTEM = """In this environment you have access to a set of tools you can use to answer the user's question.
Tool use is formatted using XML-style tags. The tool name is enclosed in opening and closing tags:
<tool_use>
  <name>{tool_name}</name>
  <arguments>{json_arguments}</arguments>
</tool_use>
## Tool Use Available Tools
<tools>
<tool><name>fetch_url</name><description>Fetch a web page</description></tool>
</tools>"""
MCP_REPLY = '<tool_use>\n  <name>fetch_url</name>\n  <arguments>{"url": "https://example.com"}</arguments>\n</tool_use>'


@pytest.mark.parametrize("memory_mode", ["1", "2"])
def test_prompt_mode_mcp_client_transcript(make_harness, memory_mode):
    harness = make_harness(env={"CONVERSATION_MEMORY_MODE": memory_mode})
    client = harness.client()
    messages = [{"role": "system", "content": MCP_SYSTEM}, {"role": "user", "content": "What is on example.com?"}]
    harness.dify.script(harness.key_of(CHAT), Text(MCP_REPLY[:30], MCP_REPLY[30:]), End())
    stream = client.chat.completions.create(model=CHAT, messages=messages, stream=True)
    reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert marks.strip_marks(reply).strip() == MCP_REPLY, "the XML call comes back untouched"
    assert harness.chat_bodies()[-1]["query"].count(MCP_SYSTEM) == 1
    messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": '<tool_use_result>\n  <name>fetch_url</name>\n  <result>Example Domain'
                                                '</result>\n</tool_use_result>'})
    harness.dify.script(harness.key_of(CHAT), Text("It shows Example Domain."), End())
    answer = client.chat.completions.create(model=CHAT, messages=messages)
    assert answer.choices[0].message.content.startswith("It shows Example Domain.")
    query = harness.chat_bodies()[-1]["query"]
    assert "<result>Example Domain</result>" in query
    assert query.count(MCP_SYSTEM) == (1 if memory_mode == "1" else 0), "the system prompt once per conversation"


def test_dify_agent_tools_never_become_client_tool_calls(harness):
    harness.dify.script(harness.key_of("Agent Bot"),
                        Event({"event": "agent_thought", "id": "t1", "position": 1, "thought": "use search",
                               "tool": "google_search", "tool_input": "{\"google_search\": {\"query\": \"x\"}}",
                               "observation": "", "message_files": []}),
                        Text("Found it."), End())
    answer = harness.client().chat.completions.create(model="Agent Bot", messages=[{"role": "user", "content": "x"}],
                                                      tools=[WEATHER])
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "Found it."


def test_legacy_functions_get_a_function_call(harness):
    functions = [WEATHER["function"]]
    script(harness, CALL)
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                      functions=functions)
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris", "days": 2}
    script(harness, CALL)
    chunks = list(harness.client().chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "x"}], functions=functions, stream=True))
    calls = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert calls[0].name == "get_weather" and json.loads("".join(c.arguments for c in calls))["city"] == "Paris"
    assert chunks[-1].choices[0].finish_reason == "function_call"
