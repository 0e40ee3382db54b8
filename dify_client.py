"""Dify's Service API, over keep-alive HTTP/1.1 connections.

Tornado's AsyncHTTPClient does not suit a streaming proxy: its simple client sends
`Connection: close` and opens a fresh TCP (and TLS) connection for every request, runs at
most 10 requests at once and caps a whole request at 20 s. Here `Connections` keeps
connections to Dify open between requests. Each connection is a small asyncio protocol
that parses responses with Tornado's own `httputil` (start line, headers) and decodes
chunked bodies itself: profiling showed Tornado's HTTP1Connection read path, rebuilt as a
pool, cost about 45% of the proxy's CPU per relayed chunk. The concurrency limit comes
from the settings; streams have no total time limit, and instead one watchdog per client
fails any stream that has been silent for longer than the idle timeout (Dify pings every
10 s while it works).
"""

import asyncio
import json
import logging
import ssl
import time
from urllib.parse import urlencode, urlsplit
from uuid import uuid4

from tornado.concurrent import Future
from tornado.httputil import HTTPHeaders, HTTPInputError, HTTPMessageDelegate, parse_response_start_line
from tornado.ioloop import PeriodicCallback
from tornado.locks import Semaphore

try:
    from orjson import loads as _loads
except ImportError:  # orjson is optional: it only makes parsing Dify's events cheaper
    _loads = json.loads

log = logging.getLogger("opendify.dify")

_ERROR_BODY_LIMIT = 64 * 1024
_JSON_BODY_LIMIT = 64 * 1024 * 1024
_IDLE_KEEP = 30.0  # s an unused connection is kept; one the server closed sooner is noticed and dropped
_IDLE_LIMIT = 256  # unused connections kept at most
_STREAM_BODY_LIMIT = 1 << 40
_HEAD_LIMIT = 64 * 1024
_QUEUE_LIMIT = 256 * 1024  # bytes of events a stream holds for a reader that is not taking them, before pausing
STOP_PATHS = {
    "chat": "/chat-messages/{}/stop",
    "completion": "/completion-messages/{}/stop",
    "workflow": "/workflows/tasks/{}/stop",
}


