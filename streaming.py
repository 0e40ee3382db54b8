"""Writing a completion to the client as Server-Sent Events, paced so it reads smoothly.

The 200 and its headers are committed only when Dify's first event arrives, so a Dify
that refuses the request up front yields a real HTTP error; after that, a failure ends
the stream with an error event and `[DONE]`, never a silent stop. One shared heartbeat
timer serves every open stream: it commits streams whose Dify run is slow to start and
sends `: keep-alive` comments on quiet ones, without a timer per stream.

Dify's text arrives at irregular times: steady tokens, whole sentences from agents and
some providers, a workflow's output in one piece. A `Pacer` per stream spreads bursts over
the expected gap to the next one, so the client sees an even flow, while smooth upstreams
pass straight through; it never holds a character longer than the configured lag, so it
never slows a fast model down. One shared `FrameClock` releases what each pacer allows,
frame by frame: a thousand streams cost one timer, not a timer per stream or character.
"""

import logging
import time
from collections import deque
from datetime import timedelta

from tornado import gen
from tornado.concurrent import Future
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import StreamClosedError

import metrics
from errors import APIError, generic
from events import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL
from openai_api import ChunkEncoder

log = logging.getLogger("opendify.streaming")

PACED = (CONTENT, REASONING)  # text that may be split and spread; other pieces go out whole, in order
SMALL_PIECE = 16  # characters: a word or two, which read fine appearing at once
OPENING_RATE = 200.0  # chars/s a first burst is spread at, before the upstream's rhythm is known
SMOOTH_SPREAD = 0.05  # s: spreading over less than this is invisible (20 updates a second)
GAP_MARGIN = 1.5  # spread bursts past the expected gap, so a late burst does not leave a hole
GAP_HISTORY = 5  # gaps the expected gap is the median of: one tool-call pause does not reset it
CLIENT_BUFFER = 256 * 1024  # bytes written for a client and not yet taken by its socket before the relay waits


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


class Heartbeat:
    """The timers shared by all open streams: keep-alives, and the frame clock when smoothing is on."""

    def __init__(self, interval, frames=None):
        self.interval = interval
        self.frames = frames
        self._streams = set()
        self._timer = None

    def add(self, stream):
        self._streams.add(stream)
        if self._timer is None:
            self._timer = PeriodicCallback(self._tick, min(self.interval, 1.0) * 1000 / 2)
            self._timer.start()

    def discard(self, stream):
        self._streams.discard(stream)

    def _tick(self):
        quiet_since = time.monotonic() - self.interval
        for stream in [s for s in self._streams if s.last_write <= quiet_since]:
            stream.keepalive()

    def stop(self):
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self.frames is not None:
            self.frames.stop()


