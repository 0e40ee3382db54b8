"""The Responses API (POST /v1/responses) end to end: the real server, the fake Dify, the openai SDK and raw HTTP;
every streamed event and response object validated against the OpenAI spec's own JSON schemas."""

import base64
import json
import os
import struct
import zlib

import jsonschema
import openai
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from fake_dify import End, Event, FakeApp, Hang, Sleep, Text
from support import CLIENT_KEY, OTHER_CLIENT_KEY, open_raw_stream, wait_for

CHAT = "Chat Bot"
PNG = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
       + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))))
SPEC = json.load(open(os.path.join(os.path.dirname(__file__), "data", "openai_responses_schemas.json")))
SDK_EVENT = TypeAdapter(ResponseStreamEvent)
_REGISTRY = Registry().with_resource("spec", Resource.from_contents(SPEC, default_specification=DRAFT202012))


def validator(name):
    return jsonschema.Draft202012Validator({"$ref": f"spec#/components/schemas/{name}"}, registry=_REGISTRY)


def check_response(body):
    validator("Response").validate(body)
    return body


def sse(body):
    """(event name, data) pairs of a Responses event stream; every event checked against its spec schema."""
    events = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        validator(SPEC["events"][name]).validate(data)
        assert SDK_EVENT.validate_python(data, strict=True).type == name, "the openai SDK's own event types"
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def strict(harness, key=CLIENT_KEY):
    """The openai SDK with strict response validation: every body must match the SDK's own types."""
    return harness.client(key, _strict_response_validation=True)


def post(harness, body, **kwargs):
    return harness.raw("POST", "/v1/responses", {"model": CHAT, **body}, **kwargs)


def test_string_input_non_streaming(harness):
    response = strict(harness).responses.create(model=CHAT, input="Hello there")
    assert response.status == "completed" and response.output_text == "Echo: Hello there"
    assert response.id.startswith("resp_") and response.object == "response"
    assert harness.chat_bodies()[-1]["query"] == "Hello there"
    status, _, body = post(harness, {"input": "Hi"})
    data = check_response(json.loads(body))
    assert status == 200 and data["output"][0]["content"][0]["text"] == "Echo: Hi"
    assert data["usage"]["total_tokens"] == data["usage"]["input_tokens"] + data["usage"]["output_tokens"]