class DifyError(Exception):
    """Dify answered with its error envelope {code, message, status}."""

    def __init__(self, status, code, message, retry_after=None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class StreamFailure(Exception):
    """The exchange with Dify broke: kind is unreachable, dropped, timeout or malformed."""

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def error_from_body(status, body):
    """A DifyError from a non-2xx response body, whatever shape the body has."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    message = data.get("message") or (body[:200].decode("utf-8", "replace").strip() if body else "") or "no detail"
    return DifyError(status, data.get("code") or f"http_{status}", str(message))


class Response(HTTPMessageDelegate):
    """What HTTP1Connection reads of one response: status, headers, and whether the connection may be reused.
    Subclasses take the body."""

    status = None
    headers = None
    complete = False
    reusable = False

    def headers_received(self, start_line, headers):
        self.status = start_line.code
        self.headers = headers
        self.reusable = start_line.version == "HTTP/1.1" and headers.get("Connection", "").lower() != "close"

    def finish(self):
        self.complete = True

    def on_connection_close(self):
        self.reusable = False


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to Dify, read as the bytes arrive.

    An asyncio protocol gets each network read in one call; its response is parsed there
    (Tornado's httputil for the head, chunked framing by hand) and handed to a Response.
    An idle connection is still read by the loop, so one the server closes is noticed at
    once and never reused.
    """

    def __init__(self):
        self.transport = None
        self.lost = False
        self.parked = None
        self._response = None
        self._done = None
        self._buffer = b""
        self._chunk = None  # bytes left of the current chunk (or sized body); None: a size line comes next
        self._framing = None  # "head", "chunked", "trailer", "sized" or "close"
        self._limit = 0

    def send(self, request, response, limit):
        """Writes one request; the future resolves once its response is complete (or the connection lost)."""
        self._response = response
        self._done = Future()
        self._buffer = b""
        self._framing = "head"
        self._limit = limit
        self.transport.write(request)
        return self._done

    def abort(self):
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost = True
        response, self._response = self._response, None
        if response is not None:
            if self._framing == "close" and exc is None:
                response.finish()
            else:
                response.on_connection_close()
            self._settle()

    def eof_received(self):
        return False

    def data_received(self, data):
        if self._response is None:
            self.transport.abort()  # nothing is expected on an idle connection
            return
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        try:
            if self._framing == "head":
                buffer = self._head(buffer)
                if buffer is None:
                    return
            if self._framing == "chunked":
                body, buffer = self._dechunk(buffer)
            elif self._framing == "sized":
                body, buffer = buffer[:self._chunk], buffer[self._chunk:]
                self._chunk -= len(body)
            elif self._framing == "close":
                body, buffer = buffer, b""
            else:
                body = b""
            if self._framing == "trailer":
                buffer = self._trailer(buffer)
        except HTTPInputError as error:
            log.warning("Dify sent a malformed HTTP response: %s", error)
            self._response.on_connection_close()
            self._response = None
            self.transport.abort()
            self._settle()
            return
        self._buffer = buffer
        response = self._response
        if body and response is not None:
            self._limit -= len(body)
            if self._limit < 0:
                self._overflow()
                return
            response.data_received(body)
        if self._framing == "sized" and not self._chunk or self._framing == "done":
            self._response = None
            if buffer:
                self.transport.abort()
            response.finish()
            self._settle()

    def _overflow(self):
        log.warning("Dify sent a response larger than %d bytes; dropping it", _JSON_BODY_LIMIT)
        response, self._response = self._response, None
        response.on_connection_close()
        self.transport.abort()
        self._settle()

    def _settle(self):
        done, self._done = self._done, None
        if done is not None and not done.done():
            done.set_result(None)

    def _head(self, buffer):
        while self._framing == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _HEAD_LIMIT:
                    raise HTTPInputError("response head too long")
                self._buffer = buffer
                return None
            text = buffer[:end].decode("latin1")
            buffer = buffer[end + 4:]
            first, _, rest = text.partition("\r\n")
            start_line = parse_response_start_line(first)
            if 100 <= start_line.code < 200:
                continue
            headers = HTTPHeaders.parse(rest)
            self._response.headers_received(start_line, headers)
            if start_line.code in (204, 304):
                self._framing, self._chunk = "sized", 0
            elif "chunked" in headers.get("Transfer-Encoding", "").lower():
                self._framing, self._chunk = "chunked", None
            elif "Content-Length" in headers:
                try:
                    self._framing, self._chunk = "sized", int(headers["Content-Length"])
                except ValueError:
                    raise HTTPInputError("bad Content-Length")
            else:
                self._framing = "close"
                self._response.reusable = False
        return buffer

    def _dechunk(self, buffer):
        out = []
        while True:
            if self._chunk is None:
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    if len(buffer) > 1024:
                        raise HTTPInputError("chunk size line too long")
                    break
                try:
                    size = int(buffer[:line_end].split(b";", 1)[0], 16)
                except ValueError:
                    raise HTTPInputError("invalid chunk size")
                buffer = buffer[line_end + 2:]
                if size == 0:
                    self._framing = "trailer"
                    break
                self._chunk = size
            if self._chunk:
                piece = buffer[:self._chunk]
                out.append(piece)
                buffer = buffer[len(piece):]
                self._chunk -= len(piece)
                if self._chunk:
                    break
            if len(buffer) < 2:
                break
            if buffer[:2] != b"\r\n":
                raise HTTPInputError("chunk not followed by CRLF")
            buffer = buffer[2:]
            self._chunk = None
        return (out[0] if len(out) == 1 else b"".join(out)), buffer

    def _trailer(self, buffer):
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return buffer
            line, buffer = buffer[:line_end], buffer[line_end + 2:]
            if not line:
                self._framing = "done"
                return buffer


class Connections:
    """Keep-alive connections to one Dify server.

    A request takes the newest idle connection or opens one; once its response has been
    read to the end, the connection goes back to the idle list, unless the server asked to
    close it. A stream the proxy closes mid-answer loses its connection: that is how the
    stop reaches Dify at once. Connections are asyncio transports rather than Tornado's
    IOStream + HTTP1Connection: measured, Tornado's per-read futures and reader
    re-registrations cost more than the rest of the relay (see bench/README.md).
    """

    def __init__(self, base_url, *, connect_timeout=10.0, max_connections=1000):
        parts = urlsplit(base_url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.authority = parts.netloc.rpartition("@")[2]
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        # The default context reads the system's CAs, and SSL_CERT_FILE when it is set.
        self.ssl_context = ssl.create_default_context() if self.secure else None
        self.opened = 0
        self._idle = []  # newest last
        self._slots = Semaphore(max_connections)

    async def exchange(self, method, path, headers, body, response, limit=_JSON_BODY_LIMIT, on_connection=None):
        """Sends one request and feeds its response to `response` (a Response); returns once it is
        complete or the connection broke (the response is told which). Raises StreamFailure
        ("unreachable" or "timeout") when no connection can be made."""
        request = self._request(method, path, headers, body)
        async with self._slots:
            connection = await self._connection()
            if on_connection is not None:
                on_connection(connection)
            try:
                await connection.send(request, response, limit)
            finally:
                if response.complete and response.reusable and not connection.lost:
                    self._park(connection)
                else:
                    connection.abort()

    def _request(self, method, path, headers, body):
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = "\r\n".join(lines)
        if "\n" in head.replace("\r\n", "") or "\r" in head.replace("\r\n", ""):
            raise ValueError("a request header holds a line break")
        return head.encode("latin1") + b"\r\n\r\n" + (body or b"")

    async def _connection(self):
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            fresh = now - connection.parked < _IDLE_KEEP
            if fresh and not connection.lost and not connection.transport.is_closing():
                return connection
            connection.abort()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                Connection, self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.host if self.secure else None), self.connect_timeout)
        except asyncio.TimeoutError:
            raise StreamFailure("timeout", f"no connection to {self.authority} within {self.connect_timeout:g} s")
        except OSError as error:
            raise StreamFailure("unreachable", str(error) or type(error).__name__)
        self.opened += 1
        return connection

    def _park(self, connection):
        if len(self._idle) >= _IDLE_LIMIT:
            self._idle.pop(0).abort()
        connection.parked = time.monotonic()
        self._idle.append(connection)

    def close(self):
        for connection in self._idle:
            connection.abort()
        self._idle.clear()


