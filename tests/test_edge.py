"""The request edge: odd shapes, odd strings, HTTP semantics and pooled connections, over real sockets.

Every request here goes to the real proxy on loopback; what the client gets and what the fake
Dify was (or was not) sent are both checked.
"""

import base64
import http.client
import json
import threading
import time

import httpx2 as httpx  # the HTTP client the openai SDK is built on
import openai
import pytest

from fake_dify import FakeApp, default_parameters
from support import CLIENT_KEY, wait_for

CHAT = "Chat Bot"


def post(harness, body, **kwargs):
    status, headers, raw = harness.raw("POST", "/v1/chat/completions", body, **kwargs)
    return status, headers, json.loads(raw) if raw else None


def user(text="hi"):
    return {"role": "user", "content": text}


def assistant_with(**fields):
    return {"role": "assistant", "content": None, **fields}


# --- 14.1: odd history is a 400 naming the field -----------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}

ODD_HISTORIES = [
    ([assistant_with(tool_calls=5), user()], "messages[0].tool_calls"),
    ([assistant_with(tool_calls=True), user()], "messages[0].tool_calls"),
    ([assistant_with(tool_calls={"id": "x"}), user()], "messages[0].tool_calls"),
    ([assistant_with(tool_calls=[7]), user()], "messages[0].tool_calls[0]"),
    ([assistant_with(tool_calls=[None]), user()], "messages[0].tool_calls[0]"),
    ([assistant_with(tool_calls=[{**CALL, "function": "get_weather"}]), user()], "messages[0].tool_calls[0].function"),
    ([assistant_with(tool_calls=[{**CALL, "function": {"arguments": "{}"}}]), user()],
     "messages[0].tool_calls[0].function.name"),
    ([assistant_with(tool_calls=[{**CALL, "function": {"name": "f", "arguments": 5}}]), user()],
     "messages[0].tool_calls[0].function.arguments"),
    ([assistant_with(tool_calls=[{**CALL, "id": ["call_1"]}]), user()], "messages[0].tool_calls[0].id"),
    ([user(), assistant_with(tool_calls=[CALL]), {"role": "tool", "tool_call_id": ["call_1"], "content": "x"}],
     "messages[2].tool_call_id"),
    ([assistant_with(function_call="get_weather"), user()], "messages[0].function_call"),
    ([{"role": "user", "content": "x", "name": 5}], "messages[0].name"),
    ([{"role": "user", "content": [1]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": 3}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": None}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}, assistant_with(content="ok"),
      user()], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "file", "file": "x.pdf"}]}, assistant_with(content="ok"), user()],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": 5}]}, assistant_with(content="ok"), user()],
     "messages[0].content[0]"),
]


@pytest.mark.parametrize("messages, param", ODD_HISTORIES, ids=[p for _, p in ODD_HISTORIES])
@pytest.mark.parametrize("stream", [False, True])
def test_odd_history_is_a_400_naming_the_field(harness, messages, param, stream):
    status, headers, body = post(harness, {"model": CHAT, "messages": messages, "stream": stream})
    assert status == 400, body
    assert headers["content-type"].startswith("application/json")
    assert body["error"]["param"] == param and param in body["error"]["message"]
    assert not harness.dify.requests_to("/chat-messages")


