"""A run's lifetime: whatever happens to the request, the Dify run ends with it.

The client leaves early, late, while Dify is silent or while files upload; Dify sends odd
events in odd orders, goes silent or breaks off: the client gets an answer or a clear
error ending with `[DONE]`, and a Dify run nobody will read is stopped.
"""

import asyncio
import base64
import json
import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attachment_support import png
from apps import App
from completions import Completion
from config import settings_from
from conversations import ConversationCheck
from dify_events import AnswerTranslator
from fake_dify import Drop, End, ErrorEvent, Event, Hang, HttpError, Ping, Raw, Sleep, Start, Text
from memory import Binding
from openai_api import parse_chat_request
from support import CLIENT_KEY, sse_comments, sse_events, wait_for
from tool_calls import ToolCallParser
from tool_request import tool_request

CHAT = "Chat Bot"
FLOW = "Flow Bot"
MODE2 = {"CONVERSATION_MEMORY_MODE": "2"}


def send_request(harness, body, extra=b"", path="/v1/chat/completions"):
    """A raw client connection that has sent one request (and maybe bytes after it)."""
    connection = socket.create_connection(("127.0.0.1", harness.port))
    data = json.dumps(body)
    connection.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}").encode()
                       + extra)
    return connection


def chat_body(model=CHAT, stream=True, content="x"):
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}


def leave(connection, after=0.3):
    time.sleep(after)
    connection.close()
    return time.monotonic()


# --- a client that leaves -----------------------------------------------------------------------