class _Body(Response):
    """A whole (JSON) response body."""

    def __init__(self):
        self.chunks = []

    def data_received(self, chunk):
        self.chunks.append(chunk)

    def body(self):
        return b"".join(self.chunks)


class EventStream(Response):
    """One SSE response from Dify, parsed into event dicts as the bytes arrive.

    HTTP1Connection hands every network read to `data_received`. Complete lines are parsed
    there as bytes, so a UTF-8 character split across two reads is only ever decoded whole,
    and events are handed to the reader in batches: one wake-up per read, not per event.
    """

    def __init__(self, client, key, path, body):
        self.task_id = None
        self.last_activity = time.monotonic()
        self._client = client
        self._events = []
        self._waiter = None
        self._tail = b""
        self._data_lines = []
        self._error_body = bytearray()
        self._failure = None
        self._finished = False
        self._aborted = False
        self._connection = None
        self._queued = 0  # bytes behind the events not yet taken
        self._paused = False
        client.watch(self)
        self._task = asyncio.ensure_future(self._run(
            client.headers(key, accept="text/event-stream"), json.dumps(body, ensure_ascii=False).encode(), path))

    async def next_events(self):
        """The events received since the last call; None once the stream has ended cleanly."""
        while True:
            if self._events:
                events, self._events = self._events, []
                self._let_in()
                return events
            if self._failure is not None:
                raise self._failure
            if self._finished:
                return None
            self._waiter = Future()
            await self._waiter

    def close(self):
        """Stops reading and closes the connection to Dify at once."""
        self._aborted = True
        self._finished = True
        self._client.unwatch(self)
        if self._connection is not None:
            self._connection.abort()
        self._wake()

    def fail(self, failure):
        if self._failure is None:
            self._failure = failure
        self.close()

    def _wake(self):
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _run(self, headers, body, path):
        try:
            await self._client.connections.exchange("POST", path, headers, body, self, _STREAM_BODY_LIMIT,
                                                    on_connection=self._attach)
        except StreamFailure as failure:
            if not self._aborted:
                self._failure = StreamFailure("unreachable", failure.detail)
        finally:
            self._client.unwatch(self)
            if not self._aborted and not self.complete:
                self.on_connection_close()
            self._wake()

    def _attach(self, connection):
        self._connection = connection
        if self._aborted:
            connection.abort()

    def headers_received(self, start_line, headers):
        super().headers_received(start_line, headers)
        self.last_activity = time.monotonic()

    def data_received(self, chunk):
        if self._aborted:
            return
        self.last_activity = time.monotonic()
        if self.status != 200:
            if len(self._error_body) < _ERROR_BODY_LIMIT:
                self._error_body += chunk
            return
        lines = (self._tail + chunk).split(b"\n") if self._tail else chunk.split(b"\n")
        self._tail = lines.pop()
        before = len(self._events)
        for line in lines:
            if line.startswith(b"data:"):
                self._data_lines.append(line[5:])
            elif self._data_lines and not line.strip():
                self._dispatch()
                if self._failure is not None:
                    return
            # "event: ping", comments and other fields carry nothing the proxy needs.
        if len(self._events) != before:
            self._wake()
        self._hold_back(len(chunk))

    def _hold_back(self, size):
        """Back-pressure: while the reader (a client that is not reading) leaves events waiting, Dify's
        connection is not read; the reader's next take lets it in again."""
        self._queued += size
        if self._queued > _QUEUE_LIMIT and not self._paused and self._connection is not None:
            self._paused = True
            self._connection.transport.pause_reading()

    def _let_in(self):
        self._queued = 0
        if self._paused:
            self._paused = False
            self.last_activity = time.monotonic()  # a paused stream's silence was the client's, not Dify's
            if self._connection is not None and not self._connection.lost:
                self._connection.transport.resume_reading()

    def _dispatch(self):
        payload = b"\n".join(self._data_lines) if len(self._data_lines) > 1 else self._data_lines[0]
        self._data_lines = []
        try:
            event = _loads(payload)
        except ValueError:
            self.fail(StreamFailure("malformed", "sent data that is not JSON"))
            return
        if event.__class__ is not dict:
            self.fail(StreamFailure("malformed", "sent an event that is not a JSON object"))
            return
        if self.task_id is None:
            self.task_id = event.get("task_id")
        self._events.append(event)

    def finish(self):
        super().finish()
        if self._aborted:
            return
        if self.status != 200:
            self._failure = error_from_body(self.status, bytes(self._error_body))
            self._failure.retry_after = self.headers.get("Retry-After")
        else:
            if self._tail.startswith(b"data:"):
                self._data_lines.append(self._tail[5:])
            self._tail = b""
            if self._data_lines:
                self._dispatch()
            self._finished = True
        self._wake()

    def on_connection_close(self):
        super().on_connection_close()
        if self._aborted or self._failure is not None:
            return
        if self.status is None:
            self._failure = StreamFailure("unreachable", "closed the connection before answering")
        else:
            self._failure = StreamFailure("dropped", "closed the connection mid-answer")
        self._wake()


