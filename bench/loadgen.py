"""The benchmark's client side: lean keep-alive HTTP/1.1 connections and SSE readers.

Raw asyncio protocols, so that the load generator costs little next to what it measures;
every network read is timestamped as it arrives (time.monotonic, the same clock the load
fake stamps its tokens with).
"""

import asyncio
import json
import re
import time

STAMP = re.compile(rb"@(\d+\.\d+);")
TEXT = re.compile(rb'"(?:content|answer)":"([^"]*)"')


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. The body (chunked or sized) is handed
    decoded to `on_body(arrived, data)`, once per network read."""

    def __init__(self):
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self._reset(None)

    @classmethod
    async def open(cls, port, ssl_context=None):
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, "127.0.0.1", port, ssl=ssl_context,
                                                     server_hostname="127.0.0.1" if ssl_context else None)
        return connection

    def _reset(self, on_body):
        self.on_body = on_body
        self.buffer = b""
        self.status = None
        self.headers = {}
        self.remaining = None  # bytes of the current chunk (or of a sized body) still to read
        self.chunked = False
        self.done = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed before the response was complete"))

    def request(self, method, path, headers, body=b"", on_body=None):
        """Sends a request; the future resolves to the status once the whole response is read."""
        self._reset(on_body or (lambda arrived, data: None))
        self.done = asyncio.get_running_loop().create_future()
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self.done

    def data_received(self, data):
        arrived = time.monotonic()
        self.buffer += data
        if self.status is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin1").split("\r\n")
            self.buffer = self.buffer[end + 4:]
            self.status = int(head[0].split(" ")[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
            self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
            if not self.chunked:
                self.remaining = int(self.headers.get("content-length", "0"))
        out = []
        finished = False
        if self.chunked:
            while True:
                if self.remaining is None:
                    line_end = self.buffer.find(b"\r\n")
                    if line_end < 0:
                        break
                    size = int(self.buffer[:line_end], 16)
                    if size == 0:
                        if len(self.buffer) < line_end + 4:
                            break
                        self.buffer = self.buffer[line_end + 4:]
                        finished = True
                        break
                    self.buffer = self.buffer[line_end + 2:]
                    self.remaining = size
                if len(self.buffer) < self.remaining + 2:
                    if self.remaining and self.buffer:
                        take = min(len(self.buffer), self.remaining)
                        out.append(self.buffer[:take])
                        self.buffer = self.buffer[take:]
                        self.remaining -= take
                    if self.remaining or len(self.buffer) < 2:
                        break
                out.append(self.buffer[:self.remaining])
                self.buffer = self.buffer[self.remaining + 2:]
                self.remaining = None
        else:
            take = self.buffer[:self.remaining]
            self.buffer = self.buffer[len(take):]
            self.remaining -= len(take)
            out.append(take)
            finished = self.remaining == 0
        if out:
            self.on_body(arrived, b"".join(out))
        if finished and not self.done.done():
            self.done.set_result(self.status)

    def close(self):
        if self.transport is not None:
            self.transport.close()


class SSE:
    """Collects one SSE answer: the time and text of every delta (or only the token stamps)."""

    def __init__(self, kind, stamps_only=False):
        self.kind = kind  # "openai" (the proxy), "responses" (the proxy's Responses API) or "dify" (the fake)
        self.stamps_only = stamps_only
        self.first = None
        self.texts = []  # (arrived, text)
        self.lags = []
        self.events = 0
        self._tail = b""
        self._partial = b""

    def __call__(self, arrived, data):
        blocks = (self._tail + data).split(b"\n\n")
        self._tail = blocks.pop()
        if self.stamps_only:
            # Stamps may be split across deltas (the pacer splits text anywhere): join the deltas' text first.
            text = self._partial + b"".join(TEXT.findall(b"\n".join(blocks)))
            end = text.rfind(b";") + 1
            self._partial = text[end:]
            stamps = STAMP.findall(text[:end])
            if stamps:
                if self.first is None:
                    self.first = arrived
                self.lags += [(arrived - float(stamp)) % 1000 for stamp in stamps]
            self.events += len(blocks)
            return
        for block in blocks:
            if block.startswith(b"event: "):  # the Responses API names each event on a line before its data
                block = block[block.find(b"\n") + 1:]
            if not block.startswith(b"data: {"):
                continue
            self.events += 1
            text = self._text(json.loads(block[6:]))
            if text:
                if self.first is None:
                    self.first = arrived
                self.texts.append((arrived, text))

    def _text(self, event):
        if self.kind == "dify":
            return event.get("answer") if event.get("event") == "message" else None
        if self.kind == "responses":
            return event.get("delta") if event.get("type") == "response.output_text.delta" else None
        choices = event.get("choices") or ()
        return choices[0].get("delta", {}).get("content") if choices else None

    def char_times(self):
        times = []
        for arrived, text in self.texts:
            times += [arrived] * len(text)
        return times


CLIENT_KEY = "sk-bench-key"
DIFY_KEY = "app-bench0000000000000000000000"


def proxy_request(query, stream=True, responses=False):
    """A chat completion request, or with `responses` the same ask through the Responses API."""
    if responses:
        body, path = {"model": "Bench", "stream": stream, "input": query}, "/v1/responses"
    else:
        body, path = {"model": "Bench", "stream": stream, "messages": [{"role": "user", "content": query}]}, \
            "/v1/chat/completions"
    return ("POST", path,
            {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}, json.dumps(body).encode())


def dify_request(query):
    body = {"inputs": {}, "query": query, "user": "bench", "response_mode": "streaming", "conversation_id": ""}
    return ("POST", "/v1/chat-messages", {"Authorization": f"Bearer {DIFY_KEY}", "Content-Type": "application/json",
                                          "Accept": "text/event-stream"}, json.dumps(body).encode())


async def run_one(connection, kind, query, stamps_only=False, stream=True, timeout=60.0):
    """One answer on an open connection: (status, SSE collector, sent at); gives up after `timeout` s."""
    method, path, headers, body = (dify_request(query) if kind == "dify"
                                   else proxy_request(query, stream, responses=kind == "responses"))
    collector = SSE(kind, stamps_only)
    sent = time.monotonic()
    status = await asyncio.wait_for(connection.request(method, path, headers, body, collector), timeout)
    return status, collector, sent
