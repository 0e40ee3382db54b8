"""Dify's Service API, through Tornado's AsyncHTTPClient on libcurl.

`CurlAsyncHTTPClient` keeps connections to Dify alive between requests, retries a request
that met a kept connection the server had just closed, speaks HTTP/2 where Dify's front
server offers it, verifies TLS and goes through an egress proxy. Where pycurl cannot be
imported, Tornado's simple client stands in (one warning at start-up): slower, a new
connection per request, no proxy, and a departed client's transfer ends only when Dify
next sends something.

Around each fetch this module adds what a streaming proxy needs and the client lacks:
- slots: at most DIFY_MAX_CONNECTIONS requests at once. A request waits for a slot at
  most the connect timeout and then fails with DifyBusy; its idle clock starts only when it
  goes out. Stop calls and app refreshes use a second client with slots of their own,
  so they never wait behind streams.
- no total time limit on streams (libcurl's TIMEOUT is one): a watchdog fails any stream
  silent for longer than the idle timeout (Dify pings every 10 s while it works).
- aborts: closing a stream makes libcurl's progress callback fail the transfer, and
  pausing and resuming the transfer makes libcurl run that callback at once, even while
  Dify sends nothing.
"""

import asyncio
import datetime
import json
import logging
import ssl
import time
from urllib.parse import urlencode
from uuid import uuid4

from tornado.concurrent import Future
from tornado.httpclient import HTTPRequest
from tornado.ioloop import PeriodicCallback
from tornado.locks import Semaphore
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.util import TimeoutError as SlotTimeout

try:
    import pycurl
    from tornado.curl_httpclient import CurlAsyncHTTPClient
except ImportError:  # the simple client stands in; see _warn_without_curl
    pycurl = None

try:
    from orjson import loads as _loads
except ImportError:  # orjson is optional: it only makes parsing Dify's events cheaper
    _loads = json.loads

log = logging.getLogger("opendify.dify")

_JSON_BODY_LIMIT = 64 * 1024 * 1024
_STREAM_BODY_LIMIT = 1 << 40
_ERROR_BODY_LIMIT = 64 * 1024
_QUEUE_LIMIT = 256 * 1024  # bytes of events a stream holds for a reader that is not taking them, before pausing
_NO_TOTAL_LIMIT = 10 * 365 * 86400.0  # s; the simple client reads 0 as "no connect timeout" too
_CONNECTION_MAX_AGE = 30  # s an unused connection is kept for reuse
_CONNECTIONS_KEPT = 256  # unused connections kept at most per client
_CONTROL_SLOTS = 32  # stop calls and app refreshes at once
STOP_PATHS = {
    "chat": "/chat-messages/{}/stop",
    "completion": "/completion-messages/{}/stop",
    "workflow": "/workflows/tasks/{}/stop",
}


class DifyFailure(Exception):
    """Dify gave no usable answer. What callers catch; each kind is its own class, httpx-style:

    DifyFailure
    ├── DifyError             Dify answered with its error envelope {code, message, status}
    └── DifyTransportError    the exchange itself broke (`detail` says how)
        ├── DifyUnreachable   no connection in time, a refused TLS certificate, or closed unanswered
        ├── DifyTimeout       silent past the idle timeout, or no whole answer within a call's limit
        ├── DifyBusy          every connection slot stayed taken (the proxy's own limit, not Dify's)
        ├── DifyMalformed     answered with something that is not JSON or not an SSE event object
        └── DifyDropped       closed the connection in the middle of its answer

    errors.from_dify_failure is the one mapping of each to what an OpenAI client sees; `label`
    names the kind in logs and in the opendify_dify_errors metric.
    """

    label = "failure"


