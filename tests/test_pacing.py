"""The pacer's decisions, tested directly with injected time (no loop, no wall clock), so the
timing assertions hold on a loaded machine; the frame clock's load response; the smoothing
settings. End to end pacing (the proxy against a bursty fake Dify) is in test_streaming.py."""

import statistics

import pytest

from config import ConfigError, settings_from
from pieces import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL
from pacing import FrameClock, Pacer
from support import WORDS

MAX_LAG = 0.4
FRAME = 0.02


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
