"""A fake Dify for load: the chat endpoints of tests/fake_dify.py, lean enough to feed a thousand streams.

The test fake is written for exactness (every mode, every error); this one serves one
chat app as fast as a Python process can: raw asyncio protocols, keep-alive, chunked SSE
with the same event shapes and usage block, timers chained per stream with `call_at`
(no task per token). Plain HTTP and HTTPS listen side by side on 127.0.0.1.

What each answer looks like is asked for in the query, as `key=value` words, e.g.
`bench pattern=bursty seed=3 tag=t1`:
  pattern   steady (tokens of `size`..`size_max` chars at `rate` per second), bursty (30-60
            characters every 200-350 ms), fast (3-6 characters at 200 per second), stamp
            (each token is `@<monotonic time mod 1000>;`, for lag measurements at `rate`);
            flood (`tokens` events of `size` characters, written as fast as the proxy reads them);
  tokens    how many tokens or bursts; first: seconds before the first one;
  seed      the random pattern; tag: remember emit times under this name (GET /bench/emits/<tag>).
A key containing "agent" is an agent-chat app ("Bench Agent"), answering in `agent_message` events.
GET /bench/stats reports connections and TLS handshakes accepted, requests and events sent.

Run: python bench/load_dify.py [--cert C --key K]; it prints one JSON line with its ports.
"""

import argparse
import asyncio
import json
import random
import ssl
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_dify import default_parameters, make_usage  # noqa: E402

APP_NAME = "Bench"
WORDS = ("the quick brown fox jumps over a lazy dog while every small model streams its answer "
         "token by token to a proxy that should cost almost nothing ").split(" ")


class Stats:
    def __init__(self):
        self.connections = 0
        self.handshakes = 0
        self.requests = 0
        self.events = 0
        self.streams = 0
        self.emits = {}


def schedule(options, rnd):
    """[(offset seconds, text or None for a stamp)] of one answer."""
    pattern = options.get("pattern", "steady")
    count = int(options.get("tokens", 50))
    at = float(options.get("first", 0.005))
    plan = []
    if pattern == "bursty":
        for _ in range(count):
            size = rnd.randint(30, 60)
            plan.append((at, _text(rnd, size)))
            at += rnd.uniform(0.2, 0.35)
        return plan
    if pattern == "flood":
        text = _text(rnd, int(options.get("size", 8)))
        return [(0.0, text)] * count
    if pattern == "fast":
        low, high, rate = 3, 6, 200.0
    else:
        low = int(options.get("size", 4))
        high = int(options.get("size_max", low))
        rate = float(options.get("rate", 30))
    for _ in range(count):
        plan.append((at, None if pattern == "stamp" else _text(rnd, rnd.randint(low, high))))
        at += 1.0 / rate
    return plan


def _text(rnd, size):
    out = ""
    while len(out) < size:
        out += rnd.choice(WORDS) + " "
    return out[:size]


def parse_query(query):
    return dict(word.split("=", 1) for word in query.split() if "=" in word)


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answer:
    """One streaming answer, its events written on a chain of loop timers."""

    FLOOD_BATCH = 500  # events written per loop turn in a flood
    FLOOD_BUFFER = 1 << 20  # bytes the transport may hold before a flood waits for the reader

    def __init__(self, protocol, query, user):
        self.protocol = protocol
        self.stats = protocol.stats
        options = parse_query(query)
        self.options = options
        self.tag = options.get("tag")
        self.plan = schedule(options, random.Random(options.get("seed", "1")))
        self.task_id = str(uuid.uuid4())
        ids = (f'"conversation_id":"{uuid.uuid4()}","message_id":"{self.task_id}","created_at":{int(time.time())},'
               f'"task_id":"{self.task_id}","id":"{self.task_id}"')
        name = "agent_message" if protocol.agent else "message"
        self.head = ('data: {"event":"' + name + '",' + ids + ',"answer":').encode()
        self.tail = b',"from_variable_selector":null}\n\n'
        self.end = ('data: ' + json.dumps({"event": "message_end", "conversation_id": None, "task_id": self.task_id,
                                           "id": self.task_id, "metadata": {"usage": make_usage(10, len(self.plan))},
                                           "files": None}, separators=(",", ":")) + "\n\n").encode()
        self.emitted = [] if self.tag else None
        self.index = 0
        self.handle = None
        self.start = protocol.loop.time()

    def begin(self):
        self.stats.streams += 1
        self.protocol.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                                      b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        self._next()

    def _next(self):
        if self.options.get("pattern") == "flood":
            self.handle = self.protocol.loop.call_soon(self._flood)
            return
        if self.index >= len(self.plan):
            self.protocol.transport.write(chunk(self.end) + b"0\r\n\r\n")
            self.finish()
            return
        self.handle = self.protocol.loop.call_at(self.start + self.plan[self.index][0], self._emit)

    def _emit(self):
        text = self.plan[self.index][1]
        now = time.monotonic()
        if text is None:
            text = f"@{now % 1000:.6f};"  # short enough to count as a token, not a burst
        self.index += 1
        self.protocol.transport.write(chunk(self.head + json.dumps(text).encode() + self.tail))
        self.stats.events += 1
        if self.emitted is not None:
            self.emitted.append((now, len(text)))
        self._next()

    def _flood(self):
        """Writes the next batch of a flood, or waits while the reader is behind."""
        transport = self.protocol.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.FLOOD_BUFFER:
            self.handle = self.protocol.loop.call_later(0.005, self._flood)
            return
        batch = self.plan[self.index:self.index + self.FLOOD_BATCH]
        if not batch:
            self.index = len(self.plan)
            self.options["pattern"] = "done"
            self._next()
            return
        self.index += len(batch)
        transport.write(b"".join(chunk(self.head + json.dumps(text).encode() + self.tail) for _, text in batch))
        self.stats.events += len(batch)
        self.handle = self.protocol.loop.call_soon(self._flood)

    def stop(self):
        self.options["pattern"] = "stopped"
        if self.handle is not None:
            self.handle.cancel()
        self.index = len(self.plan)
        self._next()

    def finish(self):
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.stats.streams -= 1
        if self.tag:
            self.stats.emits[self.tag] = self.emitted
        self.protocol.answer_done(self)


