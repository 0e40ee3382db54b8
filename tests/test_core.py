"""The core proxy end to end: the real server, the fake Dify, the real openai client and raw HTTP."""

import json
import logging
import socket
import time

import openai
import pytest

from fake_dify import Drop, End, ErrorEvent, Event, FakeApp, Hang, HttpError, Raw, Sleep, Text
from support import CLIENT_KEY, OTHER_CLIENT_KEY, open_raw_stream, sse_comments, sse_events, wait_for

CHAT = "Chat Bot"
ALL_MODELS = ["Chat Bot", "Agent Bot", "Flow Bot"]


# --- models and auth -----------------------------------------------------------------------

@pytest.mark.real_difies
def test_models_list_in_openai_shape(harness):
    status, headers, body = harness.raw("GET", "/v1/models")
    assert status == 200 and headers["content-type"].startswith("application/json")
    data = json.loads(body)
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ALL_MODELS
    for model in data["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"} and model["object"] == "model"
        assert isinstance(model["created"], int)
    assert [m.id for m in harness.client().models.list()] == ALL_MODELS


def test_model_ids_with_spaces_and_slashes(make_harness):
    harness = make_harness(apps=[FakeApp(key="app-slash00000000000000000000", name="team/My App", mode="chat")])
    model = harness.client().models.retrieve("team/My App")
    assert model.id == "team/My App"
    status, _, body = harness.raw("GET", "/v1/models/team%2FMy%20App")
    assert status == 200 and json.loads(body)["id"] == "team/My App"
    answer = harness.client().chat.completions.create(model="team/My App", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Echo: x"


def test_unknown_model_is_404_model_not_found(harness):
    with pytest.raises(openai.NotFoundError) as caught:
        harness.client().models.retrieve("nope")
    assert caught.value.code == "model_not_found"
    status, headers, body = harness.raw("POST", "/v1/chat/completions",
                                        {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    error = json.loads(body)["error"]
    assert status == 404 and error["code"] == "model_not_found" and "Chat Bot" in error["message"]
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/models/Chat%20Bot", "GET"),
                                          ("/v1/chat/completions", "POST")])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic " + CLIENT_KEY, "Bearer "])
def test_every_route_requires_a_valid_key(harness, path, method, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    status, response_headers, body = harness.raw(method, path, {"model": CHAT, "messages": []}, headers=headers,
                                                 key=None)
    assert status == 401
    assert response_headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
    assert not harness.dify.requests_to("/chat-messages")


def test_openai_client_with_wrong_key_gets_authentication_error(harness):
    with pytest.raises(openai.AuthenticationError):
        harness.client(key="sk-nope").chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])


