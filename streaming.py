"""Writing a completion to the client as Server-Sent Events.

The 200 and its headers are committed only when Dify's first event arrives, so a Dify
that refuses the request up front yields a real HTTP error; after that, a failure ends
the stream with an error event and `[DONE]`, never a silent stop. One shared heartbeat
timer serves every open stream: it commits streams whose Dify run is slow to start and
sends `: keep-alive` comments on quiet ones, without a timer per stream.
"""

import logging
import time

from tornado.ioloop import PeriodicCallback
from tornado.iostream import StreamClosedError

from errors import APIError
from events import CONTENT, MARK, REASONING, REPLACE, TOOL_CALL
from openai_api import ChunkEncoder

log = logging.getLogger("opendify.streaming")


class Heartbeat:
    """One periodic timer for all open streams."""

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
    """Relays one Completion to one client as chat.completion.chunk events."""

    def __init__(self, handler, completion, heartbeat):
        self.handler = handler
        self.completion = completion
        self.heartbeat = heartbeat
        self.encoder = ChunkEncoder(handler.completion_id, completion.request.model)
        self.committed = False
        self.sent_text = False
        self.last_write = time.monotonic()

    async def run(self):
        self.heartbeat.add(self)
        try:
            await self._relay()
        except StreamClosedError:
            self.completion.cancel()
        finally:
            self.heartbeat.discard(self)

    async def _relay(self):
        completion = self.completion
        try:
            while (pieces := await completion.next_pieces()) is not None:
                if not self.committed:
                    self.commit()
                if pieces:
                    await self.send(self.encode(pieces))
        except APIError as error:
            if not self.committed:
                raise
            log.warning("stream for model %r failed after it started: %s", completion.request.model, error)
            self.handler.error_code = error.code
            await self.send(self.encoder.error(error) + ChunkEncoder.DONE)
            return
        if completion.cancelled:
            return
        if not self.committed:
            self.commit()
        tail = self.encoder.finish(completion.finish_reason())
        if completion.request.include_usage:
            tail += self.encoder.usage(completion.usage())
        await self.send(tail + ChunkEncoder.DONE)

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
        handler.write(self.encoder.role())
        self.committed = True

    async def send(self, data):
        self.handler.write(data)
        self.last_write = time.monotonic()
        await self.handler.flush()

    def keepalive(self):
        if self.handler.request.connection.stream.closed():
            return
        if not self.committed:
            self.commit()
        self.handler.write(ChunkEncoder.KEEPALIVE)
        self.last_write = time.monotonic()
        self.handler.flush().add_done_callback(_ignore_closed)


def _ignore_closed(future):
    if not future.cancelled() and isinstance(future.exception(), StreamClosedError):
        return
    future.result()
