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

from fake_dify import End, Event, FakeApp, Text
from support import CLIENT_KEY, OTHER_CLIENT_KEY

CHAT = "Chat Bot"
PNG = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
       + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))))
SPEC = json.load(open(os.path.join(os.path.dirname(__file__), "data", "openai_responses_schemas.json")))
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
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def post(harness, body, **kwargs):
    return harness.raw("POST", "/v1/responses", {"model": CHAT, **body}, **kwargs)


def test_string_input_non_streaming(harness):
    response = harness.client().responses.create(model=CHAT, input="Hello there")
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
    with harness.client().responses.stream(model=CHAT, input="Hi") as stream:
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
    response = modes.client().responses.create(model=model, input="Bonjour")
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
    response = harness.client().responses.create(model=CHAT, input="hi")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "Pondering." and response.output_text == "Hi!"


# --- input items -----------------------------------------------------------------------------

def test_items_roles_and_parts_reach_dify_folded(harness):
    harness.client().responses.create(model=CHAT, instructions="Be terse.", input=[
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
    harness.client().responses.create(model=CHAT, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}])
    sent = harness.chat_bodies()[-1]
    assert sent["files"] == [{"type": "image", "transfer_method": "remote_url", "url": url}]
    assert sent["query"].startswith("What is this?")


def test_input_file_is_uploaded_and_refusals_name_the_input_item(harness):
    data = "data:image/png;base64," + base64.b64encode(PNG).decode()
    harness.client().responses.create(model=CHAT, input=[{"role": "user", "content": [
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
        harness.client().responses.create(model="nope", input="x")
    assert caught.value.code == "model_not_found"
    status, _, body = harness.raw("POST", "/v1/responses", b"{oops")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"


# --- structured output -----------------------------------------------------------------------

def test_text_format_json_schema_is_asked_of_the_model(harness):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    harness.dify.script(harness.key_of(CHAT), Text('{"city": "Paris"}'), End())
    response = harness.client().responses.create(model=CHAT, input="Capital of France?", text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    query = harness.chat_bodies()[-1]["query"]
    assert query.startswith("Capital of France?\n\n") and "JSON Schema (answer)" in query
    assert json.dumps(schema, separators=(",", ":")) in query
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert response.text.format.type == "json_schema"
    harness.client().responses.create(model=CHAT, input="x", text={"format": {"type": "json_object"}})
    assert "one valid JSON object" in harness.chat_bodies()[-1]["query"]


def test_chat_response_format_is_asked_of_the_model_too(harness):
    harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
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
    with modes.client().responses.stream(model=FLOW, input="x") as stream:
        seen = [event for event in stream]
    assert seen[-1].type == "response.failed" and "LLM node timed out" in seen[-1].response.error.message


def test_failure_before_the_start_is_an_http_error(modes):
    modes.dify.script(modes.key_of(FLOW), End(status="failed", error="LLM node timed out"))
    status, headers, body = post(modes, {"model": FLOW, "input": "x", "stream": True})
    assert status == 502 and "LLM node timed out" in json.loads(body)["error"]["message"]