def test_tornado_own_errors_are_openai_json(harness):
    status, headers, body = harness.raw("GET", "/nothing-here")
    assert status == 404 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "not_found"
    status, headers, body = harness.raw("DELETE", "/v1/models")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    status, headers, body = harness.raw("POST", "/v1/chat/completions", b"{not json",
                                        headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"


def test_missing_messages_is_400_with_param(harness):
    with pytest.raises(openai.BadRequestError) as caught:
        harness.client().chat.completions.create(model=CHAT, messages=[])
    assert caught.value.param == "messages"


# --- CORS ----------------------------------------------------------------------------------

def test_cors_preflight_and_headers(harness):
    status, headers, body = harness.raw("OPTIONS", "/v1/chat/completions", key=None, headers={
        "Origin": "https://app.nextchat.dev", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-timeout"})
    assert status == 204
    assert headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-timeout"
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/missing")):
        _, headers, _ = harness.raw(method, path, headers={"Origin": "https://x.example"})
        assert headers["access-control-allow-origin"] == "*"
    _, headers, _ = harness.raw("GET", "/v1/models", key="bad", headers={"Origin": "https://x.example"})
    assert headers["access-control-allow-origin"] == "*"


def test_cors_allow_list(make_harness):
    harness = make_harness(env={"CORS_ORIGINS": "https://good.example"})
    _, headers, _ = harness.raw("GET", "/v1/models", headers={"Origin": "https://good.example"})
    assert headers["access-control-allow-origin"] == "https://good.example" and "Origin" in headers["vary"]
    _, headers, _ = harness.raw("GET", "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


# --- answers from every chat-family mode ---------------------------------------------------

@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.real_difies
def test_non_streaming_answer_every_mode(harness, model):
    answer = harness.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == model
    assert answer.choices[0].message.content == "Echo: hello"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0
    sent = harness.chat_bodies()[-1]
    # Dify is always asked to stream (agents only stream; Dify Cloud cuts blocking calls at ~100 s).
    assert sent["response_mode"] == "streaming" and sent["auto_generate_name"] is False
    assert sent["query"] == "hello" and sent["conversation_id"] == "" and sent["inputs"] == {}


@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.real_difies
def test_streaming_answer_every_mode(harness, model):
    stream = harness.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                      stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1


def test_stream_bytes_on_the_wire(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Hel", "lo"), End())
    status, headers, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "x"}]})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert headers["transfer-encoding"] == "chunked" and "x-request-id" in headers
    text = body.decode()
    assert "event:" not in text and text.endswith("data: [DONE]\n\n")
    events = sse_events(body)
    assert [e["choices"][0]["delta"] if e != "[DONE]" and e["choices"] else e for e in events[:-2]] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    assert events[4]["choices"] == [] and events[4]["usage"]["total_tokens"] > 0
    assert events[-1] == "[DONE]"


def test_no_usage_chunk_unless_asked(harness):
    _, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert all("usage" not in e for e in sse_events(body) if e != "[DONE]")


def test_usage_comes_from_dify(harness):
    usage = {"prompt_tokens": 1033, "completion_tokens": 135, "total_tokens": 1168, "prompt_price": "0.001"}
    harness.dify.script(harness.key_of(CHAT), Text("ok"), End(usage=usage))
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (1033, 135, 1168)


def test_message_replace_and_message_file_text(make_harness):
    harness = make_harness(message_file_text=True)
    key = harness.key_of(CHAT)
    harness.dify.script(key, Text("bad ", "words"), Event({"event": "message_replace", "answer": "Sorry."}), End())
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Sorry."
    assert answer.choices[0].finish_reason == "content_filter"
    harness.dify.script(key, Text("via ", "message_file"), End())
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "via message_file"


def test_history_is_folded_into_one_fresh_conversation(harness):
    harness.client().chat.completions.create(model=CHAT, messages=[
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Again?"}]}])
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == ""
    assert sent["query"].startswith("<system>\nBe terse.\n</system>")
    assert "<user>\nHi\n</user>" in sent["query"] and sent["query"].endswith("Again?")


def test_dify_user_is_per_client_key_and_request_user(harness):
    messages = [{"role": "user", "content": "x"}]
    harness.client(CLIENT_KEY).chat.completions.create(model=CHAT, messages=messages)
    harness.client(OTHER_CLIENT_KEY).chat.completions.create(model=CHAT, messages=messages)
    harness.client(CLIENT_KEY).chat.completions.create(model=CHAT, messages=messages, user="alice")
    users = [body["user"] for body in harness.chat_bodies()]
    assert len(set(users)) == 3
    assert users[2].startswith(users[0]) and users[2].endswith(":alice")
    assert not any(key in user for user in users for key in (CLIENT_KEY, OTHER_CLIENT_KEY))


# --- faults ----------------------------------------------------------------------------------

def test_utf8_character_split_across_reads_is_intact(harness):
    harness.dify.script(harness.key_of(CHAT), Text("中"),
                        Raw('data: {"event":"message","answer":"文字 é"}\n\n'.encode()[:34]), Sleep(0.05),
                        Raw('data: {"event":"message","answer":"文字 é"}\n\n'.encode()[34:]), End())
    stream = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "中文字 é"


@pytest.mark.real_difies
def test_error_event_mid_stream_ends_with_error_and_done(harness):
    harness.dify.script(harness.key_of(CHAT), Text("partial"),
                        ErrorEvent(code="completion_request_error", status=400, message="[models] Error: 401"))
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]"
    assert "[models] Error: 401" in events[-2]["error"]["message"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
    harness.dify.script(harness.key_of(CHAT), Text("partial"), ErrorEvent(message="boom"))
    with pytest.raises(openai.APIError, match="boom"):
        list(harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                      stream=True))


@pytest.mark.real_difies
def test_error_event_before_any_text_is_a_real_http_error(harness):
    harness.dify.script(harness.key_of(CHAT), ErrorEvent(code="provider_quota_exceeded", message="quota gone"))
    with pytest.raises(openai.RateLimitError) as caught:
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                 stream=True)
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_dropped_upstream_is_an_error_not_silence(harness):
    harness.dify.script(harness.key_of(CHAT), Text("half an"), Drop())
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(body)
    assert events[1]["choices"][0]["delta"]["content"] == "half an"
    assert events[-2]["error"]["code"] == "upstream_error" and events[-1] == "[DONE]"
    harness.dify.script(harness.key_of(CHAT), Text("half an"), Drop())
    with pytest.raises(openai.InternalServerError):
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])


def test_hung_upstream_times_out_with_an_error(make_harness):
    harness = make_harness(env={"DIFY_IDLE_TIMEOUT": "0.4", "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=60)
    harness.dify.script(harness.key_of(CHAT), Text("thinking"), Hang())
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(body)
    assert status == 200 and events[-2]["error"]["code"] == "upstream_timeout" and events[-1] == "[DONE]"
    assert sse_comments(body), "keep-alive comments while Dify was silent"
    harness.dify.script(harness.key_of(CHAT), Hang())
    status, headers, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "x"}]})
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"


