"""The SSE relay end to end.

The proxy runs against the fake Dify scripted slow and bursty, and the tests check what the
client received; the pacer's own decisions are tested with injected time in test_pacing.py.
"""

import json
import socket

from fake_dify import End, Event, Raw, Sleep, Text
from support import CLIENT_KEY, WORDS, sse_events

CHAT = "Chat Bot"


# --- end to end ------------------------------------------------------------------------------

def stream_body(harness, content="x"):
    status, _, body = harness.raw("POST", "/v1/chat/completions",
                                  {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": content}]})
    assert status == 200
    return sse_events(body)


def deltas(events, field="content"):
    return [e["choices"][0]["delta"].get(field) for e in events[:-1]
            if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get(field)]


def bursty_script(count=5, size=120, gap=0.1):
    bursts = [(WORDS * 3)[i * 7:][:size] for i in range(count)]
    steps = []
    for burst in bursts:
        steps += [Text(burst), Sleep(gap)]
    return bursts, steps + [End()]


def test_a_bursty_answer_arrives_paced_whole_and_in_order(harness):
    bursts, steps = bursty_script()
    harness.dify.script(harness.key_of(CHAT), *steps)
    events = stream_body(harness)
    contents = deltas(events)
    assert "".join(contents) == "".join(bursts)
    assert len(contents) > 2 * len(bursts)  # the bursts were spread over several chunks each
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


def test_with_smoothing_off_each_upstream_piece_is_one_chunk(make_harness):
    harness = make_harness(env={"SMOOTH_STREAMING": "off"})
    bursts, steps = bursty_script()
    harness.dify.script(harness.key_of(CHAT), *steps)
    assert deltas(stream_body(harness)) == bursts


def test_split_utf8_and_paced_splits_keep_every_character(harness):
    event = json.dumps({"event": "message", "answer": "\u72d0\u72f8\U0001f98a" * 40, "task_id": "t"},
                       ensure_ascii=False).encode()
    cut = event.index("\U0001f98a".encode()) + 2
    harness.dify.script(harness.key_of(CHAT), Text("Start"), Sleep(0.1), Text("\U0001f98a\u00e9" * 60), Sleep(0.1),
                        Raw(b"data: " + event[:cut]), Sleep(0.05), Raw(event[cut:] + b"\n\n"), End())
    assert "".join(deltas(stream_body(harness))) == "Start" + "\U0001f98a\u00e9" * 60 + "\u72d0\u72f8\U0001f98a" * 40


def test_replacement_and_reasoning_keep_their_place(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Intro\n"), Sleep(0.1), Text("<think>\n" + "hmm " * 40),
                        Sleep(0.1), Text("</think>\n" + "answer " * 30), Sleep(0.1),
                        Event({"event": "message_replace", "answer": "Blocked."}), End())
    events = stream_body(harness)
    order = []
    for event in events[:-1]:
        delta = event["choices"][0]["delta"] if event.get("choices") else {}
        kind = "reasoning" if delta.get("reasoning_content") else "content" if delta.get("content") else None
        if kind and (not order or order[-1] != kind):
            order.append(kind)
    text = "".join(deltas(events))
    assert order == ["content", "reasoning", "content"]
    assert text.startswith("Intro\n") and text.endswith("\n\nBlocked.") and "answer " * 30 in text
    assert "".join(deltas(events, "reasoning_content")).strip() == ("hmm " * 40).strip()
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"


def test_an_upstream_failure_after_paced_text_flushes_it_before_the_error(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Hi"), Sleep(0.1), Text("z" * 300),
                        Event({"event": "error", "status": 500, "code": "internal", "message": "boom"}))
    events = stream_body(harness)
    assert "".join(deltas(events)) == "Hi" + "z" * 300
    assert "error" in events[-2] and events[-1] == "[DONE]"


def test_the_first_text_leaves_with_the_headers_and_no_event_waits_for_an_ack(harness):
    """Time to first token: the headers, the role chunk and Dify's first text go out in one write (a
    second write would wait behind the first for the client's delayed ACK), and while the answer streams
    the connection sends each event at once (TCP_NODELAY)."""
    harness.dify.script(harness.key_of(CHAT), Text("Hello"), Sleep(1.0), Text(" world"), End())
    data = json.dumps({"model": CHAT, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as conn:
        conn.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}").encode())
        first_read = conn.recv(65536)
        assert first_read.startswith(b"HTTP/1.1 200") and b'"role":"assistant"' in first_read
        assert b'"content":"Hello"' in first_read
        streaming = harness.loop.call(lambda: [
            handler.request.connection.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for handler in harness.proxy.in_flight.handlers])
        assert streaming and all(streaming)
        rest = b""
        while b"[DONE]" not in rest:
            rest += conn.recv(65536)
    assert b'"content":" world"' in rest
