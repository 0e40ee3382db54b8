"""Small helpers shared by the tests."""

import json
import socket
import time

CLIENT_KEY = "sk-test-key-one"
OTHER_CLIENT_KEY = "sk-test-key-two"
# Answer text with 4-byte and CJK characters, so splits of text and UTF-8 are exercised.
WORDS = "the quick brown fox jumps over the lazy dog while a \U0001f98a and \u72d0\u72f8 watch "


def sse_events(body):
    """The `data:` payloads of an SSE body, parsed (the [DONE] sentinel kept as the string)."""
    events = []
    for block in body.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def sse_comments(body):
    return [line for line in body.decode().split("\n") if line.startswith(":")]


def wait_for(condition, timeout=3.0):
    """Polls a condition recorded on the server's thread (the fake Dify, the logs) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


async def offline_resolver(host, port):
    """The harness's resolver for image URL hosts, so no test sends a DNS query: `localhost` is loopback,
    as /etc/hosts says; any other name gets a public address that nothing ever contacts (the proxy hands
    URLs to Dify, and the fake Dify fetches nothing)."""
    if host.rstrip(".").lower() == "localhost":
        return ["127.0.0.1", "::1"]
    return ["93.184.216.34"]


def open_raw_stream(port, path, body, until, timeout=10):
    """A raw POST of `body` (JSON) on its own socket, returned once `until` has arrived, so a test can
    leave mid-answer by closing it (the caller closes it)."""
    data = json.dumps(body)
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}").encode())
    conn.settimeout(timeout)
    received = b""
    while until not in received:
        chunk = conn.recv(65536)
        assert chunk, received
        received += chunk
    return conn


def merged(pieces):
    """Adjacent pieces of one kind joined, so different chunkings compare equal."""
    out = []
    for kind, text in pieces:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out