def test_pings_keep_a_slow_answer_alive(make_harness):
    harness = make_harness(env={"DIFY_IDLE_TIMEOUT": "0.5", "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=0.1)
    harness.dify.script(harness.key_of(CHAT), Text("slow"), Sleep(1.2), Text(" but fine"), End())
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    contents = [e["choices"][0]["delta"].get("content") for e in sse_events(body)[:-1] if e["choices"]]
    assert "".join(c or "" for c in contents) == "slow but fine"
    assert ": keep-alive" in sse_comments(body)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dify_status, code, expected, exception", [
    (429, "too_many_requests", 429, openai.RateLimitError),
    (400, "invalid_param", 400, openai.BadRequestError),
    (500, "internal_server_error", 502, openai.InternalServerError),
    (503, "overloaded", 503, openai.InternalServerError),
])
@pytest.mark.real_difies
def test_dify_errors_before_the_stream_are_http_errors(harness, stream, dify_status, code, expected, exception):
    harness.dify.script(harness.key_of(CHAT), HttpError(dify_status, code, "upstream says no"))
    with pytest.raises(exception) as caught:
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                                 stream=stream)
    assert caught.value.status_code == expected
    assert "upstream says no" in caught.value.message
    assert caught.value.response.headers["content-type"].startswith("application/json")
    if expected in (429, 503):
        assert "retry-after" in caught.value.response.headers


def test_rejected_dify_key_names_the_model_never_the_key(harness, caplog):
    harness.dify.script(harness.key_of(CHAT), HttpError(401, "unauthorized", "Access token is invalid"))
    with caplog.at_level(logging.DEBUG):
        status, headers, body = harness.raw("POST", "/v1/chat/completions", {
            "model": CHAT, "messages": [{"role": "user", "content": "x"}]})
    error = json.loads(body)["error"]
    assert status == 502 and "Chat Bot" in error["message"] and "DIFY_API_KEYS" in error["message"]
    assert headers["x-should-retry"] == "false"
    everything = body.decode() + str(headers) + caplog.text
    for app in harness.dify.apps:
        assert app.key not in everything and app.key[4:12] not in everything
    assert CLIENT_KEY not in everything


@pytest.mark.real_difies
def test_unreachable_dify_is_502(make_harness):
    harness = make_harness()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    harness.proxy.dify.base_url = f"http://127.0.0.1:{closed_port}/v1"
    with pytest.raises(openai.InternalServerError) as caught:
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unreachable"


@pytest.mark.real_difies
def test_client_disconnect_stops_the_dify_task(harness):
    harness.dify.script(harness.key_of(CHAT), Text("first words"), Hang())
    body = {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with open_raw_stream(harness.port, "/v1/chat/completions", body, until=b"first words"):
        left_at = time.monotonic()
    assert wait_for(lambda: harness.dify.stops, timeout=2.0)
    assert time.monotonic() - left_at < 1.0
    kind, task_id, user = harness.dify.stops[0]
    assert kind == "chat" and task_id and user == harness.chat_bodies()[-1]["user"]
    assert wait_for(lambda: harness.dify.active_streams == 0)


# --- the registry ------------------------------------------------------------------------------

def test_apps_without_mode_are_probed(make_harness):
    harness = make_harness(apps=[FakeApp(key="app-old0000000000000000000000", name="Old Chat", mode="chat",
                                         info_has_mode=False)])
    assert harness.served("Old Chat").mode == "chat"
    answer = harness.client().chat.completions.create(model="Old Chat", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Echo: x"


def test_duplicate_app_names_get_distinct_ids(make_harness):
    harness = make_harness(apps=[FakeApp(key="app-dup1000000000000000000000", name="Twin"),
                                 FakeApp(key="app-dup2000000000000000000000", name="Twin")])
    ids = [m.id for m in harness.client().models.list()]
    assert ids[0] == "Twin" and ids[1].startswith("Twin#") and len(set(ids)) == 2
    harness.client().chat.completions.create(model=ids[1], messages=[{"role": "user", "content": "x"}])
    assert harness.dify.requests_to("/chat-messages")[-1].headers["Authorization"].endswith("app-dup2000000000000000000000")


def test_failed_info_keeps_the_last_entry_and_renames_are_found(harness):
    harness.dify.apps[0].info_status = 500
    harness.loop.run(harness.proxy.registry.refresh())
    assert [m.id for m in harness.client().models.list()] == ALL_MODELS
    harness.dify.apps[0].info_status = 200
    harness.dify.apps[0].name = "Renamed Bot"
    harness.proxy.registry._last_refresh = 0
    answer = harness.client().chat.completions.create(model="Renamed Bot", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Echo: x"
    assert "Chat Bot" not in [m.id for m in harness.client().models.list()]


def test_access_log_has_one_line_per_request_without_secrets(harness, caplog):
    with caplog.at_level(logging.INFO, logger="opendify"):
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "secret prompt"}])
        # Tornado logs after the response is sent, so the client may read it first.
        assert wait_for(lambda: any(r.name == "opendify.access" for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if r.name == "opendify.access"]
    assert len(lines) == 1
    assert "POST /v1/chat/completions 200" in lines[0] and "model='Chat Bot'" in lines[0] and "tokens=" in lines[0]
    assert "secret prompt" not in caplog.text and CLIENT_KEY not in caplog.text
