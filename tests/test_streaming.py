"""Smooth streaming and the Dify connection pool.

The pacer's decisions are tested directly with injected time (no loop, no wall clock),
so the timing assertions hold on a loaded machine; end to end, the proxy runs against
the fake Dify scripted slow and bursty, and the tests check what the client received.
"""

import asyncio
import json
import socket
import statistics
import time

import pytest

from config import ConfigError, settings_from
from dify_client import SSEDecoder, StreamFailure
from events import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL
from fake_dify import End, Event, Hang, Raw, Sleep, Text
from streaming import FrameClock, Pacer
from support import CLIENT_KEY, sse_events, wait_for

CHAT = "Chat Bot"
MAX_LAG = 0.4
FRAME = 0.02
WORDS = "the quick brown fox jumps over the lazy dog while a \U0001f98a and \u72d0\u72f8 watch "


def run_pacer(arrivals, max_lag=MAX_LAG, frame=FRAME):
    """Feeds (time, pieces) arrivals to a Pacer, with a frame clock ticking every `frame` while
    anything waits; returns [(time, piece)] as released."""
    pacer = Pacer(max_lag, frame)
    released = []
    next_frame = None
    arrivals = sorted(arrivals, key=lambda arrival: arrival[0])
    index = 0
    for _ in range(1_000_000):
        if index == len(arrivals) and not pacer.waiting:
            return released
        arrival_at = arrivals[index][0] if index < len(arrivals) else float("inf")
        if next_frame is None or arrival_at <= next_frame:
            now, pieces = arrivals[index]
            index += 1
            released += [(now, piece) for piece in pacer.push(pieces, now)]
            if pacer.waiting and next_frame is None:
                next_frame = now + frame
        else:
            now = next_frame
            released += [(now, piece) for piece in pacer.take(now, frame)]
            next_frame = now + frame if pacer.waiting else None
    raise AssertionError("the pacer never drained")


