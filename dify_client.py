"""Dify's Service API, spoken with Tornado's AsyncHTTPClient.

Tornado's defaults do not suit a streaming proxy: at most 10 requests at once and a 20 s
cap on the whole request. Here the concurrency limit comes from the settings, streams
have no total time limit, and instead one watchdog per client fails any stream that has
been silent for longer than the idle timeout (Dify pings every 10 s while it works).
"""

import json
import logging
import time
from uuid import uuid4

from tornado.concurrent import Future
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.ioloop import PeriodicCallback

log = logging.getLogger("opendify.dify")

_ERROR_BODY_LIMIT = 64 * 1024
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


class EventStream:
    """One SSE response from Dify, parsed into event dicts as the bytes arrive.

    Tornado hands every network read to `_on_chunk`. Complete lines are parsed there as
    bytes, so a UTF-8 character split across two reads is only ever decoded whole, and
    events are handed to the reader in batches: one wake-up per read, not per event.
    """

    def __init__(self, client, key, path, body):
        self.task_id = None
        self.status = None
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
        request = HTTPRequest(
            client.base_url + path, method="POST",
            headers=client.headers(key, accept="text/event-stream"),
            body=json.dumps(body, ensure_ascii=False).encode(),
            connect_timeout=client.connect_timeout, request_timeout=0,
            header_callback=self._on_header, streaming_callback=self._on_chunk)
        client.watch(self)
        client.http.fetch(request, raise_error=False).add_done_callback(self._on_done)

    async def next_events(self):
        """The events received since the last call; None once the stream has ended cleanly."""
        while True:
            if self._events:
                events, self._events = self._events, []
                return events
            if self._failure is not None:
                raise self._failure
            if self._finished:
                return None
            self._waiter = Future()
            await self._waiter

    def close(self):
        """Stops reading: the connection is dropped at Dify's next write."""
        self._aborted = True
        self._finished = True
        self._client.unwatch(self)
        self._wake()

    def fail(self, failure):
        self._failure = failure
        self.close()

    def _wake(self):
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_header(self, line):
        self.last_activity = time.monotonic()
        if self.status is None and line.startswith("HTTP/"):
            try:
                self.status = int(line.split(" ", 2)[1])
            except (IndexError, ValueError):
                self.status = 0

    def _on_chunk(self, chunk):
        if self._aborted:
            raise StreamFailure("dropped", "closed by the proxy")
        self.last_activity = time.monotonic()
        if self.status != 200:
            if len(self._error_body) < _ERROR_BODY_LIMIT:
                self._error_body += chunk
            return
        lines = (self._tail + chunk).split(b"\n") if self._tail else chunk.split(b"\n")
        self._tail = lines.pop()
        before = len(self._events)
        for line in lines:
            self._take_line(line)
        if len(self._events) != before:
            self._wake()

    def _take_line(self, line):
        if line.startswith(b"data:"):
            self._data_lines.append(line[5:])
        elif not line.strip():
            if self._data_lines:
                self._dispatch()
        # "event: ping", comments and other fields carry nothing the proxy needs.

    def _dispatch(self):
        payload = b"\n".join(self._data_lines)
        self._data_lines = []
        try:
            event = json.loads(payload)
        except ValueError:
            self.fail(StreamFailure("malformed", "sent data that is not JSON"))
            raise self._failure
        if not isinstance(event, dict):
            self.fail(StreamFailure("malformed", "sent an event that is not a JSON object"))
            raise self._failure
        if self.task_id is None:
            self.task_id = event.get("task_id")
        self._events.append(event)

    def _on_done(self, future):
        self._client.unwatch(self)
        if self._aborted:
            return
        try:
            response = future.result()
        except Exception as error:
            # raise_error=False only spares HTTP status errors; a refused or cut connection still raises.
            response = None
            broken = error
        if response is None or response.code == 599:
            if self.status is None:
                detail = broken if response is None else response.error
                self._failure = StreamFailure("unreachable", str(detail))
            else:
                self._failure = StreamFailure("dropped", "closed the connection mid-answer")
        elif self.status != 200:
            self._failure = error_from_body(response.code, bytes(self._error_body))
        else:
            if self._tail.strip():
                self._take_line(self._tail)
            self._tail = b""
            if self._data_lines:
                try:
                    self._dispatch()
                except StreamFailure:
                    pass
            self._finished = True
        self._wake()


class DifyClient:
    """Connections to one Dify server, shared by every app key."""

    def __init__(self, base_url, *, connect_timeout=10.0, idle_timeout=90.0, max_connections=1000):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.http = AsyncHTTPClient(force_instance=True, max_clients=max_connections,
                                    max_body_size=1 << 40, max_buffer_size=64 * 1024 * 1024)
        self._streams = set()
        self._watchdog = None

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
        request = HTTPRequest(self.base_url + path, method=method,
                              headers=self.headers(key, content_type=content_type), body=body,
                              connect_timeout=self.connect_timeout,
                              request_timeout=timeout or self.idle_timeout)
        try:
            response = await self.http.fetch(request, raise_error=False)
        except Exception as error:
            raise StreamFailure("timeout" if "Timeout" in type(error).__name__ else "unreachable", str(error))
        if response.code >= 400:
            error = error_from_body(response.code, response.body)
            error.retry_after = response.headers.get("Retry-After")
            raise error
        if response.code == 204 or not response.body:
            return {}
        try:
            return json.loads(response.body)
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
        for stream in [s for s in self._streams if s.last_activity < deadline]:
            log.warning("Dify stream silent for %.1f s; closing it", self.idle_timeout)
            stream.fail(StreamFailure("timeout", f"sent nothing for {self.idle_timeout:g} s"))

    def close(self):
        if self._watchdog is not None:
            self._watchdog.stop()
        self.http.close()