def test_clear_intent_is_read_tolerantly(harness):
    """A string part is text, null fields are absent, arguments sent as an object are JSON."""
    messages = [
        {"role": "system", "content": ["Be terse."], "name": None},
        {"role": "user", "content": [{"text": "Weather?"}], "name": None},
        assistant_with(tool_calls=[{"id": None, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
                       function_call=None),
        {"role": "tool", "tool_call_id": None, "name": "get_weather", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": None}, "And tomorrow?"]},
    ]
    answer = harness.client().chat.completions.create(model=CHAT, messages=messages)
    assert answer.choices[0].message.content.startswith("Echo: ")
    [sent] = harness.chat_bodies()
    query = sent["query"]
    assert "Be terse." in query and "Weather?" in query and "And tomorrow?" in query
    assert '"name": "get_weather"' in query and '"city": "Paris"' in query and "sunny" in query


@pytest.mark.parametrize("model", [CHAT, "no such model"])
@pytest.mark.parametrize("field, value, code, param", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": []}}], "invalid_tools",
     "tools[0].function.parameters"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, "invalid_value", "response_format"),
], ids=["tools", "response_format"])
def test_ill_formed_tools_and_formats_are_a_400_at_the_edge(harness, model, field, value, code, param):
    """Tools and the response format are checked with the rest of the request, before the model is looked up."""
    status, _, body = post(harness, {"model": model, "messages": [user()], field: value})
    assert status == 400 and body["error"]["code"] == code and body["error"]["param"] == param
    assert not harness.dify.requests_to("/chat-messages")


def test_an_image_url_given_as_a_bare_string_is_read_as_a_url(harness):
    """Some clients send `image_url: "<url>"`: the edge reads it as {"url": ...}, in the new turn and in history."""
    picture = {"type": "image_url", "image_url": "https://example.com/pics/cat.png"}
    messages = [{"role": "user", "content": [{"type": "text", "text": "And this?"}, picture]}]
    harness.client().chat.completions.create(model=CHAT, messages=messages)
    assert harness.chat_bodies()[-1]["files"] == [{"type": "image", "transfer_method": "remote_url",
                                                   "url": "https://example.com/pics/cat.png"}]
    history = messages + [{"role": "assistant", "content": "A cat."}, user("thanks")]
    harness.client().chat.completions.create(model=CHAT, messages=history)
    sent = harness.chat_bodies()[-1]
    assert "[image: cat.png]" in sent["query"] and "files" not in sent


# --- 14: odd strings and deep nesting ------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogates_are_replaced_not_a_500(harness, stream):
    raw = ('{"model": "Chat Bot", "stream": %s, "user": "u\\udfff", "messages": [{"role": "system", '
           '"content": "sys \\ud800"}, {"role": "user", "content": [{"type": "text", "text": "a\\udc00b \\ud83d\\ude00"}]}]}'
           % ("true" if stream else "false"))
    status, _, body = harness.raw("POST", "/v1/chat/completions", raw, headers={"Content-Type": "application/json"})
    assert status == 200, body
    [sent] = harness.chat_bodies()
    assert "a\ufffdb \U0001F600" in sent["query"] and "sys \ufffd" in sent["query"]


def test_raw_utf8_encoded_surrogates_are_replaced(harness):
    body = b'{"model": "Chat Bot", "messages": [{"role": "user", "content": "x\xed\xa0\x80y"}]}'
    status, _, raw = harness.raw("POST", "/v1/chat/completions", body, headers={"Content-Type": "application/json"})
    assert status == 200, raw
    assert harness.chat_bodies()[0]["query"] == "x\ufffdy"


def test_a_lone_surrogate_in_the_model_name_is_a_json_404(harness):
    raw = '{"model": "Chat\\ud800Bot", "messages": [{"role": "user", "content": "x"}]}'
    status, headers, body = harness.raw("POST", "/v1/chat/completions", raw, headers={"Content-Type": "application/json"})
    assert status == 404 and headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "model_not_found" and "Chat\ufffdBot" in error["message"]


def test_a_model_path_that_is_not_utf8_is_a_json_error(harness):
    status, headers, body = harness.raw("GET", "/v1/models/Chat%ED%A0%80Bot")
    assert 400 <= status < 500 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [
    b'{"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "inputs": {"a": ' + b"[" * 10000
    + b"]" * 10000 + b"}}",
    b'{"model": "Chat Bot", "messages": ' + b"[" * 10000 + b"]" * 10000 + b"}",
    b"[" * 100000,
    b'{"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "tools": ' + b'{"a":' * 150 + b"1"
    + b"}" * 150 + b"}",
], ids=["inputs", "messages", "unclosed", "objects"])
def test_deep_nesting_is_a_400(harness, raw):
    status, headers, body = harness.raw("POST", "/v1/chat/completions", raw, headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert "nested deeper" in json.loads(body)["error"]["message"]


def test_invalid_utf8_is_a_400(harness):
    status, _, body = harness.raw("POST", "/v1/chat/completions",
                                  b'{"model": "Chat Bot", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"


# --- 9: HTTP semantics -------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/chat/completions", "POST, OPTIONS"),
    ("DELETE", "/v1/completions", "POST, OPTIONS"),
    ("POST", "/v1/models", "GET, OPTIONS"),
    ("PUT", "/v1/models/Chat%20Bot", "GET, OPTIONS"),
])
def test_405_says_which_methods_are_allowed(harness, method, path, allow):
    status, headers, body = harness.raw(method, path, b"{}" if method in ("POST", "PUT") else None)
    assert status == 405 and headers["allow"] == allow
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_401_carries_a_bearer_challenge(harness, key):
    status, headers, body = harness.raw("GET", "/v1/models", key=key)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


