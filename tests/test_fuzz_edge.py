"""Fuzzing the request edge: generated and mutated OpenAI bodies over real HTTP, never a 5xx.

Hypothesis builds chat requests from the OpenAI schema with every field allowed to take odd
shapes (wrong types, lone surrogates, nulls, nesting), mutates valid bodies, and corrupts their
bytes (invalid UTF-8, truncation, deep nesting, huge strings). Each goes to the real proxy in
front of the fake Dify on one kept-alive connection, the way SDKs send them. EDGE_FUZZ_EXAMPLES
sets the examples per test (the suite runs a few hundred; the note records a longer run).
"""

import http.client
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import CLIENT_KEY

EXAMPLES = int(os.environ.get("EDGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.one_of(st.text(max_size=30), st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), SURROGATES,
                                                 st.text(max_size=8)))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
                    max_leaves=12)
PNG_URL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAA"
           "AElFTkSuQmCC")
URLS = st.one_of(TEXT, st.sampled_from([PNG_URL, "https://example.com/a.png", "http://127.0.0.1/x.png",
                                        "data:image/png\r\nX: 1;base64,AAAA", "data:,", "http://[::1", "ftp://x/y"]))


def maybe(strategy):
    return st.one_of(strategy, JSON)


PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": maybe(TEXT)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": maybe(st.fixed_dictionaries({"url": URLS}))}),
    st.fixed_dictionaries({"type": st.just("file"), "file": maybe(st.fixed_dictionaries(
        {"filename": maybe(TEXT), "file_data": maybe(URLS)}))}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": maybe(st.fixed_dictionaries(
        {"data": maybe(TEXT), "format": maybe(st.sampled_from(["wav", "mp3", "ogg"]))}))}),
    TEXT, JSON)
FUNCTION = st.fixed_dictionaries({"name": maybe(TEXT), "arguments": maybe(TEXT)})
CALL = st.fixed_dictionaries({"id": maybe(TEXT), "type": maybe(st.just("function")), "function": maybe(FUNCTION)})
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), JSON)},
    optional={"content": st.one_of(TEXT, st.lists(PART, max_size=4), JSON), "name": maybe(TEXT),
              "tool_calls": st.one_of(st.lists(maybe(CALL), max_size=3), JSON), "tool_call_id": maybe(TEXT),
              "function_call": maybe(FUNCTION)})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": maybe(st.fixed_dictionaries(
    {"name": maybe(TEXT), "parameters": maybe(st.just({"type": "object", "properties": {"x": {"type": "string"}}}))}))})
BODY = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["Chat Bot", "Agent Bot", "Flow Bot"]), JSON),
     "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=5), JSON)},
    optional={"stream": maybe(st.booleans()), "tools": st.one_of(st.lists(maybe(TOOL), max_size=2), JSON),
              "tool_choice": maybe(st.sampled_from(["auto", "none", "required"])), "inputs": JSON, "user": maybe(TEXT),
              "conversation_id": maybe(TEXT), "stream_options": JSON, "response_format": JSON,
              "parallel_tool_calls": JSON, "functions": JSON, "function_call": JSON})
VALID = st.fixed_dictionaries({"model": st.just("Chat Bot"), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=20)}), min_size=1,
    max_size=4), "stream": st.booleans()})


class Client:
    """One kept-alive connection to the proxy, reopened only when the proxy closes it."""

    def __init__(self, port):
        self.port = port
        self.connection = None

    def post(self, raw):
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.connection.request("POST", "/v1/chat/completions", body=raw, headers={
                    "Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"})
                response = self.connection.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.connection.close()
                self.connection = None
                assert attempt == 0, "the proxy dropped a fresh connection"
                continue
            if response.getheader("Connection") == "close":
                self.connection.close()
                self.connection = None
            return response.status, response.getheader("Content-Type") or "", body


def shared_client(harness):
    """The harness's one fuzzing connection (the harness outlives a test's examples)."""
    if not hasattr(harness, "fuzz_client"):
        harness.fuzz_client = Client(harness.port)
    return harness.fuzz_client


def check(client, raw):
    status, content_type, body = client.post(raw)
    assert status < 500, (status, body[:300], raw[:300])
    if status >= 400:
        assert content_type.startswith("application/json")
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    elif content_type.startswith("text/event-stream"):
        assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
    else:
        assert json.loads(body)["object"] in ("chat.completion",)


def encoded(body):
    return json.dumps(body).encode()  # ASCII escapes: lone surrogates travel as \udxxx


@FUZZ
@given(body=BODY)
def test_generated_requests_never_get_a_5xx(harness, body):
    check(shared_client(harness), encoded(body))


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    return [_replace(item, rest, new) if index == head else item for index, item in enumerate(value)]


@FUZZ
@given(body=VALID, data=st.data())
def test_mutated_requests_never_get_a_5xx(harness, body, data):
    paths = list(_paths(body))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        body = _replace(body, path, data.draw(JSON))
        paths = list(_paths(body))
    check(shared_client(harness), encoded(body))


BYTE_DAMAGE = st.one_of(
    st.tuples(st.just("insert"), st.binary(min_size=1, max_size=4).filter(lambda b: b[:1] >= b"\x80")),
    st.tuples(st.just("truncate"), st.just(b"")),
    st.tuples(st.just("nest"), st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
                                                b"[" * 200000])),
    st.tuples(st.just("huge"), st.sampled_from([b'"' + b"x" * 2_000_000 + b'"', b'"' + b"\\ud800" * 100_000 + b'"'])),
)


@FUZZ
@given(body=VALID, damage=BYTE_DAMAGE, where=st.floats(0, 1))
def test_damaged_bytes_never_get_a_5xx(harness, body, damage, where):
    raw = encoded(body)
    kind, value = damage
    cut = int(len(raw) * where)
    if kind == "insert":
        raw = raw[:cut] + value + raw[cut:]
    elif kind == "truncate":
        raw = raw[:cut]
    else:
        content = json.dumps(body["messages"][0]["content"]).encode()
        raw = raw.replace(content, value, 1)
    check(shared_client(harness), raw)