def text_arrivals(sizes_and_gaps, kind=CONTENT):
    """[(time, [(kind, text)])] for pieces of the given sizes, each `gap` after the previous one."""
    arrivals, now, offset = [], 0.0, 0
    for size, gap in sizes_and_gaps:
        text = (WORDS * (size // len(WORDS) + 2))[offset % len(WORDS):][:size]
        offset += size
        arrivals.append((now, [(kind, text)]))
        now += gap
    return arrivals


def char_times(timed_pieces):
    """The time of each character, in order."""
    times = []
    for moment, (kind, value) in timed_pieces:
        if kind in (CONTENT, REASONING):
            times += [moment] * len(value)
    return times


def window_cv(times, window=0.02):
    """Coefficient of variation of characters revealed per window, from the first to the last."""
    start = times[0]
    counts = [0] * (int((times[-1] - start) / window) + 1)
    for moment in times:
        counts[int((moment - start) / window)] += 1
    return statistics.pstdev(counts) / statistics.mean(counts)


def lags(arrivals, released):
    return [out - arrived for arrived, out in zip(char_times(
        [(moment, piece) for moment, pieces in arrivals for piece in pieces]), char_times(released))]


def joined(timed_pieces):
    return "".join(value for _, (kind, value) in timed_pieces if kind is CONTENT)


# A burst of 30-60 characters every 200-350 ms, like an agent writing whole sentences (fixed, not random).
BURSTS = [(30 + (i * 17) % 31, 0.2 + ((i * 7) % 16) / 100) for i in range(40)]


# --- the pacer's decisions, with injected time -----------------------------------------------

def test_smooth_upstream_passes_through_with_no_added_delay():
    arrivals = text_arrivals([(4 + i % 3, 1 / 30) for i in range(120)])  # 30 tokens a second
    released = run_pacer(arrivals)
    assert all(lag == 0 for lag in lags(arrivals, released))
    assert [piece for _, piece in released] == [piece for _, pieces in arrivals for piece in pieces]


def test_fast_upstream_is_never_slowed_down():
    arrivals = text_arrivals([(200, 0.05)] * 60)  # 4,000 characters a second, in big pieces
    released = run_pacer(arrivals)
    upstream = arrivals[-1][0] - arrivals[0][0]
    assert released[-1][0] - arrivals[0][0] <= 1.05 * upstream
    assert max(lags(arrivals, released)) <= MAX_LAG


def test_bursts_become_an_even_flow():
    arrivals = text_arrivals(BURSTS)
    unsmoothed = window_cv(char_times([(moment, piece) for moment, pieces in arrivals for piece in pieces]))
    smoothed = window_cv(char_times(run_pacer(arrivals)))
    assert unsmoothed > 3 and smoothed < 0.5


def test_pending_text_carries_across_upstream_events():
    arrivals = text_arrivals(BURSTS[:6])
    released = run_pacer(arrivals)
    second_burst_at = arrivals[1][0]
    first_burst = len(arrivals[0][1][0][1])
    # Some of the second burst went out while the first was still flowing: no hole between bursts.
    sent_before_second = sum(len(value) for moment, (_, value) in released if moment < second_burst_at)
    assert sent_before_second < first_burst + len(arrivals[1][1][0][1])
    assert joined(released) == "".join(piece[1] for _, pieces in arrivals for piece in pieces)


@pytest.mark.parametrize("max_lag", [0.1, 0.25, 0.4, 1.0])
def test_every_character_leaves_within_the_lag_bound(max_lag):
    sizes = BURSTS[:10] + [(5000, 0.3), (3, 2.0), (80, 0.01)] + BURSTS[10:20]
    arrivals = text_arrivals(sizes)
    released = run_pacer(arrivals, max_lag=max_lag)
    assert max(lags(arrivals, released)) <= max_lag + 1e-9


def test_end_of_answer_drains_within_the_bound():
    arrivals = text_arrivals(BURSTS[:8])
    released = run_pacer(arrivals)
    assert released[-1][0] - arrivals[-1][0] <= MAX_LAG


def test_drain_rate_follows_the_arrival_rate():
    # The same bursts, ever faster: output keeps up, so the backlog never exceeds what arrived within max_lag.
    sizes = [(60, max(0.02, 0.3 - i * 0.01)) for i in range(40)]
    arrivals = text_arrivals(sizes)
    released = run_pacer(arrivals)
    assert max(lags(arrivals, released)) <= MAX_LAG
    assert released[-1][0] - arrivals[-1][0] <= MAX_LAG


def test_first_text_is_never_delayed():
    pacer = Pacer(MAX_LAG, FRAME)
    assert pacer.push([(CONTENT, "Hello there")], now=5.0) == [(CONTENT, "Hello there")]
    long = Pacer(MAX_LAG, FRAME)
    started = long.push([(CONTENT, "x" * 2000)], now=5.0)
    assert started and started[0][1].startswith("x")  # a workflow's whole output starts at once, then flows
    released = run_pacer([(5.0, [(CONTENT, "x" * 2000)])])
    assert joined(released) == "x" * 2000 and released[-1][0] - 5.0 <= MAX_LAG


def test_a_burst_into_an_idle_stream_starts_at_once():
    pacer = Pacer(MAX_LAG, FRAME)
    pacer.push([(CONTENT, "Hello")], now=0.0)
    pacer.push([(CONTENT, " world")], now=0.3)
    started = pacer.push([(CONTENT, "y" * 100)], now=0.6)
    assert started and started[0][1].startswith("y") and pacer.waiting


def test_pieces_keep_their_order_and_marks_and_tool_calls_are_never_split():
    call = {"index": 0, "id": "call_1", "name": "lookup", "arguments": "{\"q\": \"x\"}"}
    mark = "\u200b\u200c\u200d" * 10
    arrivals = [
        (0.0, [(CONTENT, "Start. ")]),
        (0.3, [(REASONING, "thinking " * 20), (CONTENT, "a" * 120), (MARK, mark)]),
        (0.6, [(CONTENT, "b" * 90), (TOOL_CALL, call), (REPLACE, "Replaced."), (CONTENT, "c" * 50)]),
    ]
    released = run_pacer(arrivals)
    pieces = [piece for _, piece in released]
    assert (MARK, mark) in pieces and (TOOL_CALL, call) in pieces and (REPLACE, "Replaced.") in pieces
    merged = []
    for kind, value in pieces:
        if merged and merged[-1][0] is kind and kind in (CONTENT, REASONING):
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    assert merged == [(CONTENT, "Start. "), (REASONING, "thinking " * 20), (CONTENT, "a" * 120), (MARK, mark),
                      (CONTENT, "b" * 90), (TOOL_CALL, call), (REPLACE, "Replaced."), (CONTENT, "c" * 50)]
    times = [moment for moment, _ in released]
    assert times == sorted(times)


def test_a_late_frame_releases_more_instead_of_lagging():
    pacer = Pacer(MAX_LAG, FRAME)
    pacer.push([(CONTENT, "w" * 10)], now=0.0)
    started = pacer.push([(CONTENT, "x" * 300)], now=0.3)
    on_time = pacer.take(0.32, FRAME)
    late = pacer.take(0.52, 0.1)  # the loop was busy: the next frame is also expected later
    assert 0 < len(on_time[0][1]) < len(late[0][1])
    rest = pacer.take(0.62, 0.1)
    assert not pacer.waiting and sum(len(v) for _, v in started + on_time + late + rest) == 300


def test_frames_get_coarser_under_load_and_pacing_steps_aside_when_they_run_late():
    clock = FrameClock(FRAME, MAX_LAG)
    clock.measure(late=0.001, busy=0.002)
    assert clock.interval == FRAME and not clock.overloaded
    clock.measure(late=0.001, busy=0.05)  # a frame's work took 50 ms: the next comes later
    assert clock.interval == 0.1 and not clock.overloaded
    clock.measure(late=1.0, busy=1.0)
    assert clock.interval == MAX_LAG / 2 and clock.overloaded
    for _ in range(20):
        clock.measure(late=0.001, busy=0.001)
    assert not clock.overloaded and clock.interval == FRAME


def test_flush_releases_everything_in_order():
    pacer = Pacer(MAX_LAG, FRAME)
    pacer.push([(CONTENT, "a")], now=0.0)
    pacer.push([(CONTENT, "b" * 100), (MARK, "\u200b")], now=0.3)
    pacer.take(0.32)
    rest = pacer.flush()
    assert rest[-1] == (MARK, "\u200b") and not pacer.waiting


# --- settings ------------------------------------------------------------------------------

BASE_ENV = {"DIFY_API_KEYS": "app-a", "DIFY_API_BASE": "https://dify.example/v1", "VALID_API_KEYS": "k1"}


def test_smoothing_is_on_by_default_and_tunable():
    settings = settings_from(BASE_ENV)
    assert settings.smooth_streaming and settings.smooth_max_lag == 0.4 and settings.smooth_frame == 0.02
    tuned = settings_from({**BASE_ENV, "SMOOTH_STREAMING": "off", "SMOOTH_MAX_LAG_MS": "250",
                           "SMOOTH_FRAME_MS": "10"})
    assert not tuned.smooth_streaming and tuned.smooth_max_lag == 0.25 and tuned.smooth_frame == 0.01


@pytest.mark.parametrize("name, value", [("SMOOTH_STREAMING", "maybe"), ("SMOOTH_MAX_LAG_MS", "5000"),
                                         ("SMOOTH_FRAME_MS", "1")])
def test_bad_smoothing_settings_name_the_setting(name, value):
    with pytest.raises(ConfigError, match=f"^{name}"):
        settings_from({**BASE_ENV, name: value})


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


# --- connections to Dify ---------------------------------------------------------------------

def test_requests_reuse_connections_to_dify(harness):
    client = harness.client()
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "warm up"}])
    opened = harness.dify.connections_opened
    for turn in range(10):
        stream = client.chat.completions.create(model=CHAT, stream=turn % 2 == 0,
                                                messages=[{"role": "user", "content": f"turn {turn}"}])
        if turn % 2 == 0:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == f"Echo: turn {turn}"
        else:
            assert stream.choices[0].message.content == f"Echo: turn {turn}"
    assert harness.dify.connections_opened == opened


