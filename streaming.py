"""Writing a completion to the client as Server-Sent Events.

The 200 and its headers are committed only when Dify's first event arrives, so a Dify
that refuses the request up front yields a real HTTP error; after that, a failure ends
the stream with an error event and `[DONE]`, never a silent stop. One shared keep-alive
timer serves every open stream: it commits streams whose Dify run is slow to start and
sends `: keep-alive` comments on quiet ones, without a timer per stream. What each
stream writes when is decided by its pacer and the shared frame clock (pacing.py).
"""

import logging
import time
from datetime import timedelta

from tornado import gen
from tornado.concurrent import Future
from tornado.ioloop import PeriodicCallback
from tornado.iostream import StreamClosedError

import metrics
from errors import APIError, generic
from pieces import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL
from openai_output import ChunkEncoder

log = logging.getLogger("opendify.streaming")

CLIENT_BUFFER = 256 * 1024  # bytes written for a client and not yet taken by its socket before the relay waits


class KeepAlive:
    """One timer for every open stream: a stream quiet for `interval` seconds gets a `: keep-alive`
    comment (committing its 200 if Dify has not started yet), so clients and proxies in between
    do not give up on it."""

    def __init__(self, interval):
        self.interval = interval
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

    def __init__(self, handler, completion, encoder):
        """`encoder` writes the protocol's events: openai_output.ChunkEncoder or TextChunkEncoder, or
        responses_output.ResponseEventEncoder."""
        self.handler = handler
        self.completion = completion
        self.encoder = encoder
        self.committed = False
        self.sent_text = False
        self.timed = False  # whether the time to first token was recorded
        self.closed = False
        self.last_write = time.monotonic()
        self.frames = handler.proxy.frames
        self.pacer = self.frames.pacer() if self.frames is not None else None
        self._drained = None
        self._conversation_untold = False
        self._unsent = b""  # the role chunk, committed and not yet written
        self._written = 0  # bytes handed to the connection
        self._flushed_upto = 0  # of which the socket has taken this many
        self._room = None  # resolved when the client's buffer has drained
        self.stall_timeout = handler.proxy.settings.client_stall_timeout

    async def run(self):
        keepalive = self.handler.proxy.keepalive
        keepalive.add(self)
        metrics.stream_opened()
        try:
            await self._relay()
        finally:
            metrics.stream_closed()
            keepalive.discard(self)
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