# --- 10: nothing from a data URL's type reaches a multipart header ---------------------------

def custom_files_app(make_harness):
    parameters = default_parameters("chat")
    parameters["file_upload"].update(allowed_file_types=["custom"], allowed_file_extensions=[".xyz"])
    return make_harness(apps=[FakeApp(key="app-files000000000000000000000", name=CHAT, parameters=parameters)])


@pytest.mark.parametrize("mime", ["application/x\r\nX-Injected: yes", "application/x\nX-Injected: yes",
                                  "text/plain\x00", "a b/c"])
def test_a_control_character_in_a_data_url_type_is_refused(make_harness, mime):
    harness = custom_files_app(make_harness)
    data = base64.b64encode(b"some bytes").decode()
    part = {"type": "file", "file": {"filename": "x.xyz", "file_data": f"data:{mime};base64,{data}"}}
    status, _, body = post(harness, {"model": CHAT, "messages": [{"role": "user", "content": ["look", part]}]})
    assert status == 400 and body["error"]["param"] == "messages[0].content[1]"
    assert body["error"]["code"] == "invalid_data_url"
    assert not harness.dify.uploads and not harness.dify.requests_to("/files/upload")


def test_a_valid_custom_type_still_goes_to_dify(make_harness):
    harness = custom_files_app(make_harness)
    data = base64.b64encode(b"some bytes").decode()
    part = {"type": "file", "file": {"filename": "x.xyz", "file_data": f"data:application/x-thing;base64,{data}"}}
    status, _, body = post(harness, {"model": CHAT, "messages": [{"role": "user", "content": ["look", part]}]})
    assert status == 200, body
    [upload] = harness.dify.uploads.values()
    assert upload.mime == "application/x-thing" and upload.data == b"some bytes"


# --- 8: everything checkable is checked before any Dify call -----------------------------------

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


@pytest.mark.parametrize("inputs, param", [({}, "inputs.city"), ({"city": 5}, "inputs.city")])
def test_a_bad_app_input_is_refused_before_any_upload(make_harness, inputs, param):
    parameters = default_parameters("chat")
    parameters["user_input_form"][0]["text-input"]["required"] = True
    harness = make_harness(apps=[FakeApp(key="app-input000000000000000000000", name=CHAT, parameters=parameters)])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    status, _, body = post(harness, {"model": CHAT, "inputs": inputs,
                                     "messages": [{"role": "user", "content": ["what is it?", image]}]})
    assert status == 400 and body["error"]["param"] == param
    assert not harness.dify.requests_to("/files/upload") and not harness.dify.requests_to("/chat-messages")


# --- 11: a connection answered early stays usable ----------------------------------------------

def chat_body(size=0):
    return json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi" + "x" * size}]}).encode()


def exchange(connection, body, key=CLIENT_KEY):
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = connection.getresponse()
    return response, response.read()


@pytest.mark.parametrize("size", [100, 300_000, 3_000_000])
def test_a_wrong_key_leaves_a_pooled_connection_usable(harness, size):
    connection = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=20)
    for _ in range(5):
        response, body = exchange(connection, chat_body(size), key="sk-wrong")
        assert response.status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert response.getheader("Connection") != "close"
        sock = connection.sock
        response, body = exchange(connection, chat_body())
        assert response.status == 200, body
        assert connection.sock is sock  # the same connection served both
    connection.close()


def test_a_413_within_twice_the_limit_leaves_the_connection_usable(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "1"})
    connection = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=20)
    response, body = exchange(connection, chat_body(1_500_000))
    assert response.status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    sock = connection.sock
    response, body = exchange(connection, chat_body())
    assert response.status == 200 and connection.sock is sock
    connection.close()


def test_a_body_far_over_the_limit_is_answered_with_connection_close(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "1"})
    connection = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=20)
    connection.request("POST", "/v1/chat/completions", body=chat_body(100),
                       headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json",
                                "Content-Length": str(5 * 1024 * 1024)})
    response = connection.getresponse()
    assert response.status == 413 and response.getheader("Connection") == "close"
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    response, body = exchange(connection, chat_body())  # http.client reconnects, as told
    assert response.status == 200
    connection.close()