def test_stream_events_in_order(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Hel", "lo ", "world"), End())
    status, headers, body = post(harness, {"input": "Hi", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(body)
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello world"
    done = events[-1]["response"]
    assert done["id"] == events[0]["response"]["id"] and done["output"][0]["content"][0]["text"] == "Hello world"
    assert b"[DONE]" not in body


def test_sdk_stream_helper(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Hel", "lo"), End())
    with strict(harness).responses.stream(model=CHAT, input="Hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello" and final.output_text == "Hello"


# --- every app mode --------------------------------------------------------------------------

AGENT, FLOW, WRITER, PIPELINE = "Agent Bot", "Flow Bot", "Writer", "Pipeline"


@pytest.fixture
def modes(make_harness):
    return make_harness(apps=[FakeApp(key="app-chat0000000000000000000000", name=CHAT, mode="chat"),
                              FakeApp(key="app-agent000000000000000000000", name=AGENT, mode="agent-chat"),
                              FakeApp(key="app-flow0000000000000000000000", name=FLOW, mode="advanced-chat"),
                              FakeApp(key="app-writer00000000000000000000", name=WRITER, mode="completion"),
                              FakeApp(key="app-pipe0000000000000000000000", name=PIPELINE, mode="workflow")])


@pytest.mark.parametrize("model", [CHAT, AGENT, FLOW, WRITER, PIPELINE])
def test_every_mode_streaming_and_not(modes, model):
    response = strict(modes).responses.create(model=model, input="Bonjour")
    assert response.output_text == "Echo: Bonjour" and response.status == "completed"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens > 0
    _, _, body = post(modes, {"model": model, "input": "Bonjour", "stream": True})
    events = sse(body)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Echo: Bonjour"
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["usage"]["total_tokens"] > 0


def agent_run():
    def thought(position, **fields):
        return Event({"event": "agent_thought", "id": f"th-{position}", "position": position, "thought": "",
                      "observation": "", "tool": "", "tool_labels": {}, "tool_input": "", "message_files": [],
                      **fields})
    search = {"tool": "search", "tool_input": '{"search": {"q": "cats"}}'}
    return [thought(1), Text("Let me look."), thought(1, thought="Let me look.", **search),
            thought(1, thought="Let me look.", observation='{"search": "Cats purr."}', **search),
            thought(2), Text("Cats purr."), thought(2, thought="Cats purr."),
            End(usage={"prompt_tokens": 300, "completion_tokens": 25})]


def test_agent_work_is_a_reasoning_item_streaming_and_not(modes):
    modes.dify.script(modes.key_of(AGENT), *agent_run())
    response = check_response(json.loads(post(modes, {"model": AGENT, "input": "Cats?"})[2]))
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "message"]
    assert "Calling **search**" in response["output"][0]["summary"][0]["text"]
    assert response["output"][1]["content"][0]["text"] == "Let me look.Cats purr."
    assert response["usage"]["input_tokens"] == 300 and response["usage"]["output_tokens"] == 25
    modes.dify.script(modes.key_of(AGENT), *agent_run())
    events = sse(post(modes, {"model": AGENT, "input": "Cats?", "stream": True})[2])
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "reasoning", "message"], "in the order they ran"
    summary = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert summary == final["output"][1]["summary"][0]["text"] and "Calling **search**" in summary
    added = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [item["id"] for item in final["output"]]


def test_think_tags_become_a_reasoning_item(harness):
    harness.dify.script(harness.key_of(CHAT), Text("<think>\nPonder", "ing.\n</think>\n\nHi!"), End())
    response = strict(harness).responses.create(model=CHAT, input="hi")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "Pondering." and response.output_text == "Hi!"


# --- input items -----------------------------------------------------------------------------

def test_items_roles_and_parts_reach_dify_folded(harness):
    strict(harness).responses.create(model=CHAT, instructions="Be terse.", input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "secret thoughts"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Salut",
                                                               "annotations": []}]},
        {"role": "system", "content": "No emojis."},
        {"role": "user", "content": "Weather?"}])
    query = harness.chat_bodies()[-1]["query"]
    assert query == ("<system>\nBe terse.\n\nAnswer in French.\n\nNo emojis.\n</system>\n\n<history>\n<user>\nHi\n"
                     "</user>\n<assistant>\nSalut\n</assistant>\n</history>\n\nWeather?")


def test_input_image_by_url_reaches_dify_as_a_remote_file(harness):
    url = "https://images.example/cat.png"
    strict(harness).responses.create(model=CHAT, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}])
    sent = harness.chat_bodies()[-1]
    assert sent["files"] == [{"type": "image", "transfer_method": "remote_url", "url": url}]
    assert sent["query"].startswith("What is this?")


