"""The proxy as a process: its open-file limit, its workers, and a graceful stop (python main.py, real signals)."""

import asyncio
import json
import os
import re
import resource
import signal
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import default_apps
from fake_dify import End, FakeDify, Hang, Sleep, Start, Text
from processes import ProxyProcess, RawStream, chat_request, dechunk
from support import sse_events, wait_for

CHAT = "Chat Bot"
METRICS_KEY = "metrics-secret-key"


@pytest.fixture
def dify(loop):
    fake = FakeDify(default_apps())
    loop.run(fake.start())
    yield fake
    loop.run(fake.stop())


@pytest.fixture
def proxies():
    started = []

    def start(dify, **kwargs):
        proxy = ProxyProcess(dify, **kwargs)
        started.append(proxy)
        return proxy
    yield start
    for proxy in started:
        proxy.stop()


def soft_limit(pid):
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    return int(line.split()[3])


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def allow_open_files(count):
    """This test process holds both ends of every stream (client and fake Dify): raise its own limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))  # root in CI; elsewhere this fails loudly
    elif soft != resource.RLIM_INFINITY and soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def test_started_under_ulimit_1024_the_proxy_holds_600_streams(dify, proxies):
    """600 streams are 1,200 sockets in the proxy: past the 1,024 it was started with."""
    streams = 600
    allow_open_files(4 * streams + 500)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proxy = proxies(dify, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))).wait_ready()
    assert soft_limit(proxy.pid) == hard > 1024
    assert f"open-file limit: soft 1024, raised to {hard} (hard {hard})" in proxy.output()
    for _ in range(streams):
        dify.script(dify.apps[0].key, Start(), Text("first words"), Hang())

    async def hold_open():
        opened = await asyncio.gather(*(RawStream.open(proxy.port, CHAT, f"q{i}") for i in range(streams)))
        try:
            received = await asyncio.gather(*(stream.read_until(b"first words", 60) for stream in opened))
            return received, open_files(proxy.pid)
        finally:
            for stream in opened:
                stream.close()
    received, files = asyncio.run(hold_open())
    assert all(body.startswith(b"HTTP/1.1 200") and b"first words" in body for body in received)
    assert files > 2 * streams > 1024
    assert wait_for(lambda: len(dify.stops) == streams, 30), "every run is stopped when its client leaves"
    assert "Too many open files" not in proxy.output()


def resident_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_a_high_connection_limit_costs_no_memory_until_it_is_used(dify, proxies):
    """libcurl handles are made as streams need them: a proxy allowed 20,000 connections to Dify, having
    served a stream, holds about what one allowed 10 holds (Tornado made every handle up front: +120 MB)."""
    rss = {}
    for limit in (10, 20000):
        proxy = proxies(dify, env={"DIFY_MAX_CONNECTIONS": str(limit)}).wait_ready()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            conn.sendall(chat_request(CHAT, "hello"))
            received = b""
            while b"[DONE]" not in received:
                received += conn.recv(65536)
        assert received.startswith(b"HTTP/1.1 200") and b'"finish_reason":"stop"' in received
        rss[limit] = resident_mb(proxy.pid)
    assert rss[20000] - rss[10] < 20, rss


def test_a_hard_limit_too_low_is_one_warning_with_the_fix(dify, proxies):
    proxy = proxies(dify, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))).wait_ready()
    warnings = [line for line in proxy.output().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert "open-file limit (1024) is below the 2100 that DIFY_MAX_CONNECTIONS=1000" in warnings[0]
    assert "LimitNOFILE=65536" in warnings[0] and "ulimit -Hn" in warnings[0]
    assert soft_limit(proxy.pid) == 1024


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_open_streams_finish_then_ends_the_rest(dify, proxies):
    grace = 3.0
    proxy = proxies(dify, env={"SHUTDOWN_GRACE_S": str(grace)}).wait_ready()
    key = dify.apps[0].key
    dify.script(key, Start(), Text("slow "), Sleep(1.0), Text("but done"), End())
    dify.script(key, Start(), Text("endless"), Hang())
    dify.script(key, Start(), Text("partial"), Hang())

    async def scenario():
        finishing = await RawStream.open(proxy.port, CHAT, "one")
        await finishing.read_until(b"slow ")
        endless = await RawStream.open(proxy.port, CHAT, "two")
        await endless.read_until(b"endless")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(chat_request(CHAT, "three", stream=False))
        assert await asyncio.to_thread(wait_for, lambda: len(dify.requests_to("/chat-messages")) == 3, 10)
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        closed = await asyncio.to_thread(wait_for, lambda: refused(proxy.port), grace)
        results = await asyncio.gather(finishing.read_until(b"\r\n0\r\n\r\n"),
                                       endless.read_until(b"\r\n0\r\n\r\n", 30),
                                       asyncio.wait_for(reader.read(), 30))
        writer.close()
        return closed, results, signalled
    closed, (finished, ended, waiting), signalled = asyncio.run(scenario())
    assert closed, "new connections are refused at once"
    events = sse_events(dechunk(finished)[1])
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
    assert "slow but done" in text and events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    events = sse_events(dechunk(ended)[1])
    assert "endless" in json.dumps(events[1]) and events[-2]["error"]["code"] == "server_shutting_down"
    assert events[-1] == "[DONE]"
    assert waiting.startswith(b"HTTP/1.1 503") and b"server_shutting_down" in waiting
    assert proxy.wait(20) == 0
    assert grace - 0.5 < time.monotonic() - signalled < grace + 10
    assert wait_for(lambda: len(dify.stops) == 2, 5), "both Dify runs that were cut are stopped"
    output = proxy.output()
    assert "SIGTERM: stopping" in output and "ended 2 answer(s) still in flight after SHUTDOWN_GRACE_S=3" in output


def scrape(proxy):
    status, body = proxy.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def chat_once(proxy, content):
    connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    connection.sendall(chat_request(CHAT, content, stream=False).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    connection.close()
    return data


def test_workers_share_the_port_and_the_metrics_and_are_restarted(dify, proxies):
    proxy = proxies(dify, env={"WORKERS": "2", "METRICS_KEY": METRICS_KEY}).wait_ready()
    assert wait_for(lambda: len(proxy.children()) == 2, 10)
    workers = proxy.children()
    directory = re.search(r"metrics of the 2 workers are kept in (\S+)", proxy.output()).group(1)
    assert wait_for(lambda: len([n for n in os.listdir(directory) if n.startswith("gauge_livesum_")]) == 2, 10)
    for i in range(20):
        assert chat_once(proxy, f"q{i}").startswith(b"HTTP/1.1 200")
    served = ("opendify_requests_total", (("endpoint", "/v1/chat/completions"), ("model", CHAT), ("status", "200")))
    assert scrape(proxy)[served] == 20, "every worker's requests, whichever worker answers the scrape"

    os.kill(workers[0], signal.SIGKILL)
    assert wait_for(lambda: len(proxy.children()) == 2 and workers[0] not in proxy.children(), 10)
    output = proxy.output()
    assert re.search(rf"child \d \(pid {workers[0]}\) killed by signal 9, restarting", output)
    replacement = (set(proxy.children()) - set(workers)).pop()
    assert wait_for(lambda: f"started (pid {replacement})" in proxy.output(), 10)
    proxy.wait_ready()
    for i in range(10):
        assert chat_once(proxy, f"after {i}").startswith(b"HTTP/1.1 200")
    assert scrape(proxy)[served] == 30, "the dead worker's counts are kept"

    proxy.signal(signal.SIGTERM)
    assert proxy.wait(20) == 0, proxy.output()
    assert not os.path.exists(directory), "the metrics directory is removed at exit"


def test_workers_stop_when_their_parent_is_killed(dify, proxies):
    proxy = proxies(dify, env={"WORKERS": "2"}).wait_ready()
    assert wait_for(lambda: len(proxy.children()) == 2, 10)
    workers = proxy.children()
    proxy.signal(signal.SIGKILL)
    proxy.wait(10)
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 10), "no orphaned worker"


def test_sigint_stops_cleanly_too(dify, proxies):
    proxy = proxies(dify).wait_ready()
    proxy.signal(signal.SIGINT)
    assert proxy.wait(20) == 0
    assert "SIGINT: stopping" in proxy.output() and "Traceback" not in proxy.output()