def test_the_sdk_recovers_from_a_wrong_key_on_its_pooled_connection(harness):
    with httpx.Client() as pool:
        wrong = openai.OpenAI(base_url=harness.base_url, api_key="sk-wrong", http_client=pool, max_retries=0)
        right = openai.OpenAI(base_url=harness.base_url, api_key=CLIENT_KEY, http_client=pool, max_retries=0)
        long_text = "x" * 300_000
        for _ in range(5):
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(model=CHAT, messages=[user(long_text)])
            answer = right.chat.completions.create(model=CHAT, messages=[user("hi")])
            assert answer.choices[0].message.content == "Echo: hi"


# --- 7: a large body is parsed off the event loop ----------------------------------------------

def test_other_requests_are_served_while_a_large_body_is_parsed(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "64"})
    history = []
    for index in range(20000):
        history.append({"role": "user" if index % 2 == 0 else "assistant",
                        "content": [{"type": "text", "text": f"turn {index} " + "wörd " * 300}]})
    history.append(user("last"))
    big = json.dumps({"model": CHAT, "messages": history}).encode()
    assert len(big) > 29 * 1024 * 1024
    latencies = []
    done = threading.Event()

    def ping():
        connection = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=60)
        while not done.is_set():
            started = time.monotonic()
            connection.request("GET", "/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
            response = connection.getresponse()
            response.read()
            latencies.append(time.monotonic() - started)
        connection.close()

    pinger = threading.Thread(target=ping)
    connection = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=120)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Authorization", f"Bearer {CLIENT_KEY}"), ("Content-Type", "application/json"),
                        ("Content-Length", str(len(big)))):
        connection.putheader(name, value)
    connection.endheaders()
    pinger.start()
    connection.send(big)
    sent = time.monotonic()
    assert wait_for(lambda: harness.dify.requests_to("/chat-messages"), timeout=60)
    handled = time.monotonic() - sent  # receiving the tail, parsing, folding the history and calling Dify
    done.set()
    pinger.join()
    response = connection.getresponse()
    assert response.status == 200
    response.read()
    connection.close()
    # Parsed on the loop, one ping waits for the whole parse (the largest part of `handled`).
    assert max(latencies) < handled / 2, (max(latencies), handled)


def test_a_bad_app_input_is_refused_before_a_mode_2_conversation_check(make_harness):
    parameters = default_parameters("chat")
    parameters["user_input_form"][0]["text-input"]["required"] = True
    harness = make_harness(apps=[FakeApp(key="app-input000000000000000000000", name=CHAT, parameters=parameters)],
                           env={"CONVERSATION_MEMORY_MODE": "2"})
    first = harness.client().chat.completions.create(model=CHAT, messages=[user("one")],
                                                     extra_body={"inputs": {"city": "Paris"}})
    reply = first.choices[0].message.content
    calls = len(harness.dify.requests)
    status, _, body = post(harness, {"model": CHAT, "messages": [user("one"), {"role": "assistant", "content": reply},
                                                                 user("two")]})
    assert status == 400 and body["error"]["param"] == "inputs.city"
    assert len(harness.dify.requests) == calls  # not even the conversation's newest message was read


@pytest.mark.parametrize("stream", [False, True])
def test_one_dify_event_longer_than_the_back_pressure_queue_arrives(harness, stream):
    """A single text event of ~500 KB spans many reads before it completes; no reader is waiting on
    events then, so the stream must not pause (it did, and the request hung)."""
    text = "x" * 1_500_000
    for _ in range(3):
        client = harness.client()
        if stream:
            chunks = client.chat.completions.create(model=CHAT, messages=[user(text)], stream=True)
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(model=CHAT, messages=[user(text)]).choices[0].message.content
        assert answer == "Echo: " + text


# --- 14: a request head over Tornado's limit is answered -------------------------------------

def raw_exchange(port, request):
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        try:
            connection.sendall(request)
        except ConnectionError:
            pass
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionError:
            pass
    return received


@pytest.mark.parametrize("head", [
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(2000))
    + b"\r\n",
    b"GET /v1/models/" + b"m" * 80_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 70_000,  # never even ends
], ids=["one-header", "many-headers", "long-url", "unfinished"])
def test_a_head_over_the_limit_is_a_431(harness, head):
    received = raw_exchange(harness.port, head)
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", received[:200]
    assert b"Connection: close" in rest
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_header_too_large"


def test_the_server_serves_on_after_a_431(harness):
    raw_exchange(harness.port, b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    status, _, body = harness.raw("GET", "/v1/models")
    assert status == 200 and len(json.loads(body)["data"]) == 3
