"""What long answers, floods of events, stalled readers and a long mixed run cost the proxy.

    python bench/lifetime.py                               # this tree
    python bench/lifetime.py --proxy-dir /work/wt/base     # and another checkout, side by side
    python bench/lifetime.py --quick                       # smaller figures, about a minute

The load fake (load_dify.py) and each proxy (`python main.py`, as users run it) are started
once; every scenario runs against each proxy in turn, in the same run. While a scenario
runs, a probe sends `GET /v1/models` back to back on its own connection: its slowest answer
is how long the proxy's loop was blocked. Figures:

1. flood: one stream of 50,000 small events sent as fast as the proxy reads them; relay time,
   proxy CPU, the longest probe answer;
2. answers of 800 KB (40,000 events) from a chat app and from an agent app: proxy CPU and
   the longest probe answer;
3. stalled readers: 20 clients ask for 8 MB answers and read nothing for a while; the proxy's
   RSS growth while they stall and after they leave, and its open descriptors; then the same
   again (the first round includes the allocator's one-time growth);
4. soak: thousands of mixed requests (streams, non-streams, clients leaving at once or mid-
   answer, unknown models, bad bodies), several at a time: RSS and open descriptors after a
   warm-up and at the end.

Writes bench/results/lifetime-<time>.json and prints a table.
"""

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import CLIENT_KEY, DIFY_KEY, Connection  # noqa: E402
from run import Process, free_port, wait_ready  # noqa: E402

AGENT_KEY = "app-benchagent0000000000000000"
RESULTS = BENCH / "results"


def start_fake(limit):
    fake = Process("fake", [sys.executable, str(BENCH / "load_dify.py"), "--max-seconds", str(limit)])
    return fake, json.loads(fake.popen.stdout.readline())["http"]


def start_proxy(name, folder, upstream):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIFY_", "SMOOTH_"))}
    env.update({"DIFY_API_KEYS": f"{DIFY_KEY},{AGENT_KEY}", "DIFY_API_BASE": upstream, "VALID_API_KEYS": CLIENT_KEY,
                "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port), "LOG_LEVEL": "WARNING",
                "DIFY_MAX_CONNECTIONS": "5000"})
    proxy = Process(name, [sys.executable, "main.py"], env=env, cwd=folder)
    proxy.port = port
    return proxy


def descriptors(process):
    return len(os.listdir(f"/proc/{process.pid}/fd"))


def chat(model, query, stream=True):
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": query}]}).encode()
    return "POST", "/v1/chat/completions", {"Authorization": f"Bearer {CLIENT_KEY}",
                                            "Content-Type": "application/json"}, body


PROBE = """
import http.client, json, sys, threading, time
port, key = int(sys.argv[1]), sys.argv[2]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
latencies = []
print("ready", flush=True)
while not stop.is_set():
    started = time.monotonic()
    connection.request("GET", "/v1/models", headers={"Authorization": "Bearer " + key})
    connection.getresponse().read()
    latencies.append([time.monotonic() - started, started])
    time.sleep(0.002)
print(json.dumps(latencies), flush=True)
"""


class Probe:
    """GET /v1/models back to back from a process of its own (so that the benchmark's own work does not
    count); the slowest answer is the longest time the proxy's loop could not serve a request."""

    def __init__(self, port):
        self.port = port
        self.latencies = []
        self._process = None

    async def __aenter__(self):
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROBE, str(self.port), CLIENT_KEY, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        await self._process.stdout.readline()
        return self

    async def __aexit__(self, *exc):
        self._process.stdin.close()
        timed = json.loads(await self._process.stdout.readline())
        self.latencies = [latency for latency, _ in timed]
        self.timed = timed
        await self._process.wait()

    def figures(self):
        ordered = sorted(self.latencies)
        p99 = ordered[int(0.99 * (len(ordered) - 1))] if ordered else 0.0
        return {"worst_probe_ms": round(1000 * max(ordered, default=0.0), 1), "p99_probe_ms": round(1000 * p99, 1),
                "probes": len(ordered)}


async def one_answer(port, model, query, stream=True, timeout=120):
    connection = await Connection.open(port)
    received = [0]
    try:
        method, path, headers, body = chat(model, query, stream)
        status = await asyncio.wait_for(connection.request(
            method, path, headers, body, lambda arrived, data: received.__setitem__(0, received[0] + len(data))),
            timeout)
        return status, received[0]
    finally:
        connection.close()


async def figure_flood(proxy, events):
    cpu = proxy.cpu()
    async with Probe(proxy.port) as probe:
        await asyncio.sleep(0.1)
        started = time.monotonic()
        status, size = await one_answer(proxy.port, "Bench", f"pattern=flood tokens={events} size=4")
        took = time.monotonic() - started
    return {"status": status, "seconds": round(took, 2), "proxy_cpu_s": round(proxy.cpu() - cpu, 2),
            "bytes": size, **probe.figures()}


async def figure_answer(proxy, model, chars, size=20):
    cpu = proxy.cpu()
    async with Probe(proxy.port) as probe:
        await asyncio.sleep(0.1)  # the probe's connection is open before the answer starts
        status, _ = await one_answer(proxy.port, model, f"pattern=flood tokens={chars // size} size={size}")
    return {"status": status, "proxy_cpu_s": round(proxy.cpu() - cpu, 2), **probe.figures()}


class Stalled:
    """A client that sends one request and then reads nothing until it leaves."""

    def __init__(self):
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data):
        pass

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        pass

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