class DifyError(DifyFailure):
    """Dify answered with its error envelope {code, message, status}."""

    def __init__(self, status, code, message, retry_after=None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def label(self):
        return f"http_{self.status}"


class DifyTransportError(DifyFailure):
    """The exchange with Dify broke before a whole answer came; `detail` says how, in words."""

    def __init__(self, detail):
        super().__init__(f"{self.label}: {detail}")
        self.detail = detail


class DifyUnreachable(DifyTransportError):
    label = "unreachable"


class DifyTimeout(DifyTransportError):
    """Dify sent nothing for `seconds`, or gave no whole answer within a call's limit of `seconds`."""

    label = "timeout"

    def __init__(self, detail, seconds):
        super().__init__(detail)
        self.seconds = seconds


class DifyBusy(DifyTransportError):
    """All `limit` connection slots stayed in use: the request never went out."""

    label = "busy"

    def __init__(self, detail, limit):
        super().__init__(detail)
        self.limit = limit


class DifyMalformed(DifyTransportError):
    label = "malformed"


class DifyDropped(DifyTransportError):
    label = "dropped"


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


def transport_failure(error, exchange, seconds):
    """The DifyTransportError for a fetch that ended without a whole response: dropped once Dify had
    answered, a timeout when the request's limit of `seconds` passed on an open connection,
    unreachable when no connection could be made in time or Dify closed it unanswered."""
    detail = str(error) or type(error).__name__
    if exchange.status is not None:
        return DifyDropped(detail)
    if exchange.connected and pycurl is not None and getattr(error, "errno", None) == pycurl.E_OPERATION_TIMEDOUT:
        return DifyTimeout(detail, seconds)
    return DifyUnreachable(detail)


def ca_certificates(ca_file="", ca_dir=""):
    """The CA file and folder to trust: those given (SSL_CERT_FILE / SSL_CERT_DIR from the
    settings, so `.env` counts), else what Python's ssl module trusts (the same variables in the
    environment, else the system's store). libcurl gets them explicitly because a pycurl wheel's built-in default is
    the path of the system it was built on (e.g. /etc/pki/tls/certs/ca-bundle.crt), which
    other systems do not have."""
    paths = ssl.get_default_verify_paths()
    return ca_file or paths.cafile, ca_dir or paths.capath


class SSEDecoder:
    """Dify's SSE body, parsed into event dicts as the bytes arrive.

    Lines are split as bytes, so a UTF-8 character split across two reads is only ever
    decoded whole. A line still arriving is kept as a list of pieces and joined once its
    end comes (as httpx's LineDecoder does), so a long line costs what its bytes cost,
    however many reads it arrives in.
    """

    def __init__(self):
        self.task_id = None
        self._partial = []
        self._data_lines = []

    def feed(self, chunk, events):
        """Appends the events completed by `chunk` to `events`; raises DifyMalformed."""
        lines = chunk.split(b"\n")
        tail = lines.pop()
        partial = self._partial
        if partial:
            if not lines:
                partial.append(tail)
                return
            partial.append(lines[0])
            lines[0] = b"".join(partial)
            partial.clear()
        if tail:
            partial.append(tail)
        for line in lines:
            if line.startswith(b"data:"):
                self._data_lines.append(line[5:])
            elif self._data_lines and not line.strip():
                events.append(self._dispatch())
            # "event: ping", comments and other fields carry nothing the proxy needs.

    def finish(self, events):
        """The body ended: a last event not followed by a blank line still counts."""
        line = b"".join(self._partial)
        self._partial.clear()
        if line.startswith(b"data:"):
            self._data_lines.append(line[5:])
        if self._data_lines:
            events.append(self._dispatch())

    def _dispatch(self):
        data_lines = self._data_lines
        payload = b"\n".join(data_lines) if len(data_lines) > 1 else data_lines[0]
        self._data_lines = []
        try:
            event = _loads(payload)
        except ValueError:
            raise DifyMalformed("sent data that is not JSON")
        if event.__class__ is not dict:
            raise DifyMalformed("sent an event that is not a JSON object")
        if self.task_id is None:
            self.task_id = event.get("task_id")
        return event


class CurlHandles(list):
    """The free curl handles of a CurlAsyncHTTPClient, each made when a transfer first needs it.

    Tornado makes `max_clients` handles up front, about 6 KB each: with DIFY_MAX_CONNECTIONS=5000
    an idle proxy held 30 MB of handles it might never use (1,000 streams peaked at 115 MB instead
    of 60). Tornado takes a free handle with `pop()` while the list is true and gives it back with
    `append()`; this list is true while a handle is free or may still be made."""

    def __init__(self, client, size):
        super().__init__()
        self._client = client
        self._unmade = size

    def __bool__(self):
        return len(self) > 0 or self._unmade > 0

    def pop(self):
        if len(self):
            return super().pop()
        self._unmade -= 1
        curl = self._client._curl_create()
        self._client._curls.append(curl)  # closed with the client
        return curl


class Lane:
    """One AsyncHTTPClient with its own slots. Streams and uploads take one lane, stop calls
    and app refreshes another, so a full lane of streams never delays a stop.

    The slots, not the client's own queue, decide when a request goes out: the curl
    client's queue has no time limit, and time spent in it would count as Dify's silence.
    """

    def __init__(self, size, wait, max_body_size):
        self.size = size
        self.wait = wait
        self._max_body_size = max_body_size
        self._slots = Semaphore(size)
        self._http = None

    @property
    def http(self):
        """The client, made on first use: it belongs to the loop it is made on."""
        if self._http is None:
            if pycurl is not None:
                self._http = CurlAsyncHTTPClient(force_instance=True, max_clients=0,
                                                 max_body_size=self._max_body_size)
                self._http._free_list = CurlHandles(self._http, self.size)
                self._http._multi.setopt(pycurl.M_MAXCONNECTS, min(self.size, _CONNECTIONS_KEPT))
            else:
                self._http = SimpleAsyncHTTPClient(force_instance=True, max_clients=self.size,
                                                   max_body_size=self._max_body_size)
        return self._http

    async def acquire(self):
        """A slot, or DifyBusy once all were taken for longer than `wait`."""
        try:
            await self._slots.acquire(datetime.timedelta(seconds=self.wait))
        except SlotTimeout:
            raise DifyBusy(f"all {self.size} connections to Dify stayed in use for {self.wait:g} s", self.size)

    def release(self):
        self._slots.release()

    def close(self):
        if self._http is not None:
            self._http.close()


class Exchange:
    """What one fetch learned before it ended: the status Dify answered and whether a connection
    was made, which tell a dropped answer, a timeout and an unreachable Dify apart."""

    status = None
    connected = False
    _curl = None

    def prepare(self, curl, client):
        self._curl = curl
        client.curl_options(curl)
        curl.setopt(pycurl.PREREQFUNCTION, self._on_connected)

    def _on_connected(self, *_):
        self.connected = True
        return pycurl.PREREQFUNC_OK

    def on_header(self, line):
        if line.startswith("HTTP/"):
            self.status = int(line.split(None, 2)[1])


class EventStream(Exchange):
    """One SSE response from Dify, parsed into event dicts as the bytes arrive.

    libcurl's write callback parses every network read as it comes (`_write`; the simple client's
    streaming callback does the same through `_on_chunk`); complete events are handed to the reader
    in batches: one wake-up per read, not per event.
    """

    def __init__(self, client, key, path, body):
        self.last_activity = time.monotonic()
        self._client = client
        self._decoder = SSEDecoder()
        self._events = []
        self._waiter = None
        self._error_body = bytearray()
        self._failure = None
        self._finished = False
        self._aborted = False
        self._fetch = None
        self._queued = 0  # bytes behind the events not yet taken
        self.paused = False
        self.retry_after = None  # Dify's Retry-After header, for an error answer
        request = client.request("POST", key, path, json.dumps(body, ensure_ascii=False).encode(),
                                 accept="text/event-stream", timeout=_NO_TOTAL_LIMIT)
        request.streaming_callback = self._on_chunk
        request.header_callback = self.on_header
        request.prepare_curl_callback = self._prepare
        self._task = asyncio.ensure_future(self._run(request))

    @property
    def task_id(self):
        return self._decoder.task_id

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
        """Stops reading and ends the transfer to Dify at once."""
        if self._aborted:
            return
        self._aborted = True
        self._finished = True
        self._client.unwatch(self)
        self._wake_transfer()
        self._wake()

    def fail(self, failure):
        if self._failure is None:
            self._failure = failure
        self.close()

    def _transfer_running(self):
        """Whether the curl handle is still this stream's: after the fetch it may serve another request."""
        return self._curl is not None and self._fetch is not None and not self._fetch.done()

    def _let_in(self):
        """The reader took the events: libcurl may write again (see `_write`)."""
        self._queued = 0
        if self.paused:
            self.paused = False
            self.last_activity = time.monotonic()  # a paused stream's silence was the client's, not Dify's
            if self._transfer_running():
                try:
                    self._curl.pause(pycurl.PAUSE_CONT)
                except pycurl.error:
                    pass

    def _wake_transfer(self):
        """libcurl runs a transfer's progress callback only when it works on it: when data
        arrives or about once a second. Pausing and resuming makes it run at once, so a silent
        transfer sees the abort now."""
        if not self._transfer_running():
            return
        try:
            self._curl.pause(pycurl.PAUSE_ALL)
            self._curl.pause(pycurl.PAUSE_CONT)
        except pycurl.error:
            pass  # the transfer is ending anyway

    def _wake(self):
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _run(self, request):
        lane = self._client.streams
        try:
            await lane.acquire()
        except DifyBusy as failure:
            self._end(failure)
            return
        try:
            if self._aborted:
                return
            self.last_activity = time.monotonic()
            self._client.watch(self)
            self._fetch = lane.http.fetch(request, raise_error=False)
            response = await self._fetch
        except Exception as error:  # every way a fetch fails: libcurl's errors, the simple client's socket errors
            self._end(None if self._aborted else transport_failure(error, self, request.request_timeout))
            return
        finally:
            lane.release()
            self._client.unwatch(self)
            self._curl = None
        if self.status != 200:
            error = error_from_body(response.code, bytes(self._error_body))
            error.retry_after = self.retry_after
            self._end(error)
        else:
            self._end_body()

    def _prepare(self, curl):
        self.prepare(curl, self._client)
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self._progress)
        curl.setopt(pycurl.WRITEFUNCTION, self._write)
        # Header lines are taken as libcurl reads them: Tornado's header function hands each line to a loop
        # callback (a loop turn per line), so the status was not known yet when the body's first bytes came.
        curl.setopt(pycurl.HEADERFUNCTION, lambda line: self.on_header(line.decode("latin1")))

    def _write(self, chunk):
        """libcurl's write callback, run inside curl_multi_socket_action. The chunk is parsed right here:
        parsing only appends events and resolves the reader's future (its code runs in a later loop turn),
        and pausing a transfer is allowed inside its callbacks; queueing each chunk for a loop callback, as
        Tornado's own write callback does, cost every Dify read a loop turn more (and the first token with
        it). While the reader leaves events waiting (a client that is not reading), the transfer is paused
        right here, so libcurl stops reading Dify's connection at once; the chunk is kept by libcurl and
        written again when `_let_in` resumes. Only while events wait: the bytes of one long event still
        arriving have no reader to let them in. (Tornado's write callback buffers a megabyte per transfer
        before pausing, and resumes at the end of each delivery, so a stalled client could hold several
        megabytes.)"""
        if self._aborted:
            return None  # taken and dropped, so that the transfer runs on to its abort
        if self._events and self._queued > _QUEUE_LIMIT:
            self.paused = True
            return pycurl.WRITEFUNC_PAUSE
        self._on_chunk(chunk)
        return None

    def _progress(self, *_):
        """libcurl's progress callback: a true answer ends the transfer."""
        return self._aborted

    def on_header(self, line):
        super().on_header(line)
        if line[:12].lower() == "retry-after:":
            self.retry_after = line[12:].strip()
        self.last_activity = time.monotonic()

    def _on_chunk(self, chunk):
        if self._aborted:
            if pycurl is None:
                raise DifyDropped("closed by the proxy")  # how the simple client's fetch is ended
            return
        self.last_activity = time.monotonic()
        if self.status != 200:
            if len(self._error_body) < _ERROR_BODY_LIMIT:
                self._error_body += chunk
            return
        events = self._events
        before = len(events)
        try:
            self._decoder.feed(chunk, events)
        except DifyMalformed as failure:
            self.fail(failure)
            return
        if len(events) != before:
            self._wake()
        self._queued += len(chunk)

    def _end_body(self):
        if self._aborted:
            return
        try:
            self._decoder.finish(self._events)
        except DifyMalformed as failure:
            self._end(failure)
            return
        self._finished = True
        self._wake()

    def _end(self, failure):
        if failure is not None and not self._aborted and self._failure is None:
            self._failure = failure
        self._wake()