class EventStreamResponse:
    """Relays one Completion to one client as chat.completion.chunk events.

    Writes never wait for the socket: the relay and the frame clock both write to the same
    connection, and Tornado resolves only the latest of overlapping flush futures, so an
    awaited earlier one could hang. Instead every flush result reports how much of what was
    written has reached the socket; once more than CLIENT_BUFFER is waiting (a client that
    reads slowly or not at all), the relay stops taking Dify's events until the buffer has
    drained, so Dify's stream is not read for it either (back-pressure), and a client that
    leaves it full for CLIENT_STALL_TIMEOUT is cut off. A closed client is noticed from the
    flush result (and from the handler's on_connection_close), which cancels the Dify run.
    """

    def __init__(self, handler, completion, heartbeat, encoder=None):
        self.handler = handler
        self.completion = completion
        self.heartbeat = heartbeat
        self.encoder = encoder or ChunkEncoder(handler.completion_id, completion.request.model)
        self.committed = False
        self.sent_text = False
        self.timed = False  # whether the time to first token was recorded
        self.closed = False
        self.last_write = time.monotonic()
        self.frames = heartbeat.frames
        self.pacer = self.frames.pacer() if self.frames is not None else None
        self._drained = None
        self._conversation_untold = False
        self._unsent = b""  # the role chunk, committed and not yet written
        self._written = 0  # bytes handed to the connection
        self._flushed_upto = 0  # of which the socket has taken this many
        self._room = None  # resolved when the client's buffer has drained
        self.stall_timeout = handler.proxy.settings.client_stall_timeout

    async def run(self):
        self.heartbeat.add(self)
        metrics.stream_opened()
        try:
            await self._relay()
        finally:
            metrics.stream_closed()
            self.heartbeat.discard(self)
            if self.frames is not None:
                self.frames.discard(self)

    async def _relay(self):
        completion = self.completion
        try:
            while (pieces := await completion.next_pieces()) is not None:
                if not self.committed:
                    if not pieces and self._awaiting_conversation():
                        continue
                    self.commit()
                elif self._conversation_untold and completion.conversation_id:
                    self._tell_conversation()
                if pieces:
                    self.relay(pieces)
                if self._unsent:  # nothing of this batch was due yet: the role chunk goes alone
                    self.send(b"")
                if self._written - self._flushed_upto > CLIENT_BUFFER:
                    await self._wait_for_room()
        except Exception as error:
            if not self.committed:
                raise
            self.fail(error)
            return
        if completion.cancelled or self.closed:
            return
        if not self.committed:
            self.commit()
        await self.drain()
        if completion.cancelled or self.closed:
            return
        tail = self.encoder.finish(completion.finish_reason())
        if completion.request.include_usage:
            tail += self.encoder.usage(completion.usage())
        self.send(tail + self.encoder.DONE)

    def end(self, error):
        """Ends the stream now with `error` (the server is stopping): what was paced, the error event and
        `[DONE]`; nothing is written after it."""
        self.fail(error)
        self.closed = True
        self._wake()

    def fail(self, error):
        """Ends a committed stream that failed, whatever the failure, with an error event and `[DONE]`
        (what was paced goes out first): never a stream that just stops."""
        if not isinstance(error, APIError):
            log.error("stream for model %r failed unexpectedly", self.completion.request.model,
                      exc_info=(type(error), error, error.__traceback__))
            error = generic(500, "")
        else:
            log.warning("stream for model %r failed after it started: %s", self.completion.request.model, error)
        self.handler.error_code = error.code
        self.send((self.encode(self.pacer.flush()) if self.pacer is not None else b"")
                  + self.encoder.error(error) + self.encoder.DONE)

    async def _wait_for_room(self):
        """Back-pressure: waits until the client's socket has taken what was written, at most the stall
        timeout; then the client is cut off (its buffer is released and the run cancelled)."""
        self._room = Future()
        try:
            await gen.with_timeout(timedelta(seconds=self.stall_timeout), self._room)
        except gen.TimeoutError:
            if self.closed:
                return
            log.warning("stream for model %r: the client read nothing for %g s; closing it",
                        self.completion.request.model, self.stall_timeout)
            self.handler.error_code = "client_stalled"
            self.closed = True
            self.completion.cancel()
            self.handler.request.connection.stream.close()
        finally:
            self._room = None

    def _awaiting_conversation(self):
        """Whether the 200 should wait for Dify's first event naming the conversation, so that the
        X-Dify-Conversation-Id header can carry it (the keep-alive bounds the wait)."""
        return self.completion.conversational and not self.completion.conversation_id

    def _tell_conversation(self):
        """The conversation id learned after the headers went out (Dify was silent past the
        keep-alive), as an SSE comment, which every client's parser skips."""
        self._conversation_untold = False
        self.send(b": x-dify-conversation-id: " + self.completion.conversation_id.encode() + b"\n\n")

    def relay(self, pieces):
        """Sends what is due of a batch of pieces now, and leaves the rest to the frame clock."""
        if not self.timed:
            self.timed = True
            handler = self.handler
            metrics.first_token(handler.model, handler.request.path, time.monotonic() - handler.started)
        if self.pacer is None:
            self.send(self.encode(pieces))
            return
        due = self.pacer.push(pieces, time.monotonic())
        if self.frames.overloaded and self.pacer.waiting:
            due += self.pacer.flush()
        if due:
            self.send(self.encode(due))
        if self.pacer.waiting:
            self.frames.add(self)

    def frame(self, now, next_frame):
        """Called by the frame clock; False once nothing is left to pace."""
        if self.closed or self.completion.cancelled:
            self._wake()
            return False
        due = self.pacer.flush() if self.frames.overloaded else self.pacer.take(now, next_frame)
        if due:
            self.send(self.encode(due))
        if self.pacer.waiting:
            return True
        self._wake()
        return False

    def unpace(self):
        """Sends everything still queued, and stops pacing this stream."""
        pacer, self.pacer = self.pacer, None
        if pacer is not None and pacer.waiting:
            self.send(self.encode(pacer.flush()))
        self._wake()

    async def drain(self):
        """Waits until the pacer has released everything (within its lag bound)."""
        if self.pacer is None or not self.pacer.waiting:
            return
        self._drained = Future()
        self.frames.add(self)
        await self._drained

    def _wake(self):
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def encode(self, pieces):
        encoder = self.encoder
        out = []
        for kind, value in pieces:
            if kind is CONTENT:
                out.append(encoder.content(value))
                self.sent_text = True
            elif kind is REASONING:
                out.append(encoder.reasoning(value))
            elif kind is REPLACE:
                # Text already on the client's screen cannot be recalled; the replacement follows it.
                out.append(encoder.content("\n\n" + value if self.sent_text else value))
                self.sent_text = True
            elif kind is TOOL_CALL:
                if value.get("legacy"):
                    out.append(encoder.function_call(value["name"], value["arguments"]))
                else:
                    out.append(encoder.tool_call(value["index"], value["id"], value["name"], value["arguments"]))
            elif kind is MARK:
                out.append(encoder.content(value))
        return b"".join(out)

    def commit(self):
        handler = self.handler
        handler.set_status(200)
        handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.set_header("Cache-Control", "no-cache")
        handler.set_header("X-Accel-Buffering", "no")
        if self.completion.conversation_id:
            handler.set_header("X-Dify-Conversation-Id", self.completion.conversation_id)
        else:
            self._conversation_untold = self.completion.conversational
        self.committed = True
        # Every event is meant to reach the client at once, but Tornado leaves Nagle's algorithm on while a
        # response is written: an event sent while the previous one was unacknowledged waited for the
        # client's delayed ACK (~1 ms on loopback, up to 40 ms elsewhere). Tornado turns it back on when the
        # response ends.
        handler.request.connection.stream.set_nodelay(True)
        # The role chunk leaves in one write with what this turn of the relay sends next (the first text,
        # when Dify's first event carries some): see `send`.
        self._unsent = self.encoder.role()

    def send(self, data):
        if self.closed:
            return
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        self.handler.write(data)
        self.last_write = time.monotonic()
        self._written += len(data)
        written = self._written
        self.handler.flush().add_done_callback(lambda future: self._flushed(future, written))

    def keepalive(self):
        if self.closed or self.handler.request.connection.stream.closed():
            return
        if not self.committed:
            self.commit()
        self.send(ChunkEncoder.KEEPALIVE)

    def _flushed(self, future, written):
        """A flush ended: everything written up to `written` bytes has reached the socket, or the client
        has gone."""
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._flushed_upto = max(self._flushed_upto, written)
            if self._written - self._flushed_upto <= CLIENT_BUFFER:
                self._make_room()
            return
        if not isinstance(error, StreamClosedError):
            future.result()
        if not self.closed:
            self.closed = True
            self.completion.cancel()
            self._wake()
        self._make_room()

    def _make_room(self):
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)
