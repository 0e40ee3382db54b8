"""The answers in flight, so that a graceful stop can wait for them and end the ones left.

Separate from the workers and signals (workers.py): this is what a stop does to the answers,
in any process; an answer ended here gets an error event and `[DONE]` (or a 503) and its
Dify run is stopped.
"""

import asyncio
import time

from errors import APIError


def shutting_down():
    return APIError(503, "The server is restarting and ended this answer; send the request again.",
                    type="server_error", code="server_shutting_down", retry=True)


class InFlight:
    """The answers being produced now, so that a stop can wait for them and then end the ones left.

    Each entry is a handler with `shut_down()`, which ends its answer with an error (an error event
    and `[DONE]` on a stream that started) and stops its Dify run."""

    def __init__(self):
        self.handlers = set()
        self.stops = set()  # Dify stop calls still under way

    def add(self, handler):
        self.handlers.add(handler)

    def discard(self, handler):
        self.handlers.discard(handler)

    def track(self, task):
        self.stops.add(task)
        task.add_done_callback(self.stops.discard)

    async def wait(self, seconds):
        """Waits until no answer is in flight, or `seconds` passed; whether none is left."""
        deadline = time.monotonic() + seconds
        while self.handlers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.handlers

    async def end_all(self, seconds=3.0):
        """Ends every answer still in flight and waits (at most `seconds`) for their Dify runs to be stopped."""
        ended = len(self.handlers)
        for handler in list(self.handlers):
            handler.shut_down()
        await self.wait(seconds)
        if self.stops:
            await asyncio.wait(list(self.stops), timeout=seconds)
        return ended
