"""Pacing: spreading bursts of Dify's text so a client sees an even flow.

Dify's text arrives at irregular times: steady tokens, whole sentences from agents and
some providers, a workflow's output in one piece. A `Pacer` per stream spreads bursts over
the expected gap to the next one, so the client sees an even flow, while smooth upstreams
pass straight through; it never holds a character longer than the configured lag, so it
never slows a fast model down. One shared `FrameClock` releases what each pacer allows,
frame by frame: a thousand streams cost one timer, not a timer per stream or character.
Separate from the relay (streaming.py) because it is an algorithm of its own: the pacer is
pure and tested with injected time; the relay only writes what the clock says is due.
"""

import logging
import time
from collections import deque

from tornado.ioloop import IOLoop

from pieces import CONTENT, REASONING

log = logging.getLogger("opendify.pacing")

PACED = (CONTENT, REASONING)  # text that may be split and spread; other pieces go out whole, in order
SMALL_PIECE = 16  # characters: a word or two, which read fine appearing at once
OPENING_RATE = 200.0  # chars/s a first burst is spread at, before the upstream's rhythm is known
SMOOTH_SPREAD = 0.05  # s: spreading over less than this is invisible (20 updates a second)
GAP_MARGIN = 1.5  # spread bursts past the expected gap, so a late burst does not leave a hole
GAP_HISTORY = 5  # gaps the expected gap is the median of: one tool-call pause does not reset it

