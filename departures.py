"""Noticing at once that a client has left, while its request waits on Dify.

Tornado learns that a client closed its connection only when it reads or writes the socket,
or while it happens to listen for the close; while a handler waits for a silent Dify (a
workflow node running for half a minute, a run queued for a worker, uploads in flight) it
does neither reliably: bytes the client sent after its body, for one, stop it listening.
Then a departed client was noticed only at the next keep-alive write, and a non-streaming
one not at all, while Dify kept generating for nobody.
"""

import asyncio
import logging
import os
import select
import socket

log = logging.getLogger("opendify.departures")

_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


class DepartureWatch:
    """Watches one client connection for the whole of a request and closes it the moment the client
    has gone, which runs the handler's `on_connection_close` (and so cancels the Dify run).

    It listens on a duplicate of the socket's descriptor: a registration of its own with the
    loop, so Tornado's reader on the connection is never replaced or removed. When the socket
    turns readable it peeks: end of stream or an error means the client left. Bytes the client
    sent early (a pipelined request) keep the socket readable, so from then on a half-second
    timer asks the kernel whether the peer hung up (POLLRDHUP sees it behind unread bytes).
    """

    POLL = 0.5  # s between checks once the client has sent bytes ahead

    def __init__(self, stream):
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._socket = None
        self._reading = False
        self._timer = None
        if stream.closed():
            return
        try:
            self._socket = socket.socket(fileno=os.dup(stream.socket.fileno()))
        except OSError as error:
            log.debug("cannot watch a client connection: %s", error)
            return
        self._loop.add_reader(self._socket.fileno(), self._readable)
        self._reading = True

    def stop(self):
        """Stops watching (the request is over); safe to call more than once."""
        if self._reading:
            self._loop.remove_reader(self._socket.fileno())
            self._reading = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _readable(self):
        try:
            data = self._socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or self._hung_up():
            self._gone()
            return
        self._loop.remove_reader(self._socket.fileno())
        self._reading = False
        self._timer = self._loop.call_later(self.POLL, self._poll)

    def _poll(self):
        self._timer = None
        if self._hung_up():
            self._gone()
        else:
            self._timer = self._loop.call_later(self.POLL, self._poll)

    def _hung_up(self):
        poller = select.poll()
        poller.register(self._socket.fileno(), _HANGUP)
        return any(events & _HANGUP for _, events in poller.poll(0))

    def _gone(self):
        self.stop()
        self._stream.close()