def test_input_file_is_uploaded_and_refusals_name_the_input_item(harness):
    data = "data:image/png;base64," + base64.b64encode(PNG).decode()
    strict(harness).responses.create(model=CHAT, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Describe"}, {"type": "input_file", "filename": "cat.png", "file_data": data}]}])
    (upload,) = harness.dify.uploads.values()
    assert upload.data == PNG and upload.filename == "cat.png"
    assert harness.chat_bodies()[-1]["files"][0]["transfer_method"] == "local_file"
    status, _, body = post(harness, {"instructions": "x", "input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "notes.txt", "file_data": "data:text/plain;base64,SGVsbG8="}]}]})
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "file_type_not_allowed" and error["param"] == "input[0].content[0]"
    assert "(input[0].content[0])" in error["message"] and "messages" not in error["message"]


@pytest.mark.parametrize("body, param, words", [
    ({}, "input", "'input' is required"),
    ({"input": "  "}, "input", "empty"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "robot"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content", "string or an array"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0].image_url", "file ids"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id", "call_id"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "'web_search_preview'"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format", "yaml"),
    ({"input": "x", "instructions": 3}, "instructions", "string"),
    ({"input": "x", "model": ""}, "model", "model"),
])
def test_bad_requests_are_clear_400s_before_dify(harness, body, param, words):
    status, headers, data = post(harness, body)
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == param and words in error["message"], error
    assert headers["content-type"].startswith("application/json") and not harness.chat_bodies()


def test_unknown_fields_are_tolerated_and_echoed_fields_kept(harness):
    status, _, body = post(harness, {"input": "x", "client_metadata": {"a": 1}, "prompt_cache_key": "abc",
                                     "reasoning": {"effort": "high", "summary": "auto"}, "store": False,
                                     "include": ["reasoning.encrypted_content"], "metadata": {"ticket": "42"},
                                     "user": "alice", "temperature": 0.2, "something_new": [1, 2]})
    data = check_response(json.loads(body))
    assert status == 200 and data["metadata"] == {"ticket": "42"} and data["store"] is False
    assert data["temperature"] == 0.2 and data["user"] == "alice"
    assert harness.chat_bodies()[-1]["user"].endswith(":alice")


def test_auth_cors_and_unknown_model(harness):
    status, _, body = post(harness, {"input": "x"}, key=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, headers, _ = harness.raw("OPTIONS", "/v1/responses", key=None, headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    status, headers, _ = post(harness, {"input": "x"}, headers={"Origin": "https://ui.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    with pytest.raises(openai.NotFoundError) as caught:
        strict(harness).responses.create(model="nope", input="x")
    assert caught.value.code == "model_not_found"
    status, _, body = harness.raw("POST", "/v1/responses", b"{oops")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"


# --- structured output -----------------------------------------------------------------------

def test_text_format_json_schema_is_asked_of_the_model(harness):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    harness.dify.script(harness.key_of(CHAT), Text('{"city": "Paris"}'), End())
    response = strict(harness).responses.create(model=CHAT, input="Capital of France?", text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    query = harness.chat_bodies()[-1]["query"]
    assert query.startswith("Capital of France?\n\n") and "JSON Schema (answer)" in query
    assert json.dumps(schema, separators=(",", ":")) in query
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert response.text.format.type == "json_schema"
    strict(harness).responses.create(model=CHAT, input="x", text={"format": {"type": "json_object"}})
    assert "one valid JSON object" in harness.chat_bodies()[-1]["query"]


def test_chat_response_format_is_asked_of_the_model_too(harness):
    strict(harness).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                             response_format={"type": "json_object"})
    assert harness.chat_bodies()[-1]["query"].endswith("no Markdown code fences.")


# --- failures ----------------------------------------------------------------------------------

def test_failure_after_the_start_is_response_failed(modes):
    modes.dify.script(modes.key_of(FLOW), Text("Partial "), End(status="failed", error="LLM node timed out"))
    status, _, body = post(modes, {"model": FLOW, "input": "x", "stream": True})
    events = sse(body)
    assert status == 200 and events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "LLM node timed out" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Partial "
    modes.dify.script(modes.key_of(FLOW), Text("Partial "), End(status="failed", error="LLM node timed out"))
    with strict(modes).responses.stream(model=FLOW, input="x") as stream:
        seen = [event for event in stream]
    assert seen[-1].type == "response.failed" and "LLM node timed out" in seen[-1].response.error.message


def test_failure_before_the_start_is_an_http_error(modes):
    modes.dify.script(modes.key_of(FLOW), End(status="failed", error="LLM node timed out"))
    status, headers, body = post(modes, {"model": FLOW, "input": "x", "stream": True})
    assert status == 502 and "LLM node timed out" in json.loads(body)["error"]["message"]


# --- function tools and the tool loop ------------------------------------------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}
CODEX_EXTRAS = [{"type": "web_search", "external_web_access": False},
                {"type": "namespace", "name": "mcp__files", "description": "files", "tools": [WEATHER]},
                {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark",
                                                                      "definition": "start: /.+/"}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EXEC_CALL = '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo codex-was-here"}}\n</tool_call>'


def test_function_tools_are_offered_and_other_types_left_out(harness):
    strict(harness).responses.create(model=CHAT, input="Weather?", tools=[WEATHER, *CODEX_EXTRAS],
                                      tool_choice="auto")
    query = harness.chat_bodies()[-1]["query"]
    assert query.startswith("Weather?\n\n# Tools") and "- get_weather(city: string)" in query
    assert "web_search" not in query and "apply_patch" not in query and "mcp__files" not in query


@pytest.mark.parametrize("choice", [{"type": "web_search"}, {"type": "custom", "name": "apply_patch"},
                                    {"type": "mcp", "server_label": "x"}])
def test_forcing_a_tool_that_is_not_a_function_is_a_400_naming_it(harness, choice):
    with pytest.raises(openai.BadRequestError) as caught:
        strict(harness).responses.create(model=CHAT, input="x", tools=[WEATHER, *CODEX_EXTRAS], tool_choice=choice)
    assert f"'{choice['type']}' tool" in caught.value.message and caught.value.param == "tool_choice"
    assert not harness.chat_bodies()


def test_forced_function_and_parallel_calls_reach_the_instructions(harness):
    strict(harness).responses.create(model=CHAT, input="x", tools=[WEATHER], parallel_tool_calls=False,
                                      tool_choice={"type": "function", "name": "get_weather"})
    query = harness.chat_bodies()[-1]["query"]
    assert 'You must call the tool "get_weather"' in query and "at most one tool per reply" in query
    with pytest.raises(openai.BadRequestError):
        strict(harness).responses.create(model=CHAT, input="x", tools=[WEATHER],
                                          tool_choice={"type": "function", "name": "nope"})


def test_function_call_item_non_streaming(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Checking. ", CALL[:15], CALL[15:]), End())
    response = strict(harness).responses.create(model=CHAT, input="Weather in Paris?", tools=[WEATHER])
    check_response(response.model_dump(mode="json", exclude_unset=True))
    message, call = response.output
    assert message.type == "message" and response.output_text.strip() == "Checking."
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"


def test_function_call_events_streaming(harness):
    harness.dify.script(harness.key_of(CHAT), Text(CALL[:20], CALL[20:]), End())
    events = sse(post(harness, {"input": "x", "tools": [WEATHER], "stream": True})[2])
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    added, done = events[2]["item"], events[5]["item"]
    assert added["status"] == "in_progress" and added["arguments"] == "" and done["status"] == "completed"
    assert json.loads(events[4]["arguments"]) == {"city": "Paris"} and events[4]["name"] == "get_weather"
    assert events[-1]["response"]["output"] == [done]


def history_with_call(call_id):
    return [{"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": call_id, "output": "18 C, sunny"}]


@pytest.mark.parametrize("memory_mode", ["1", "2"])
def test_resent_history_tool_loop_in_both_memory_modes(make_harness, memory_mode):
    harness = make_harness(env={"CONVERSATION_MEMORY_MODE": memory_mode})
    harness.dify.script(harness.key_of(CHAT), Text(CALL), End())
    first = strict(harness).responses.create(model=CHAT, input="Weather in Paris?", tools=[WEATHER], store=False)
    call = first.output[-1]
    assert "\u2060" not in json.dumps(first.model_dump()), "no conversation marks in the Responses API"
    strict(harness).responses.create(model=CHAT, input=history_with_call(call.call_id), tools=[WEATHER],
                                      store=False)
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == "", "store: false works as memory mode 1"
    query = sent["query"]
    tool_call = query.index('<tool_call>\n{"id": "%s", "name": "get_weather"' % call.call_id)
    result = query.index('<tool_result id="%s" name="get_weather">\n18 C, sunny\n</tool_result>' % call.call_id)
    assert 0 < tool_call < result and query.index("Weather in Paris?") < tool_call


# --- previous_response_id ------------------------------------------------------------------------

@pytest.mark.parametrize("memory_mode", ["1", "2"])
@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_continues_the_dify_conversation(make_harness, memory_mode, stream):
    harness = make_harness(env={"CONVERSATION_MEMORY_MODE": memory_mode})
    harness.dify.script(harness.key_of(CHAT), Text(CALL), End())
    client = strict(harness)
    if stream:
        with client.responses.stream(model=CHAT, input="Weather in Paris?", tools=[WEATHER], user="bob") as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(model=CHAT, input="Weather in Paris?", tools=[WEATHER], user="bob")
    (conversation_id,) = harness.dify.conversations
    call = first.output[-1]
    second = client.responses.create(model=CHAT, previous_response_id=first.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}])
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == conversation_id
    assert sent["query"].startswith(f'<tool_result id="{call.call_id}" name="get_weather">') and "18 C" in sent["query"]
    assert call.call_id.endswith("__get_weather")
    assert sent["user"].endswith(":bob"), "the conversation's Dify user, from the id"
    assert second.previous_response_id == first.id and second.id != first.id
    client.responses.create(model=CHAT, previous_response_id=second.id, input="And tomorrow?")
    assert harness.chat_bodies()[-1]["conversation_id"] == sent["conversation_id"]
    assert harness.chat_bodies()[-1]["query"] == "And tomorrow?"


def flipped(response_id):
    """The id with one character of its tag changed."""
    return response_id[:-2] + ("A" if response_id[-2] != "A" else "B") + response_id[-1]


def test_previous_response_id_of_another_client_app_or_forged_is_refused(modes):
    first = strict(modes).responses.create(model=CHAT, input="hi")
    asked = len(modes.chat_bodies())
    for client, model, response_id, words in [
            (strict(modes, OTHER_CLIENT_KEY), CHAT, first.id, "not found"),
            (strict(modes), FLOW, first.id, f"is a response of model '{CHAT}', not '{FLOW}'"),
            (strict(modes), CHAT, flipped(first.id), "not found"),
            (strict(modes), CHAT, "resp_123", "not found"),
            (strict(modes), CHAT, "resp_" + "A" * 200, "not found")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model=model, input="more", previous_response_id=response_id)
        assert words in caught.value.message and caught.value.param == "previous_response_id"
        assert caught.value.code == "previous_response_not_found"
    assert len(modes.chat_bodies()) == asked, "nothing reached Dify"


def test_previous_response_id_of_an_app_without_conversations(modes):
    first = strict(modes).responses.create(model=WRITER, input="hi")
    with pytest.raises(openai.BadRequestError) as caught:
        strict(modes).responses.create(model=WRITER, input="more", previous_response_id=first.id)
    assert "keeps no conversation" in caught.value.message and "completion" in caught.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_whose_conversation_is_gone(harness, stream):
    first = strict(harness).responses.create(model=CHAT, input="hi")
    (conversation_id,) = harness.dify.conversations
    harness.loop.call(harness.dify.delete_conversation, conversation_id)
    status, _, body = post(harness, {"input": "more", "previous_response_id": first.id, "stream": stream})
    error = json.loads(body)["error"]
    assert status == 404 and error["code"] == "conversation_not_found" and "no longer exists" in error["message"]
    assert error["param"] == "previous_response_id"


# --- background tasks ------------------------------------------------------------------------------

TITLE_TASK = ("Provide a concise, 5-word-or-less title for the conversation, using title case conventions. Only "
              "return the title itself.\n\nConversation:\nUser: Plan a trip to Lisbon in May\nAI: Sure!")


def test_background_tasks_are_answered_locally_like_chat(make_harness):
    harness = make_harness(env={"TASK_MODEL": "local"})
    response = strict(harness).responses.create(model=CHAT, input=TITLE_TASK)
    assert response.output_text == "Plan a trip to Lisbon" and response.status == "completed"
    _, _, body = post(harness, {"input": TITLE_TASK, "stream": True})
    events = sse(body)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Plan a trip to Lisbon"
    assert events[-1]["type"] == "response.completed"
    assert not harness.dify.requests_to("/chat-messages"), "no Dify run at all"


def test_background_tasks_are_routed_to_the_task_model_like_chat(make_harness):
    harness = make_harness(env={"TASK_MODEL": "Flow Bot"})
    strict(harness).responses.create(model=CHAT, input=TITLE_TASK)
    (sent,) = harness.dify.requests_to("/chat-messages")
    assert sent.headers["Authorization"] == "Bearer " + harness.key_of("Flow Bot")
    assert wait_for(lambda: not harness.dify.conversations), "the task's one-shot conversation is deleted"


# --- GET /v1/responses/{id} -------------------------------------------------------------------------

def test_get_a_response_back_from_difys_history(harness):
    harness.dify.script(harness.key_of(CHAT), Text("<think>Greet him.</think>", "Bonjour ", "Bob"), End())
    first = strict(harness).responses.create(model=CHAT, input="hi", user="bob")
    strict(harness).responses.create(model=CHAT, input="more", previous_response_id=first.id)
    again = strict(harness).responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == "Bonjour Bob" and again.status == "completed"
    assert [item.type for item in again.output] == ["reasoning", "message"]
    assert again.output[0].summary[0].text == "Greet him."
    status, _, body = harness.raw("GET", f"/v1/responses/{first.id}")
    check_response(json.loads(body))
    for key, response_id in [(OTHER_CLIENT_KEY, first.id), (CLIENT_KEY, flipped(first.id)), (CLIENT_KEY, "nope")]:
        status, _, body = harness.raw("GET", f"/v1/responses/{response_id}", key=key)
        assert status == 404 and "No response with id" in json.loads(body)["error"]["message"]


def test_get_a_response_whose_history_dify_does_not_keep(modes):
    made = strict(modes).responses.create(model=PIPELINE, input="hi")
    with pytest.raises(openai.NotFoundError) as caught:
        strict(modes).responses.retrieve(made.id)
    assert "keeps no history" in caught.value.message
    chat = strict(modes).responses.create(model=CHAT, input="hi")
    (conversation_id,) = modes.dify.conversations
    modes.loop.call(modes.dify.delete_conversation, conversation_id)
    with pytest.raises(openai.NotFoundError) as caught:
        strict(modes).responses.retrieve(chat.id)
    assert "no longer exists" in caught.value.message


# --- captured client requests, replayed -------------------------------------------------------------

def captured(name):
    with open(os.path.join(os.path.dirname(__file__), "data", name)) as lines:
        return [json.loads(line) for line in lines]


def test_codex_requests_replayed(harness):
    """Codex CLI 0.171.0's two requests of a tool loop (captured from `codex exec` against this proxy):
    developer messages, web_search and namespace tools, store: false, reasoning, client_metadata."""
    first, second = captured("codex-0.171.0-requests.jsonl")
    harness.dify.script(harness.key_of(CHAT), Text("I will run it. ", EXEC_CALL), End())
    events = sse(post(harness, {**first, "model": CHAT})[2])
    (call,) = [e["item"] for e in events if e["type"] == "response.output_item.done"
               and e["item"]["type"] == "function_call"]
    assert call["name"] == "exec_command" and json.loads(call["arguments"]) == {"cmd": "echo codex-was-here"}
    query = harness.chat_bodies()[-1]["query"]
    assert query.startswith("<system>\nYou are a coding agent running in the Codex CLI")
    assert "<skills_instructions>" in query.split("</system>")[0], "both developer messages are system text"
    assert "- exec_command(cmd: string" in query and "multi_agent_v1" not in query
    events = sse(post(harness, {**second, "model": CHAT})[2])
    assert events[-1]["type"] == "response.completed"
    query = harness.chat_bodies()[-1]["query"]
    call_at = query.index('<tool_call>\n{"id": "call_mZXHgC02zuSOhPM5DF7L1W7c", "name": "exec_command"')
    result_at = query.index('<tool_result id="call_mZXHgC02zuSOhPM5DF7L1W7c" name="exec_command">')
    assert query.index("I will run it.") < call_at < result_at and "codex-was-here" in query[result_at:]


def test_agents_sdk_requests_replayed(harness):
    """The OpenAI Agents SDK 0.24.0's two requests of a tool loop (its default Responses model, captured):
    `instructions`, strict function tools, the call and its output resent as items."""
    first, second = captured("openai-agents-0.24.0-requests.jsonl")
    harness.dify.script(harness.key_of(CHAT), Text(CALL), End())
    response = check_response(json.loads(post(harness, first)[2]))
    assert response["output"][-1]["type"] == "function_call" and response["instructions"] == "Help with the weather."
    assert response["tools"][0]["name"] == "get_weather" and response["tools"][0]["strict"] is True
    post(harness, second)
    query = harness.chat_bodies()[-1]["query"]
    assert query.startswith("<system>\nHelp with the weather.\n</system>\n\n<history>\n<user>\nWeather in Paris?")
    assert query.index('"id": "call_IDR7oJc4hTfCjgN5TWLV9Avu", "name": "get_weather"') < query.index(
        '<tool_result id="call_IDR7oJc4hTfCjgN5TWLV9Avu" name="get_weather">\n18 C and sunny in Paris\n</tool_result>')


# --- the relay: keep-alives, smoothing, a client that leaves ------------------------------------------

def test_keep_alives_and_a_timeout_after_the_start(make_harness):
    harness = make_harness(env={"DIFY_IDLE_TIMEOUT": "0.5", "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=0.1)
    harness.dify.script(harness.key_of(CHAT), Text("slow"), Sleep(1.0), Text(" but fine"), End())
    _, _, body = post(harness, {"input": "x", "stream": True})
    events = sse(body)
    assert ": keep-alive" in body.decode() and events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "slow but fine"
    harness = make_harness(env={"DIFY_IDLE_TIMEOUT": "0.4", "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=60)
    harness.dify.script(harness.key_of(CHAT), Text("thinking"), Hang())
    events = sse(post(harness, {"input": "x", "stream": True})[2])
    assert events[-1]["type"] == "response.failed" and "sent nothing" in events[-1]["response"]["error"]["message"]


def test_a_burst_is_paced_like_chat(harness):
    harness.dify.script(harness.key_of(CHAT), Text("word " * 150), End())
    _, _, body = post(harness, {"input": "x", "stream": True})
    deltas = [e["delta"] for e in sse(body) if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "word " * 150 and len(deltas) > 3, "one 750-character burst spread over frames"


def test_a_client_that_leaves_stops_the_dify_task(harness):
    harness.dify.script(harness.key_of(CHAT), Text("first words"), Hang())
    body = {"model": CHAT, "stream": True, "input": "x"}
    with open_raw_stream(harness.port, "/v1/responses", body, until=b"first words"):
        pass
    assert wait_for(lambda: harness.dify.stops, timeout=3.0)
    assert harness.dify.stops[0][0] == "chat" and wait_for(lambda: harness.dify.active_streams == 0)


def test_moderation_replacing_the_answer_is_incomplete(harness):
    for stream in (False, True):
        harness.dify.script(harness.key_of(CHAT), Text("bad ", "words"),
                            Event({"event": "message_replace", "answer": "Sorry."}), End())
        _, _, body = post(harness, {"input": "x", "stream": stream})
        response = sse(body)[-1]["response"] if stream else check_response(json.loads(body))
        assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "content_filter"}
        assert response["output"][-1]["content"][0]["text"].endswith("Sorry.")


def test_a_long_user_and_a_tool_without_parameters(harness):
    first = strict(harness).responses.create(model=CHAT, input="x", user="u" * 500,
                                             tools=[{"type": "function", "name": "ping"}])
    assert harness.chat_bodies()[-1]["user"].endswith(":" + "u" * 64)
    strict(harness).responses.create(model=CHAT, input="more", previous_response_id=first.id)
    assert harness.chat_bodies()[-1]["user"].endswith(":" + "u" * 64)


def test_input_image_as_a_data_url_is_uploaded_and_a_file_url_refused(harness):
    data = "data:image/png;base64," + base64.b64encode(PNG).decode()
    strict(harness).responses.create(model=CHAT, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is it?"}, {"type": "input_image", "image_url": data, "detail": "low"}]}])
    (upload,) = harness.dify.uploads.values()
    assert upload.data == PNG and harness.chat_bodies()[-1]["files"][0]["type"] == "image"
    status, _, body = post(harness, {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_url": "https://files.example/report.pdf"}]}]})
    error = json.loads(body)["error"]
    assert status == 400 and "file_url is not supported" in error["message"]
    assert error["param"] == "input[0].content[0].file_data"


def test_an_unknown_route_names_the_responses_api(harness):
    status, _, body = harness.raw("POST", "/v1/respond", {"input": "x"})
    assert status == 404 and "POST /v1/responses" in json.loads(body)["error"]["message"]


def test_call_ids_carry_the_function_name_only_in_a_safe_form():
    from responses_ids import named_call_id
    from responses_request import parse_responses_request
    assert named_call_id("call_abc123", "get_weather") == "call_abc123__get_weather"
    assert named_call_id("call_abc123", 'x" onload="y') == "call_abc123", "names outside the spec's alphabet"
    assert named_call_id("call_abc123", "n" * 65) == "call_abc123"
    messages = parse_responses_request({"model": "m", "input": [
        {"type": "function_call_output", "call_id": "call_abc123__get_weather", "output": "ok"},
        {"type": "function_call_output", "call_id": "toolu_01__x y", "output": "ok"}]}).chat.messages
    assert messages[0]["name"] == "get_weather" and "name" not in messages[1]
