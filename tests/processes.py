"""The proxy as a separate process (`python main.py`), for what only a real process shows: signals,
worker processes, open-file limits, several instances behind nginx."""

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from support import CLIENT_KEY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ProxyProcess:
    """`python main.py` against a fake Dify, its output kept in a file the test can read at any time."""

    def __init__(self, dify, env=None, preexec_fn=None):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="opendify-proxy-", suffix=".log")
        variables = {k: v for k, v in os.environ.items() if not k.startswith(("DIFY_", "PROMETHEUS_"))}
        variables.update({"DIFY_API_KEYS": ",".join(app.key for app in dify.apps), "DIFY_API_BASE": dify.base_url,
                          "VALID_API_KEYS": CLIENT_KEY, "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(self.port),
                          "SMOOTH_STREAMING": "off", **(env or {})})
        self.popen = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")], env=variables,
                                      cwd=tempfile.gettempdir(), stdout=self.log, stderr=subprocess.STDOUT,
                                      preexec_fn=preexec_fn)
        self.pid = self.popen.pid

    def output(self):
        self.log.flush()
        with open(self.log.name) as written:
            return written.read()

    def get(self, path, headers=None, timeout=10):
        """(status, body) of a GET."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self, seconds=20):
        """Waits until GET /ready answers 200 (models loaded, Dify reachable)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"the proxy exited:\n{self.output()}"
            try:
                if self.get("/ready", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the proxy did not become ready:\n{self.output()}")

    def children(self):
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as listed:
                return sorted(int(pid) for pid in listed.read().split())
        except FileNotFoundError:
            return []

    def signal(self, signum=signal.SIGTERM):
        self.popen.send_signal(signum)

    def wait(self, seconds=20):
        return self.popen.wait(seconds)

    def stop(self):
        if self.popen.poll() is None:
            for child in self.children():
                os.kill(child, signal.SIGKILL)
            self.popen.kill()
            self.popen.wait(10)
        self.log.close()


def chat_request(model, content, stream=True, extra=None):
    """The bytes of one chat completion request over HTTP/1.1."""
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}],
                       **(extra or {})}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def dechunk(response):
    """(head, body) of a raw HTTP/1.1 response with a chunked body; the body only if it ended properly."""
    head, _, rest = response.partition(b"\r\n\r\n")
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, body
        body, rest = body + rest[:size], rest[size + 2:]


class RawStream:
    """One streaming request on its own connection, read as it arrives (asyncio, so hundreds fit in a test)."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.received = b""

    @classmethod
    async def open(cls, port, model, content):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat_request(model, content))
        return cls(reader, writer)

    async def read_until(self, marker, seconds=20):
        """Reads until `marker` has arrived; returns everything received so far."""
        deadline = asyncio.get_running_loop().time() + seconds
        while marker not in self.received:
            remaining = deadline - asyncio.get_running_loop().time()
            data = await asyncio.wait_for(self.reader.read(65536), max(0.01, remaining))
            if not data:
                break
            self.received += data
        return self.received

    def close(self):
        self.writer.close()
