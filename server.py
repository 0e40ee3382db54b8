"""The HTTP server: Tornado's, answering a request head it will not read with a 431.

Tornado reads a request head (request line and headers) up to its `max_header_size` (64 KB) and,
past it, closes the connection without a word: the client sees a reset and cannot tell why.
A stream that knows it is reading a head answers such a connection with a 431 in OpenAI shape
before Tornado closes it.
"""

import json
import socket

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, UnsatisfiableReadError

_DRAIN_LIMIT = 1 << 20  # bytes of the unread head taken off the socket, so closing it sends no reset


def _too_large_answer():
    body = json.dumps({"error": {
        "message": "The request's head (request line and headers) is larger than this server reads (64 KB). "
                   "Send fewer or shorter headers, or a shorter URL.",
        "type": "invalid_request_error", "param": None, "code": "request_header_too_large"}}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body


class HeadLimitStream(IOStream):
    """An IOStream that answers 431 when it is closed for a head over the limit.

    Tornado reads heads, and only heads, with `read_until_regex`; a read over its limit closes
    the stream with UnsatisfiableReadError, and `close_fd` runs before the descriptor goes."""

    reading_head = False

    def read_until_regex(self, regex, max_bytes=None):
        self.reading_head = True
        future = super().read_until_regex(regex, max_bytes)
        future.add_done_callback(self._head_read)
        return future

    def _head_read(self, future):
        self.reading_head = False

    def close_fd(self):
        if self.reading_head and isinstance(self.error, UnsatisfiableReadError):
            answer_and_drain(self.socket, _too_large_answer())
        super().close_fd()


def answer_and_drain(sock, answer):
    """Sends a short answer on a non-blocking socket, ends our side, and reads off what the client has
    already sent: closing a socket with unread data makes the kernel reset it, which can destroy the
    answer before the client reads it."""
    try:
        sock.send(answer)  # a few hundred bytes: the send buffer of a connection that sent nothing takes them
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < _DRAIN_LIMIT:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass  # nothing more to read now (or the client is gone): the connection closes either way


class ProxyHTTPServer(HTTPServer):
    """Tornado's HTTPServer with connections read through HeadLimitStream."""

    def handle_stream(self, stream, address):
        super().handle_stream(HeadLimitStream(stream.socket, max_buffer_size=stream.max_buffer_size,
                                              read_chunk_size=stream.read_chunk_size), address)