class Pacer:
    """Decides, from arrival times and sizes, what of one answer to release at each frame.

    Pure and loop-free: every decision takes `now` (seconds, monotonic). Text (content and
    reasoning) is released at a rate that empties what is pending by the end of its spread,
    the expected gap to the next upstream burst (never more than `max_lag`); the rate is
    recomputed at each arrival from everything pending, so text carries across upstream
    events and the drain rate follows the arrival rate. Any character about to exceed
    `max_lag` is released regardless. Other pieces (marks, tool calls, replacements) cost
    no time and go out whole as soon as everything before them has.
    """

    def __init__(self, max_lag=0.4, frame=0.02):
        self.max_lag = max_lag
        self.frame = frame
        self.pending = 0  # text characters queued
        self._queue = deque()  # [kind, value, arrival time], in answer order
        self._rate = 0.0  # chars/s of the current spread
        self._credit = 0.0  # characters allowed and not yet released
        self._accrued_at = 0.0
        self._last_arrival = None
        self._gaps = deque(maxlen=GAP_HISTORY)

    @property
    def waiting(self):
        """Whether anything is still queued."""
        return bool(self._queue)

    def push(self, pieces, now):
        """Queues one upstream batch; returns the pieces to send at once."""
        idle = not self._queue
        self._accrue(now)
        chars = 0
        for kind, value in pieces:
            if kind in PACED:
                if not value:
                    continue
                chars += len(value)
            self._queue.append([kind, value, now])
        if not chars:
            return self.take(now)
        first = self._last_arrival is None
        if not first:
            self._gaps.append(now - self._last_arrival)
        self._last_arrival = now
        self.pending += chars
        if idle and chars <= SMALL_PIECE:
            return self.flush()
        spread = self.spread(chars)
        if spread <= SMOOTH_SPREAD:
            return self.flush()
        self._rate = self.pending / spread
        if idle:
            # A burst's first characters go out on arrival: pacing never delays the start of an
            # answer (its time to first token), nor of any burst.
            self._credit = max(1.0, self._rate * self.frame)
        return self.take(now)

    def spread(self, chars):
        """Seconds over which the text pending now should be released: the expected gap to the next
        burst (before any gap is known, the time a fast model would take to write `chars`)."""
        if self._gaps:
            gaps = sorted(self._gaps)
            expected = GAP_MARGIN * gaps[len(gaps) // 2]
        else:
            expected = chars / OPENING_RATE
        # Two frames below the bound, so that the lag bound rarely has to force a release.
        return min(expected, self.max_lag - 2 * self.frame)

    def take(self, now, next_frame=None):
        """The pieces due at `now`, given that the next decision comes `next_frame` seconds later."""
        self._accrue(now)
        # Whatever would be older than max_lag by the next frame goes now; one frame of margin
        # covers a timer that fires late.
        overdue_before = now + (self.frame if next_frame is None else next_frame) + self.frame - self.max_lag
        budget = max(int(self._credit), self._chars_before(overdue_before))
        out = self._release(budget)
        self._credit = max(0.0, self._credit - budget) if self.pending else 0.0
        return out

    def flush(self):
        """Everything queued, at once (the upstream is smooth, or the answer failed)."""
        out = [(kind, value) for kind, value, _ in self._queue]
        self._queue.clear()
        self.pending = 0
        self._credit = 0.0
        return out

    def _accrue(self, now):
        if self.pending:
            self._credit += self._rate * max(0.0, now - self._accrued_at)
        self._accrued_at = now

    def _chars_before(self, moment):
        count = 0
        for kind, value, arrived in self._queue:
            if arrived > moment:
                break
            if kind in PACED:
                count += len(value)
        return count

    def _release(self, budget):
        queue = self._queue
        out = []
        while queue:
            entry = queue[0]
            kind, value = entry[0], entry[1]
            if kind in PACED:
                if budget <= 0:
                    break
                if len(value) > budget:
                    out.append((kind, value[:budget]))
                    entry[1] = value[budget:]
                    self.pending -= budget
                    break
                budget -= len(value)
                self.pending -= len(value)
            out.append((kind, value))
            queue.popleft()
        return out


class FrameClock:
    """One timer that paces every stream with text waiting.

    Each frame asks every waiting stream's pacer what is due and writes it. A frame's work
    grows with the number of streams, so the frame lengthens to stay at most about half of
    the loop's time: under load each frame releases more at once (coarser), while the
    pacers' lag bound keeps holding, because each is told when the next frame comes. When
    the loop is so busy that frames fire late, pacing steps aside altogether (text passes
    straight through) until they are on time again: smoothing never adds work or lag to an
    overloaded proxy.
    """

    LATE_WEIGHT = 0.3  # of the newest frame in the smoothed lateness

    def __init__(self, frame, max_lag):
        self.frame = frame
        self.max_lag = max_lag
        self.interval = frame
        self.late = 0.0  # how late frames fire, smoothed (seconds)
        self._streams = set()
        self._handle = None
        self._due = 0.0

    @property
    def overloaded(self):
        return self.late > self.frame

    @classmethod
    def from_settings(cls, settings):
        """The clock for the settings, or None when smoothing is off."""
        if not settings.smooth_streaming:
            return None
        return cls(settings.smooth_frame, settings.smooth_max_lag)

    def pacer(self):
        return Pacer(self.max_lag, self.frame)

    def add(self, stream):
        self._streams.add(stream)
        if self._handle is None:
            self._schedule(self.interval)

    def discard(self, stream):
        self._streams.discard(stream)

    def measure(self, late, busy):
        """Updates the lateness and the next interval from one frame: `late` seconds after it was
        due, it took `busy` seconds."""
        self.late += self.LATE_WEIGHT * (max(0.0, late) - self.late)
        self.interval = min(max(self.frame, 2 * busy), self.max_lag / 2)

    def _schedule(self, delay):
        self._due = time.monotonic() + delay
        self._handle = IOLoop.current().call_later(delay, self._tick)

    def _tick(self):
        self._handle = None
        start = time.monotonic()
        late = start - self._due
        interval = self.interval
        for stream in list(self._streams):
            try:
                keep = stream.frame(start, interval)
            except Exception:
                log.exception("pacing a stream failed; sending the rest of it unpaced")
                keep = False
                stream.unpace()
            if not keep:
                self._streams.discard(stream)
        busy = time.monotonic() - start
        self.measure(late, busy)
        # While overloaded the clock keeps ticking, to see when frames are on time again.
        if self._streams or self.overloaded:
            self._schedule(max(0.0, self.interval - busy))

    def stop(self):
        if self._handle is not None:
            IOLoop.current().remove_timeout(self._handle)
            self._handle = None
        self._streams.clear()