async def figure_stalled(proxy, readers, megabytes, stall):
    loop = asyncio.get_running_loop()
    base_rss, _ = proxy.memory()
    base_fds = descriptors(proxy)
    size = 4000
    clients = []
    for _ in range(readers):
        transport, _ = await loop.create_connection(Stalled, "127.0.0.1", proxy.port)
        method, path, headers, body = chat("Bench", f"pattern=flood tokens={megabytes * 1_000_000 // size} "
                                                    f"size={size}")
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        transport.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
                        + body)
        clients.append(transport)
    peak = base_rss
    deadline = time.monotonic() + stall
    while time.monotonic() < deadline:
        peak = max(peak, proxy.memory()[0])
        await asyncio.sleep(0.2)
    stalled_fds = descriptors(proxy)
    for transport in clients:
        transport.abort()
    await asyncio.sleep(3)
    after_rss, _ = proxy.memory()
    return {"rss_before_mb": round(base_rss, 1), "rss_growth_stalled_mb": round(peak - base_rss, 1),
            "rss_growth_after_mb": round(after_rss - base_rss, 1), "fds_before": base_fds,
            "fds_stalled": stalled_fds, "fds_after": descriptors(proxy)}


async def soak_one(port, rnd):
    """One request of a random kind; returns its kind."""
    kind = rnd.choice(["stream", "stream", "plain", "leave_at_once", "leave_mid_answer", "unknown_model",
                       "bad_body", "flood_leave"])
    if kind in ("stream", "plain"):
        await one_answer(port, "Bench", f"pattern=fast tokens={rnd.randint(5, 40)} seed={rnd.random()}",
                         stream=kind == "stream")
    elif kind == "unknown_model":
        await one_answer(port, "No Such Model", "x", stream=False)
    elif kind == "bad_body":
        connection = await Connection.open(port)
        try:
            await connection.request("POST", "/v1/chat/completions", {"Authorization": f"Bearer {CLIENT_KEY}",
                                                                      "Content-Type": "application/json"}, b"{nope")
        finally:
            connection.close()
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        query = {"leave_at_once": "pattern=steady tokens=200 rate=50",
                 "leave_mid_answer": "pattern=steady tokens=200 rate=200",
                 "flood_leave": "pattern=flood tokens=20000 size=50"}[kind]
        method, path, headers, body = chat("Bench", query)
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
                     + body)
        if kind != "leave_at_once":
            await reader.read(2000)
        writer.transport.abort()
    return kind


async def figure_soak(proxy, requests, parallel):
    rnd = random.Random(7)
    done = {}
    errors = 0

    async def worker(count):
        nonlocal errors
        for _ in range(count):
            try:
                kind = await asyncio.wait_for(soak_one(proxy.port, rnd), 60)
                done[kind] = done.get(kind, 0) + 1
            except (OSError, asyncio.TimeoutError, ConnectionError):
                errors += 1

    warm = requests // 10
    await asyncio.gather(*(worker(warm // parallel) for _ in range(parallel)))
    await asyncio.sleep(2)
    warm_rss, warm_fds = proxy.memory()[0], descriptors(proxy)
    started = time.monotonic()
    await asyncio.gather(*(worker((requests - warm) // parallel) for _ in range(parallel)))
    took = time.monotonic() - started
    await asyncio.sleep(3)
    end_rss, end_fds = proxy.memory()[0], descriptors(proxy)
    return {"requests": sum(done.values()), "kinds": done, "client_errors": errors, "seconds": round(took, 1),
            "rss_after_warmup_mb": round(warm_rss, 1), "rss_end_mb": round(end_rss, 1),
            "fds_after_warmup": warm_fds, "fds_end": end_fds, "proxy_alive": proxy.popen.poll() is None}


async def bench(folders, quick):
    fake, fake_port = start_fake(3600)
    proxies = {name: start_proxy(f"lifetime-{name}", folder, f"http://127.0.0.1:{fake_port}/v1")
               for name, folder in folders.items()}
    results = {name: {} for name in proxies}
    try:
        for proxy in proxies.values():
            await wait_ready(proxy)
        flood = 20_000 if quick else 50_000
        answer = 200_000 if quick else 800_000
        stalled = (5, 8, 3) if quick else (20, 8, 6)
        soak = (600, 6) if quick else (3000, 10)
        for name, proxy in proxies.items():
            results[name]["flood"] = await figure_flood(proxy, flood)
        for name, proxy in proxies.items():
            results[name]["answer_chat"] = await figure_answer(proxy, "Bench", answer)
            results[name]["answer_agent"] = await figure_answer(proxy, "Bench Agent", answer)
        for name, proxy in proxies.items():
            results[name]["stalled"] = await figure_stalled(proxy, *stalled)
            results[name]["stalled_again"] = await figure_stalled(proxy, *stalled)
        for name, proxy in proxies.items():
            results[name]["soak"] = await figure_soak(proxy, *soak)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        fake.stop()
    return {"quick": quick, "flood_events": flood, "answer_chars": answer, "stalled": stalled, "soak": soak,
            "results": results}


def print_table(report):
    for name, figures in report["results"].items():
        print(f"== {name}")
        for figure, values in figures.items():
            print(f"  {figure}: {json.dumps(values)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--proxy-dir", type=Path, action="append", default=[],
                        help="another checkout to measure side by side (repeatable)")
    args = parser.parse_args()
    folders = {"this": ROOT}
    for folder in args.proxy_dir:
        folders[folder.name] = folder
    report = asyncio.run(bench(folders, args.quick))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"lifetime-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