def test_a_connection_dify_closed_while_idle_is_not_used(harness):
    client = harness.client()
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "one"}])
    opened = harness.dify.connections_opened
    harness.loop.run(harness.dify._server.close_all_connections())
    answer = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "two"}])
    assert answer.choices[0].message.content == "Echo: two"
    assert harness.dify.connections_opened == opened + 1


def test_a_stream_the_client_left_closes_its_connection_and_the_next_request_works(harness):
    harness.dify.script(harness.key_of(CHAT), Text("first words"), Hang())
    with pytest.raises(OSError):
        harness.raw("POST", "/v1/chat/completions",
                    {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]}, timeout=0.5)
    assert wait_for(lambda: harness.dify.stops and harness.dify.active_streams == 0)
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "next"}])
    assert answer.choices[0].message.content == "Echo: next"


# --- the SSE decoder, fed in every possible split -----------------------------------------------

SSE = ('event: ping\n\ndata: {"answer": "\u72d0\U0001f98a", "task_id": "t1"}\n\n: comment\n'
       'data: {"answer":\ndata: "two lines"}\r\n\r\ndata: {"answer": "last"}').encode()
SSE_EVENTS = [{"answer": "\u72d0\U0001f98a", "task_id": "t1"}, {"answer": "two lines"}, {"answer": "last"}]