class DifyClient:
    """Requests to one Dify server, shared by every app key."""

    def __init__(self, base_url, *, connect_timeout=10.0, idle_timeout=90.0, max_connections=1000, proxy="",
                 no_proxy=None, ca_file="", ca_dir=""):
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.base_url = base_url
        self.proxy = proxy
        self.no_proxy = no_proxy
        self.ca_file, self.ca_path = ca_certificates(ca_file, ca_dir)
        if pycurl is None:
            _warn_without_curl(proxy)
        self.streams = Lane(max_connections, connect_timeout, _STREAM_BODY_LIMIT)
        self.control = Lane(_CONTROL_SLOTS, connect_timeout, _JSON_BODY_LIMIT)
        self._streams = set()
        self._watchdog = None

    @property
    def base_url(self):
        return self._base_url

    @base_url.setter
    def base_url(self, url):
        self._base_url = url.rstrip("/")

    def request(self, method, key, path, body, *, accept="application/json", content_type="application/json",
                timeout=None):
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type, "Accept": accept}
        return HTTPRequest(self._base_url + path, method=method, headers=headers, body=body, user_agent="OpenDify",
                           connect_timeout=self.connect_timeout, request_timeout=timeout or self.idle_timeout,
                           decompress_response=False, follow_redirects=False, ca_certs=self.ca_file,
                           allow_nonstandard_methods=True)  # DELETE /conversations carries a body

    def curl_options(self, curl):
        """What every transfer to Dify sets beyond Tornado's defaults."""
        curl.setopt(pycurl.VERBOSE, 0)  # Tornado turns it on at DEBUG: it would log the Dify keys
        # Without it libcurl saves, sets and restores SIGPIPE's handler around every socket_action (three
        # syscalls per Dify read). Python ignores SIGPIPE already, and the wheel's resolver is threaded, so
        # no alarm() timeout is lost. (Tornado sets it only when several threads run.)
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.MAXAGE_CONN, _CONNECTION_MAX_AGE)
        # libcurl's default upload buffer is 64 KB per running transfer; bodies to Dify are sent once,
        # and a thousand open streams would hold 64 MB of it.
        curl.setopt(pycurl.UPLOAD_BUFFERSIZE, 16384)
        if self.ca_path:
            curl.setopt(pycurl.CAPATH, self.ca_path)
        # Set even when empty: libcurl would otherwise read http_proxy (lower case only) itself.
        curl.setopt(pycurl.PROXY, self.proxy)
        if self.no_proxy is not None:
            curl.setopt(pycurl.NOPROXY, self.no_proxy)
        if self.ca_file:
            curl.setopt(pycurl.PROXY_CAINFO, self.ca_file)
        if self.ca_path:
            curl.setopt(pycurl.PROXY_CAPATH, self.ca_path)

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
        mime = "".join(ch for ch in mime if " " < ch < "\x7f") or "application/octet-stream"  # a header value
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe_name}"\r\n'
                f"Content-Type: {mime}\r\n\r\n").encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        return await self._call("POST", key, "/files/upload", body, lane=self.streams,
                                content_type=f"multipart/form-data; boundary={boundary}")

    async def _call(self, method, key, path, body, timeout=None, content_type="application/json", lane=None):
        """One request answered with JSON; control calls (refreshes, stops) by default."""
        lane = lane or self.control
        exchange = Exchange()
        request = self.request(method, key, path, body, content_type=content_type, timeout=timeout)
        request.header_callback = exchange.on_header
        request.prepare_curl_callback = lambda curl: exchange.prepare(curl, self)
        await lane.acquire()
        try:
            response = await lane.http.fetch(request, raise_error=False)
        except Exception as error:  # every way a fetch fails: libcurl's errors, the simple client's socket errors
            failure = transport_failure(error, exchange, request.request_timeout)
            if isinstance(failure, DifyTimeout):
                failure.detail = f"no complete answer to {path} within {request.request_timeout:g} s"
            raise failure
        finally:
            lane.release()
        data = response.body or b""
        if response.code >= 400:
            error = error_from_body(response.code, data)
            error.retry_after = response.headers.get("Retry-After")
            raise error
        if response.code == 204 or not data:
            return {}
        try:
            return json.loads(data)
        except ValueError:
            raise DifyMalformed(f"answered {path} with a body that is not JSON")

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
        for stream in [s for s in self._streams if s.last_activity < deadline and not s.paused]:
            log.warning("Dify stream silent for %.1f s; closing it", self.idle_timeout)
            stream.fail(DifyTimeout(f"sent nothing for {self.idle_timeout:g} s", self.idle_timeout))

    def close(self):
        if self._watchdog is not None:
            self._watchdog.stop()
        self.streams.close()
        self.control.close()


def _warn_without_curl(proxy):
    log.warning("pycurl cannot be imported: using Tornado's simple HTTP client for Dify (slower, a new connection "
                "per request%s); pip install pycurl", ", HTTPS_PROXY/HTTP_PROXY ignored" if proxy else "")