@pytest.mark.real_difies
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("extra", [b"", b"\r\n"], ids=["body", "bytes-after-body"])
def test_a_client_that_leaves_while_dify_is_silent_is_noticed_at_once(make_harness, stream, extra):
    harness = make_harness(ping_interval=0)
    harness.dify.script(harness.key_of(FLOW), Start(), Sleep(25), End())
    connection = send_request(harness, chat_body(FLOW, stream), extra)
    assert wait_for(lambda: harness.dify.active_streams == 1 and harness.dify.requests_to("/chat-messages"))
    left_at = leave(connection)
    assert wait_for(lambda: harness.dify.stops, timeout=5.0)
    assert time.monotonic() - left_at < 1.0
    assert harness.dify.stops[0][0] == "chat"
    assert wait_for(lambda: harness.dify.active_streams == 0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_responses_client_that_leaves_while_dify_is_silent_stops_the_run(make_harness, stream):
    harness = make_harness(ping_interval=0)
    harness.dify.script(harness.key_of(FLOW), Start(), Sleep(25), End())
    connection = send_request(harness, {"model": FLOW, "input": "x", "stream": stream}, b"\r\n", "/v1/responses")
    assert wait_for(lambda: harness.dify.active_streams == 1 and harness.dify.requests_to("/chat-messages"))
    left_at = leave(connection)
    assert wait_for(lambda: harness.dify.stops, timeout=5.0)
    assert time.monotonic() - left_at < 1.0
    assert wait_for(lambda: harness.dify.active_streams == 0)


@pytest.mark.real_difies
def test_a_client_that_leaves_before_dify_names_the_task_stops_it_at_its_first_event(make_harness):
    harness = make_harness(ping_interval=0)
    harness.dify.script(harness.key_of(FLOW), Sleep(1.0), Start(), Sleep(25), End())
    connection = send_request(harness, chat_body(FLOW))
    assert wait_for(lambda: harness.dify.requests_to("/chat-messages"))
    leave(connection, after=0.1)
    assert wait_for(lambda: harness.dify.stops, timeout=5.0)
    assert wait_for(lambda: harness.dify.active_streams == 0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_during_uploads_gets_no_run(harness, stream):
    harness.dify.upload_rendezvous = 2  # the one upload waits 2 s for a partner that never comes
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = chat_body(stream=stream)
    body["messages"][0]["content"] = [{"type": "text", "text": "what is it"},
                                      {"type": "image_url", "image_url": {"url": image}}]
    connection = send_request(harness, body)
    assert wait_for(lambda: harness.dify._uploads_waiting == 1)
    leave(connection, after=0.1)
    assert wait_for(lambda: harness.dify.uploads, timeout=5.0)
    time.sleep(0.5)
    assert harness.dify.requests_to("/chat-messages") == []


# --- odd upstream events and endings ------------------------------------------------------------

@pytest.mark.parametrize("status", ["abc", None, {"x": 1}, 99999, "429"])
def test_an_error_event_with_any_status_ends_the_stream_with_an_error_and_stops_the_run(harness, status):
    harness.dify.script(harness.key_of(CHAT), Text("partial"),
                        Event({"event": "error", "status": status, "code": ["odd"], "message": "it broke"}), Hang())
    status_code, _, body = harness.raw("POST", "/v1/chat/completions", chat_body())
    events = sse_events(body)
    assert status_code == 200 and events[-1] == "[DONE]"
    assert "it broke" in events[-2]["error"]["message"]
    assert events[1]["choices"][0]["delta"]["content"] == "partial"
    assert wait_for(lambda: harness.dify.stops and harness.dify.active_streams == 0)


def test_an_unexpected_failure_after_the_stream_started_ends_it_with_an_error(harness, monkeypatch):
    def broken(self, event):
        raise RuntimeError("a defect in the proxy")

    monkeypatch.setattr(AnswerTranslator, "on_message_end", broken)
    harness.dify.script(harness.key_of(CHAT), Text("partial"), Sleep(0.05), End(), Hang())
    status, _, body = harness.raw("POST", "/v1/chat/completions", chat_body())
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["error"]["code"] == "internal_error"
    assert wait_for(lambda: harness.dify.stops and harness.dify.active_streams == 0)


@pytest.mark.real_difies
def test_a_dify_run_silent_past_the_idle_timeout_is_stopped(make_harness):
    harness = make_harness(env={"DIFY_IDLE_TIMEOUT": "0.4", "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=60)
    harness.dify.script(harness.key_of(CHAT), Text("thinking"), Hang())
    status, _, body = harness.raw("POST", "/v1/chat/completions", chat_body())
    assert sse_events(body)[-2]["error"]["code"] == "upstream_timeout"
    assert wait_for(lambda: harness.dify.stops and harness.dify.active_streams == 0)
    harness.dify.script(harness.key_of(CHAT), Text("thinking"), Hang())
    status, _, body = harness.raw("POST", "/v1/chat/completions", chat_body(stream=False))
    assert status == 504
    assert wait_for(lambda: len(harness.dify.stops) == 2 and harness.dify.active_streams == 0)


# --- the conversation id header on streamed turns -----------------------------------------------

@pytest.mark.real_difies
def test_streamed_turns_carry_the_conversation_id_when_the_answer_comes_in_several_reads(make_harness):
    harness = make_harness(env=MODE2)
    harness.dify.script(harness.key_of(CHAT), Text("first"), Sleep(0.1), Text(" second"), Sleep(0.1), End())
    status, headers, body = harness.raw("POST", "/v1/chat/completions", chat_body())
    assert status == 200 and sse_events(body)[-1] == "[DONE]"
    assert headers.get("x-dify-conversation-id") in harness.dify.conversations


@pytest.mark.real_difies
def test_a_conversation_id_learned_after_the_keepalive_is_sent_as_a_comment(make_harness):
    harness = make_harness(env={**MODE2, "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=0)
    harness.dify.script(harness.key_of(CHAT), Sleep(0.5), Text("late"), End())
    status, headers, body = harness.raw("POST", "/v1/chat/completions", chat_body())
    told = [c.split(": ", 2)[2] for c in sse_comments(body) if c.startswith(": x-dify-conversation-id")]
    assert status == 200 and "x-dify-conversation-id" not in headers
    assert told and told[0] in harness.dify.conversations


# --- any order of upstream events: an answer or a clear error, never a silent end ----------------

_ODD_VALUES = st.one_of(st.none(), st.integers(-5, 1000), st.text(max_size=8), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.sampled_from(["text", "status", "title", "url"]), st.text(max_size=4),
                                        max_size=2))
_EVENT_NAMES = ["message", "agent_message", "agent_thought", "message_file", "message_replace", "message_end",
                "reasoning_chunk", "node_started", "node_finished", "workflow_started", "workflow_finished",
                "workflow_paused", "text_chunk", "tts_message", "error", "ping", "unknown_event"]
_EVENT = st.builds(
    lambda name, fields: Event({"event": name, **fields}),
    st.sampled_from(_EVENT_NAMES),
    st.dictionaries(st.sampled_from(["answer", "status", "code", "message", "data", "thought", "tool", "tool_input",
                                     "observation", "metadata", "id", "url", "type", "conversation_id", "task_id"]),
                    _ODD_VALUES, max_size=4))
_ERROR_EVENT = st.builds(lambda status, code: Event({"event": "error", "status": status, "code": code, "message": "odd"}),
                        _ODD_VALUES, _ODD_VALUES)
_STEP = st.one_of(_EVENT, _ERROR_EVENT, st.builds(Text, st.text(max_size=6)), st.just(End()),
                  st.just(Raw(b"data: {not json\n\n")), st.just(Raw(b"data: [1, 2]\n\n")), st.just(Ping()))
_ENDING = st.sampled_from([[], [End()], [ErrorEvent()], [Drop(delay=0)]])


@settings(max_examples=int(os.environ.get("LIFETIME_EXAMPLES", "100")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(["Chat Bot", "Agent Bot", "Flow Bot"]), steps=st.lists(_STEP, max_size=6),
       ending=_ENDING, stream=st.booleans())
def test_any_event_order_ends_in_an_answer_or_a_clear_error(harness, model, steps, ending, stream):
    harness.dify.script(harness.key_of(model), *steps, *ending)
    status, headers, body = harness.raw("POST", "/v1/chat/completions", chat_body(model, stream))
    if status != 200:
        error = json.loads(body)["error"]
        assert status != 500 and error["code"] != "internal_error", body
        return
    if not stream:
        assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
        return
    events = sse_events(body)
    assert events[-1] == "[DONE]", body
    last = events[-2]
    assert "error" in last or last["choices"][0]["finish_reason"] or last.get("usage"), body
    assert "error" not in last or last["error"]["code"] != "internal_error", body


# --- a client that reads slowly or not at all ---------------------------------------------------

BIG_PIECE = "y" * 50_000
BIG_PIECES = 400  # a 20 MB answer: more than the kernel buffers between Dify, the proxy and the client hold


def stalled_client(harness, body):
    """A client with a small receive buffer that sends its request and reads nothing yet."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    connection.connect(("127.0.0.1", harness.port))
    data = json.dumps(body)
    connection.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}").encode())
    return connection


def dify_progress(harness):
    return sum(execution.text_events for execution in list(harness.dify._executions.values()))


def settled(read, interval=0.3, timeout=15.0):
    """The value of `read()` once it has stopped changing."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_a_client_that_stops_reading_stops_the_proxy_reading_dify_and_then_gets_everything(make_harness):
    harness = make_harness(env={"SMOOTH_STREAMING": "off"})
    harness.dify.script(harness.key_of(CHAT), Text(*[BIG_PIECE] * BIG_PIECES), End())
    connection = stalled_client(harness, chat_body())
    assert wait_for(lambda: dify_progress(harness) > 0)
    sent = settled(lambda: dify_progress(harness))
    assert sent < BIG_PIECES and harness.dify.active_streams == 1, "Dify was read on for a client not reading"
    received = bytearray()
    connection.settimeout(20)
    while not received.endswith(b"0\r\n\r\n"):
        data = connection.recv(1 << 20)
        assert data
        received += data
    connection.close()
    body = bytes(received).split(b"\r\n\r\n", 1)[1]
    assert body.count(BIG_PIECE.encode()) == BIG_PIECES and b"data: [DONE]" in body
    assert harness.dify.stops == []


def test_a_client_that_stays_stalled_is_cut_off_and_its_run_stopped(make_harness):
    harness = make_harness(env={"SMOOTH_STREAMING": "off", "CLIENT_STALL_TIMEOUT": "0.5"})
    harness.dify.script(harness.key_of(CHAT), Text(*[BIG_PIECE] * BIG_PIECES), End())
    connection = stalled_client(harness, chat_body())
    assert wait_for(lambda: harness.dify.stops, timeout=10.0)
    assert wait_for(lambda: harness.dify.active_streams == 0)
    connection.settimeout(10)
    while connection.recv(1 << 20):
        pass  # the proxy closed the connection: what it had sent drains, then the end
    connection.close()


# --- long answers and long bursts: linear work, and the loop stays free -------------------------

def translate(mode, name, events):
    translator = AnswerTranslator(mode, "model")
    started = time.process_time()
    for _ in range(events):
        translator.feed({"event": name, "answer": "twenty characters.. "})
    return time.process_time() - started


def test_an_800_kb_agent_answer_costs_what_the_same_chat_answer_costs():
    chat = translate("chat", "message", 40_000)
    agent = translate("agent-chat", "agent_message", 40_000)
    assert agent < 3 * chat + 0.05, (agent, chat)


class BurstStream:
    """Stands in for Dify's event stream: one long burst of events in a single read, then the end."""

    task_id = "task"

    def __init__(self, events):
        self.batches = [events]

    async def next_events(self):
        return self.batches.pop() if self.batches else None

    def close(self):
        pass


def test_a_50000_event_burst_is_translated_a_slice_at_a_time_so_the_loop_stays_free():
    app = App(model_id=CHAT, name=CHAT, mode="chat", key="app-unit")
    request = parse_chat_request({"model": CHAT, "messages": [{"role": "user", "content": "x"}]})
    settings = settings_from({"DIFY_API_KEYS": "app-unit", "DIFY_API_BASE": "http://127.0.0.1:1/v1",
                              "VALID_API_KEYS": CLIENT_KEY})
    binding = Binding(b"secret", app.mark_id, "client")
    completion = Completion(None, app, request, "user", settings, binding, object(), ConversationCheck(None))
    burst = [{"event": "message", "answer": "tok ", "task_id": "task"} for _ in range(50_000)]
    completion._stream = BurstStream(burst + [{"event": "message_end", "task_id": "task"}])

    async def run():
        gaps, running = [], True

        async def ticker():
            last = time.monotonic()
            while running:
                await asyncio.sleep(0)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        task = asyncio.ensure_future(ticker())
        answer = await completion.collect()
        running = False
        await task
        return answer, max(gaps)

    answer, longest = asyncio.run(run())
    assert answer.message()["content"] == "tok " * 50_000
    assert longest < 0.1, f"the loop was held for {longest:.3f} s"


def parse_answer(pieces):
    request = tool_request({"tools": [{"type": "function", "function": {
        "name": "write", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]})
    parser = ToolCallParser(request)
    started = time.process_time()
    out = []
    for piece in pieces:
        out += parser.feed(piece)
    out += parser.finish()
    return time.process_time() - started, out


def test_an_800_kb_tool_call_costs_what_800_kb_of_text_costs():
    body = ["abcdefghij0123456789"] * 40_000
    text_time, _ = parse_answer(body)
    call_time, out = parse_answer(['<tool_call>{"name": "write", "arguments": {"text": "', *body, '"}}</tool_call>'])
    assert [kind for kind, _ in out] == ["tool_call"]
    assert json.loads(out[0][1]["arguments"])["text"] == "".join(body)
    assert call_time < 5 * text_time + 0.1, (call_time, text_time)


# --- soak: many mixed requests with departures and faults leave nothing behind -----------------

def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def soak_request(harness, rnd):
    kind = rnd.choice(["stream", "stream", "plain", "leave_at_once", "leave_mid_answer", "unknown_model", "bad_body"])
    if kind in ("stream", "plain", "unknown_model"):
        body = chat_body(CHAT if kind != "unknown_model" else "No Such Model", stream=kind == "stream")
        status, _, raw = harness.raw("POST", "/v1/chat/completions", body, timeout=15)
        assert status < 500 or json.loads(raw)["error"]["code"] != "internal_error"
    elif kind == "bad_body":
        status, _, _ = harness.raw("POST", "/v1/chat/completions", b"{nope", timeout=15)
        assert status == 400
    else:
        connection = send_request(harness, chat_body())
        if kind == "leave_mid_answer":
            connection.settimeout(15)
            connection.recv(100)
        connection.close()


def test_soak_of_mixed_requests_with_departures_and_faults_leaves_nothing_behind(make_harness):
    harness = make_harness(env={"DIFY_IDLE_TIMEOUT": "1", "KEEPALIVE_INTERVAL": "0.2"}, ping_interval=0)
    rnd = random.Random(5)
    faults = [[Text("a", "b"), End()], [Text("half"), Drop()], [Text("x"), ErrorEvent()],
              [HttpError(503, "overloaded", "busy")], [Sleep(0.2), Text("late"), End()], [Text("stuck"), Hang()],
              [Text(*["word "] * 200), End()]]

    def batch(count):
        for _ in range(count):
            harness.dify.script(harness.key_of(CHAT), *rnd.choice(faults))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda seed: soak_request(harness, random.Random(seed)), range(count)))
        assert wait_for(lambda: harness.dify.active_streams == 0, timeout=10)
        assert wait_for(lambda: not harness.proxy.keepalive._streams and not harness.proxy.dify._streams, timeout=5)

    batch(60)
    warm = open_descriptors()
    batch(200)
    assert open_descriptors() <= warm + 8, "descriptors leaked"