class DifyClient:
    """Connections to one Dify server, shared by every app key."""

    def __init__(self, base_url, *, connect_timeout=10.0, idle_timeout=90.0, max_connections=1000):
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections = None
        self.base_url = base_url
        self._streams = set()
        self._watchdog = None

    @property
    def base_url(self):
        return self._base_url

    @base_url.setter
    def base_url(self, url):
        """A new address gets new connections; requests under way finish on the old ones."""
        self._base_url = url.rstrip("/")
        if self.connections is not None:
            self.connections.close()
        self.connections = Connections(self._base_url, connect_timeout=self.connect_timeout,
                                       max_connections=self.max_connections)

    def headers(self, key, accept="application/json", content_type="application/json"):
        return {"Authorization": f"Bearer {key}", "Content-Type": content_type, "Accept": accept,
                "User-Agent": "OpenDify"}

    def stream(self, key, path, body):
        """Opens a streaming request; events are read with `next_events()`."""
        return EventStream(self, key, path, body)

    async def get(self, key, path, timeout=None):
        return await self._call("GET", key, path, None, timeout=timeout)

    async def post(self, key, path, body, timeout=None):
        return await self._call("POST", key, path, json.dumps(body, ensure_ascii=False).encode(), timeout=timeout)

    async def stop(self, key, kind, task_id, user):
        """Asks Dify to stop generating; the stop endpoints answer success even for unknown tasks."""
        return await self.post(key, STOP_PATHS[kind].format(task_id), {"user": user}, timeout=10)

    async def latest_message(self, key, conversation_id, user, timeout=10):
        """The newest message of a chat-family conversation (Dify's message object), or None when Dify
        has no such conversation for this user (deleted, expired, never made) or it holds no message.
        One cheap `GET /messages?limit=1`: Dify pages oldest to newest, so the only item is the newest."""
        path = f"/messages?{urlencode({'conversation_id': conversation_id, 'user': user, 'limit': 1})}"
        try:
            page = await self.get(key, path, timeout=timeout)
        except DifyError as error:
            if error.status == 404:
                return None
            raise
        items = page.get("data") if isinstance(page, dict) else None
        return items[-1] if isinstance(items, list) and items and isinstance(items[-1], dict) else None

    async def delete_conversation(self, key, conversation_id, user, timeout=10):
        """Deletes a conversation (Dify answers 204); one already gone is not an error."""
        try:
            await self._call("DELETE", key, f"/conversations/{conversation_id}",
                             json.dumps({"user": user}).encode(), timeout=timeout)
        except DifyError as error:
            if error.status != 404:
                raise

    async def upload(self, key, filename, mime, data, user):
        boundary = uuid4().hex
        safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe_name}"\r\n'
                f"Content-Type: {mime}\r\n\r\n").encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        return await self._call("POST", key, "/files/upload", body,
                                content_type=f"multipart/form-data; boundary={boundary}")

    async def _call(self, method, key, path, body, timeout=None, content_type="application/json"):
        response = _Body()
        limit = timeout or self.idle_timeout
        try:
            await asyncio.wait_for(self.connections.exchange(
                method, path, self.headers(key, content_type=content_type), body, response), limit)
        except asyncio.TimeoutError:
            raise StreamFailure("timeout", f"no complete answer to {path} within {limit:g} s")
        if not response.complete:
            raise StreamFailure("unreachable", f"closed the connection before answering {path}")
        if response.status >= 400:
            error = error_from_body(response.status, response.body())
            error.retry_after = response.headers.get("Retry-After")
            raise error
        data = response.body()
        if response.status == 204 or not data:
            return {}
        try:
            return json.loads(data)
        except ValueError:
            raise StreamFailure("malformed", f"answered {path} with a body that is not JSON")

    def watch(self, stream):
        self._streams.add(stream)
        if self._watchdog is None:
            interval = min(1.0, self.idle_timeout / 4) * 1000
            self._watchdog = PeriodicCallback(self._check_idle, interval)
            self._watchdog.start()

    def unwatch(self, stream):
        self._streams.discard(stream)

    def _check_idle(self):
        deadline = time.monotonic() - self.idle_timeout
        for stream in [s for s in self._streams if s.last_activity < deadline and not s._paused]:
            log.warning("Dify stream silent for %.1f s; closing it", self.idle_timeout)
            stream.fail(StreamFailure("timeout", f"sent nothing for {self.idle_timeout:g} s"))

    def close(self):
        if self._watchdog is not None:
            self._watchdog.stop()
        self.connections.close()