class DifyProtocol(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), no pipelining."""

    answers = {}

    def __init__(self, stats, secure):
        self.stats = stats
        self.secure = secure
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.answer = None
        self.transport = None
        self.close_after = False
        self.agent = False

    def connection_made(self, transport):
        self.transport = transport
        self.stats.connections += 1
        if self.secure:
            self.stats.handshakes += 1

    def connection_lost(self, exc):
        if self.answer is not None:
            answer, self.answer = self.answer, None
            if answer.handle is not None:
                answer.handle.cancel()
            self.stats.streams -= 1
            self.answers.pop(answer.task_id, None)

    def data_received(self, data):
        self.buffer += data
        self._serve()

    def _serve(self):
        while self.answer is None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            lines = self.buffer[:head_end].decode("latin1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4:head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length:]
            method, target = lines[0].split(" ")[:2]
            self.stats.requests += 1
            self.close_after = headers.get("connection", "").lower() == "close"
            self.agent = "agent" in headers.get("authorization", "")
            self._route(method, target, body)
            if self.close_after and self.answer is None:
                self.transport.close()
                return

    def _route(self, method, path, body):
        if path == "/v1/info":
            return self._json({"name": APP_NAME + (" Agent" if self.agent else ""), "description": "load fake",
                               "tags": [], "mode": "agent-chat" if self.agent else "chat", "author_name": "bench"})
        if path == "/v1/parameters":
            return self._json(default_parameters("agent-chat" if self.agent else "chat"))
        if path == "/bench/stats":
            stats = self.stats
            return self._json({"connections": stats.connections, "tls_connections": stats.handshakes,
                               "requests": stats.requests, "events": stats.events, "streams": stats.streams})
        if path.startswith("/bench/emits/"):
            return self._json(self.stats.emits.pop(path.rsplit("/", 1)[1], None))
        if method == "POST" and path.endswith("/stop"):
            answer = self.answers.get(path.split("/")[-2])
            if answer is not None:
                answer.stop()
            return self._json({"result": "success"})
        if method == "POST" and path == "/v1/chat-messages":
            request = json.loads(body)
            self.answer = Answer(self, request.get("query", ""), request.get("user", ""))
            self.answers[self.answer.task_id] = self.answer
            self.answer.begin()
            return None
        return self._json({"code": "not_found", "message": "not found", "status": 404}, 404)

    def answer_done(self, answer):
        self.answers.pop(answer.task_id, None)
        self.answer = None
        if self.close_after:
            self.transport.close()
        elif self.buffer:
            self._serve()

    def _json(self, data, status=200):
        body = json.dumps(data).encode()
        self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(body), body))


async def serve(cert=None, key=None, ready=None):
    """Starts both listeners; returns (stats, http port, https port or None, servers)."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    plain = await loop.create_server(lambda: DifyProtocol(stats, False), "127.0.0.1", 0, backlog=4096)
    servers = [plain]
    https_port = None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        secure = await loop.create_server(lambda: DifyProtocol(stats, True), "127.0.0.1", 0, ssl=context,
                                          backlog=4096)
        servers.append(secure)
        https_port = secure.sockets[0].getsockname()[1]
    return stats, plain.sockets[0].getsockname()[1], https_port, servers


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop by itself after this long")
    args = parser.parse_args()
    _, http_port, https_port, servers = await serve(args.cert, args.key)
    print(json.dumps({"http": http_port, "https": https_port}), flush=True)
    await asyncio.sleep(args.max_seconds)
    for server in servers:
        server.close()


if __name__ == "__main__":
    try:
        import uvloop  # the load fake is not what is measured: let it be as light as it can
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