def decode(pieces):
    decoder, events = SSEDecoder(), []
    for piece in pieces:
        decoder.feed(piece, events)
    decoder.finish(events)
    return decoder, events


@pytest.mark.parametrize("cut", range(1, len(SSE)))
def test_an_sse_body_split_anywhere_decodes_whole(cut):
    decoder, events = decode([SSE[:cut], SSE[cut:]])
    assert events == SSE_EVENTS and decoder.task_id == "t1"


def test_an_sse_body_fed_byte_by_byte_decodes_whole():
    assert decode([SSE[i:i + 1] for i in range(len(SSE))])[1] == SSE_EVENTS


def test_a_long_sse_line_in_many_reads_costs_what_one_read_costs():
    """Issue 14 item 6: a 4 MB line arriving in 4 KiB reads was joined to its growing tail on every
    read (quadratic: ~10x the single read's CPU). Measured as CPU time of this thread, with a
    generous bound; the figure is in the note."""
    line = b'data: {"answer": "' + b"x" * (4 * 1024 * 1024) + b'"}\n\n'
    reads = [line[i:i + 4096] for i in range(0, len(line), 4096)]

    def cpu(pieces):
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            assert len(decode(pieces)[1][0]["answer"]) == 4 * 1024 * 1024
            best = min(best, time.thread_time() - started)
        return best

    whole, split = cpu([line]), cpu(reads)
    assert split < 3 * whole + 0.02, f"{len(reads)} reads: {split * 1000:.1f} ms of CPU, one read: {whole * 1000:.1f} ms"


def test_data_that_is_not_a_json_object_is_malformed():
    for body in (b"data: [1, 2]\n\n", b"data: {nope\n\n"):
        with pytest.raises(StreamFailure) as caught:
            decode([body])
        assert caught.value.kind == "malformed"


def test_main_runs_on_uvloop_when_it_is_installed():
    pytest.importorskip("uvloop")
    import main

    async def loop_kind():
        return type(asyncio.get_running_loop()).__module__

    assert main.run(loop_kind()).startswith("uvloop")
