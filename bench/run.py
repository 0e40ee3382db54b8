"""OpenDify's benchmark: what the proxy costs, measured side by side with the fake Dify straight.

One command starts the load fake (bench/load_dify.py, plain HTTP and HTTPS with a
self-signed certificate made for the run), the proxy exactly as users run it
(`python main.py`, configured by environment: smoothing on, smoothing off, and one in
front of the HTTPS listener), and drives them from an in-process load generator over
loopback. Each figure is measured through the proxy and straight to the fake in the same
run; CPU is read from each process's own counters, so it holds on a busy machine.

    python bench/run.py            # full run (a few minutes)
    python bench/run.py --quick    # well under a minute

Writes bench/results/<time>.json and .png (and latest.json / latest.png), prints a table.
"""

import argparse
import asyncio
import datetime
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import CLIENT_KEY, DIFY_KEY, Connection, run_one  # noqa: E402

RESULTS = BENCH / "results"
TARGETS = {
    "ttft_added_p50_ms": 2.0,
    "cpu_us_per_chunk": 40.0,
    "cpu_ms_per_request": 1.0,
    "rss_mb_1000_streams": 150.0,
    "bursty_cv": 0.5,
    "fast_duration_ratio": 1.05,
    "added_lag_ms": 50.0,
}


# --- processes -------------------------------------------------------------------------------

def make_certificate(folder):
    """A self-signed certificate for 127.0.0.1, made now (cryptography, else the openssl CLI)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import ipaddress
        private = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(private.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(minutes=5))
                       .not_valid_after(now + datetime.timedelta(days=1))
                       .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                                   x509.DNSName("localhost")]), critical=False)
                       .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                       .sign(private, hashes.SHA256()))
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                        "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    return cert, key


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A child process of the benchmark, with its CPU and memory read from /proc."""

    def __init__(self, name, args, env=None, cwd=ROOT, log_folder=None):
        self.name = name
        # Output goes to a file: a pipe nobody reads would block a chatty child once it is full.
        self.log = (Path(log_folder or tempfile.gettempdir()) / f"opendify-bench-{name}.log").open("w+")
        self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE if name == "fake" else self.log,
                                      stderr=self.log, text=True)
        self.pid = self.popen.pid

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-2000:]

    def cpu(self):
        """Seconds of CPU used so far by all the process's threads (scheduler counters, in ns)."""
        total = 0
        try:
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as counters:
                    total += int(counters.read().split()[0])
            return total / 1e9
        except OSError:
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory(self):
        """(current RSS, peak RSS) in MB."""
        values = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line.split(":")[0]] = int(line.split()[1]) / 1024
        return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_fake(cert, key, limit):
    fake = Process("fake", [sys.executable, str(BENCH / "load_dify.py"), "--cert", str(cert), "--key", str(key),
                            "--max-seconds", str(limit)])
    ports = json.loads(fake.popen.stdout.readline())
    return fake, ports["http"], ports["https"]


PROXY_DIR = ROOT  # where main.py is run from (--proxy-dir: another checkout, for a before/after comparison)


def start_proxy(name, upstream, smoothing, cert=None):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIFY_", "SMOOTH_"))}
    env.update({
        "DIFY_API_KEYS": DIFY_KEY, "DIFY_API_BASE": upstream, "VALID_API_KEYS": CLIENT_KEY,
        "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port), "LOG_LEVEL": "WARNING",
        "SMOOTH_STREAMING": "on" if smoothing else "off", "DIFY_MAX_CONNECTIONS": "5000",
    })
    if cert is not None:
        env["SSL_CERT_FILE"] = str(cert)
    proxy = Process(name, [sys.executable, "main.py"], env=env, cwd=PROXY_DIR)
    proxy.port = port
    return proxy


async def wait_ready(proxy, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proxy.popen.poll() is not None:
            raise RuntimeError(f"{proxy.name} exited: {proxy.output()}")
        try:
            connection = await Connection.open(proxy.port)
            status = await asyncio.wait_for(connection.request(
                "GET", "/v1/models", {"Authorization": f"Bearer {CLIENT_KEY}"}), 2)
            connection.close()
            if status == 200:
                return
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proxy.name} did not become ready")


async def fake_stats(port):
    connection = await Connection.open(port)
    body = []
    await connection.request("GET", "/bench/stats", {}, b"", lambda arrived, data: body.append(data))
    connection.close()
    return json.loads(b"".join(body))


async def fake_emits(port, tag):
    connection = await Connection.open(port)
    body = []
    await connection.request("GET", f"/bench/emits/{tag}", {}, b"", lambda arrived, data: body.append(data))
    connection.close()
    return json.loads(b"".join(body))


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def ms(seconds):
    return round(seconds * 1000, 2)


# --- the figures -----------------------------------------------------------------------------

async def figure_ttft(targets, rounds):
    """1. Time to first token, one stream at a time, interleaved across targets."""
    connections = {name: await Connection.open(port) for name, (port, _) in targets.items()}
    samples = {name: [] for name in targets}
    for index in range(rounds):
        for name, (_, kind) in targets.items():
            query = f"bench pattern=steady rate=1000 tokens=3 seed={index}"
            status, answer, sent = await run_one(connections[name], kind, query)
            if status == 200 and answer.first is not None:
                samples[name].append(answer.first - sent)
    for connection in connections.values():
        connection.close()
    direct = samples["direct"]
    out = {"rounds": rounds, "direct": {"p50_ms": ms(percentile(direct, .5)), "p99_ms": ms(percentile(direct, .99))}}
    for name in targets:
        if name == "direct":
            continue
        values = samples[name]
        out[name] = {"p50_ms": ms(percentile(values, .5)), "p99_ms": ms(percentile(values, .99)),
                     "added_p50_ms": ms(percentile(values, .5) - percentile(direct, .5)),
                     "added_p99_ms": ms(percentile(values, .99) - percentile(direct, .99))}
    return out


async def streams_at_once(port, kind, queries, stagger=0.0, stamps_only=False, ssl_context=None):
    """Runs one answer per query, each on its own connection, starts spread over `stagger` seconds."""
    async def one(index, query):
        await asyncio.sleep(stagger * index / max(1, len(queries)))
        connection = await Connection.open(port, ssl_context)
        try:
            return await run_one(connection, kind, query, stamps_only)
        finally:
            connection.close()
    return await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)), return_exceptions=True)


async def figure_cpu(fake, fake_port, proxies, streams, tokens, requests):
    """2. Proxy CPU per relayed chunk (chat completions and the Responses API) and per non-streaming request,
    from its own counters."""
    out = {}
    query = f"bench pattern=steady rate=100 size=3 size_max=6 tokens={tokens}"
    runs = ([("direct", None, "dify")] + [(name, proxy, "openai") for name, proxy in proxies.items()]
            + [(name + "_responses", proxy, "responses") for name, proxy in proxies.items()])
    for name, proxy, kind in runs:
        before_events = (await fake_stats(fake_port))["events"]
        fake_cpu, proxy_cpu = fake.cpu(), proxy.cpu() if proxy else 0.0
        port = fake_port if proxy is None else proxy.port
        results = await streams_at_once(port, kind, [query] * streams, stagger=0.5)
        chunks = (await fake_stats(fake_port))["events"] - before_events
        errors = sum(1 for r in results if isinstance(r, Exception) or r[0] != 200)
        entry = {"chunks": chunks, "errors": errors,
                 "fake_us_per_chunk": round((fake.cpu() - fake_cpu) / chunks * 1e6, 1)}
        if proxy is not None:
            used = proxy.cpu() - proxy_cpu
            entry["proxy_us_per_chunk"] = round(used / chunks * 1e6, 1)
            entry["chunks_per_cpu_second"] = round(chunks / used)
        out[name] = entry
    proxy = proxies["smoothing_on"]
    proxy_cpu, fake_cpu = proxy.cpu(), fake.cpu()
    connections = [await Connection.open(proxy.port) for _ in range(10)]
    done = errors = 0
    query = "bench pattern=steady rate=2000 size=3 size_max=6 tokens=10"
    for batch in range(requests // len(connections)):
        results = await asyncio.gather(*(run_one(c, "openai", query, stream=False) for c in connections),
                                       return_exceptions=True)
        done += len(results)
        errors += sum(1 for r in results if isinstance(r, Exception) or r[0] != 200)
    for connection in connections:
        connection.close()
    out["non_streaming"] = {"requests": done, "errors": errors, "upstream_chunks_each": 10,
                            "proxy_ms_per_request": round((proxy.cpu() - proxy_cpu) / done * 1000, 3),
                            "fake_ms_per_request": round((fake.cpu() - fake_cpu) / done * 1000, 3)}
    return out


async def figure_concurrency(fake_port, proxies, levels, seconds):
    """3. Streams at 30 tokens/s each: per-token lag straight and through the proxy, per level."""
    out = {"levels": []}
    tokens = int(30 * seconds)
    for level in levels:
        row = {"streams": level}
        for name, port, kind in [("direct", fake_port, "dify")] + [(n, p.port, "openai") for n, p in proxies.items()]:
            query = f"bench pattern=stamp rate=30 tokens={tokens}"
            proxy = proxies.get(name)
            cpu, wall = proxy.cpu() if proxy else 0.0, time.monotonic()
            results = await streams_at_once(port, kind, [query] * level, stagger=1.0, stamps_only=True)
            lags = [lag for r in results if not isinstance(r, Exception) for lag in r[1].lags]
            errors = sum(1 for r in results if isinstance(r, Exception) or r[0] != 200
                         or len(r[1].lags) != tokens)
            row[name] = {"errors": errors, "lag_p50_ms": ms(percentile(lags, .5)),
                         "lag_p99_ms": ms(percentile(lags, .99))}
            if proxy is not None:
                # The proxy's share of one core while the streams ran: near 1.0 means the proxy itself is
                # the limit; well below, the rest of the machine (load fake, load generator) is.
                row[name]["proxy_core_share"] = round((proxy.cpu() - cpu) / (time.monotonic() - wall), 2)
        for name in proxies:
            row[name]["added_p50_ms"] = ms((row[name]["lag_p50_ms"] - row["direct"]["lag_p50_ms"]) / 1000)
            row[name]["added_p99_ms"] = ms((row[name]["lag_p99_ms"] - row["direct"]["lag_p99_ms"]) / 1000)
        out["levels"].append(row)
        print(f"  concurrency {level}: " + ", ".join(
            f"{n} p50 {row[n]['lag_p50_ms']} ms p99 {row[n]['lag_p99_ms']} ms err {row[n]['errors']}"
            + (f" core {row[n]['proxy_core_share']}" if n in proxies else "")
            for n in ["direct"] + list(proxies)), flush=True)
    for name in proxies:
        for measure in ("p50", "p99"):
            held = [row["streams"] for row in out["levels"]
                    if row[name]["errors"] == 0 and row[name][f"added_{measure}_ms"] <= TARGETS["added_lag_ms"]]
            out[f"{name}_streams_added_{measure}_within_50ms"] = max(held) if held else 0
    return out


async def figure_memory(proxy, fake_port, streams, seconds):
    """3b. RSS of the proxy while `streams` answers are open at once."""
    rss_before, _ = proxy.memory()
    query = f"bench pattern=steady rate=2 tokens={int(2 * seconds)}"
    peak_open = 0
    sampled = []

    async def watch():
        nonlocal peak_open
        for _ in range(int(seconds * 10) + 50):
            stats = await fake_stats(fake_port)
            peak_open = max(peak_open, stats["streams"])
            sampled.append(proxy.memory()[0])
            await asyncio.sleep(0.1)
    watcher = asyncio.ensure_future(watch())
    results = await streams_at_once(proxy.port, "openai", [query] * streams, stagger=1.0)
    watcher.cancel()
    errors = sum(1 for r in results if isinstance(r, Exception) or r[0] != 200 or r[1].first is None)
    rss, peak = proxy.memory()
    return {"streams": streams, "errors": errors, "most_open_at_once": peak_open,
            "rss_idle_mb": round(rss_before, 1), "rss_max_sampled_mb": round(max(sampled or [rss]), 1),
            "peak_rss_mb": round(peak, 1)}


def quality(sent, answer, emits, window=0.02):
    """CV of characters per window, per-character lag against the fake's emit times, duration ratio."""
    times = answer.char_times()
    upstream = []
    for emitted, count in emits:
        upstream += [emitted] * count
    start = times[0]
    counts = [0] * (int((times[-1] - start) / window) + 1)
    for moment in times:
        counts[int((moment - start) / window)] += 1
    lags = [received - emitted for received, emitted in zip(times, upstream)]
    return {"chars": len(times), "lost": len(upstream) - len(times),
            "window_cv": round(statistics.pstdev(counts) / statistics.mean(counts), 3),
            "lag_p50_ms": ms(percentile(lags, .5)), "lag_p99_ms": ms(percentile(lags, .99)),
            "lag_max_ms": ms(max(lags)),
            "duration_ratio": round((times[-1] - sent) / (upstream[-1] - sent), 4)}


async def figure_smoothing(fake_port, proxies, patterns):
    """4. Smoothing quality on steady, bursty and fast upstreams."""
    out = {}
    series = {}
    targets = [("direct", fake_port, "dify")] + [(n, p.port, "openai") for n, p in proxies.items()]

    async def one(pattern, extra, name, port, kind):
        tag = f"{pattern}-{name}-{time.monotonic_ns()}"
        connection = await Connection.open(port)
        status, answer, sent = await run_one(connection, kind, f"bench pattern={pattern} seed=7 {extra} tag={tag}")
        connection.close()
        emits = await fake_emits(fake_port, tag)
        out[pattern][name] = quality(sent, answer, emits)
        if pattern == "bursty":
            series[name] = {"sent": sent, "client": answer.char_times(), "upstream": emits}
    for pattern, extra in patterns.items():
        out[pattern] = {}
        # The same answer to each target at once: the load is light, and the run three times shorter.
        await asyncio.gather(*(one(pattern, extra, *target) for target in targets))
        out[pattern] = {name: out[pattern][name] for name, _, _ in targets}
    return out, series


async def figure_reuse(stats_port, https_port, proxy, cert, requests):
    """5. New connections (each a TLS handshake) per 100 requests to an HTTPS upstream."""
    out = {"requests": requests}
    before = await fake_stats(stats_port)
    connection = await Connection.open(proxy.port)
    for index in range(requests):
        await run_one(connection, "openai", f"bench pattern=steady rate=1000 tokens=3 seed={index}",
                      stream=index % 2 == 0)
    connection.close()
    after = await fake_stats(stats_port)
    out["proxy"] = {"tls_connections": after["tls_connections"] - before["tls_connections"]}
    context = ssl.create_default_context(cafile=str(cert))
    before = after
    connection = await Connection.open(https_port, context)
    for index in range(requests):
        await run_one(connection, "dify", f"bench pattern=steady rate=1000 tokens=3 seed={index}")
    connection.close()
    after = await fake_stats(stats_port)
    out["direct_keepalive"] = {"tls_connections": after["tls_connections"] - before["tls_connections"]}
    out["tornado_simple_client"] = await simple_client_reference(stats_port, https_port, cert, requests)
    return out


async def simple_client_reference(stats_port, https_port, cert, requests):
    """What the proxy did before: Tornado's simple AsyncHTTPClient, one request after another."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    client = AsyncHTTPClient(force_instance=True)
    before = await fake_stats(stats_port)
    for index in range(requests):
        await client.fetch(HTTPRequest(f"https://127.0.0.1:{https_port}/v1/info", ca_certs=str(cert),
                                       headers={"Authorization": f"Bearer {DIFY_KEY}"}), raise_error=False)
    client.close()
    after = await fake_stats(stats_port)
    return {"tls_connections": after["tls_connections"] - before["tls_connections"]}


# --- report ----------------------------------------------------------------------------------

def verdicts(results):
    ttft = results["ttft"]["smoothing_on"]["added_p50_ms"]
    cpu = results["cpu"]["smoothing_on"]["proxy_us_per_chunk"]
    request = results["cpu"]["non_streaming"]["proxy_ms_per_request"]
    memory = results["memory"]
    bursty = results["smoothing"]["bursty"]["smoothing_on"]
    fast = results["smoothing"]["fast"]["smoothing_on"]
    reuse = results["reuse"]["proxy"]
    return [
        ("added TTFT p50, smoothing on (ms)", ttft, f"<= {TARGETS['ttft_added_p50_ms']}",
         ttft <= TARGETS["ttft_added_p50_ms"]),
        ("proxy CPU per relayed chunk (us)", cpu, f"<= {TARGETS['cpu_us_per_chunk']}",
         cpu <= TARGETS["cpu_us_per_chunk"]),
        ("proxy CPU per non-streaming request (ms)", request, f"<= {TARGETS['cpu_ms_per_request']}",
         request <= TARGETS["cpu_ms_per_request"]),
        (f"{memory['streams']} open streams: errors / peak RSS (MB)", f"{memory['errors']} / {memory['peak_rss_mb']}",
         f"0 / <= {TARGETS['rss_mb_1000_streams']}",
         memory["errors"] == 0 and memory["peak_rss_mb"] <= TARGETS["rss_mb_1000_streams"]),
        ("bursty window CV (smoothed)", bursty["window_cv"], f"<= {TARGETS['bursty_cv']}",
         bursty["window_cv"] <= TARGETS["bursty_cv"]),
        ("bursty lag max (ms)", bursty["lag_max_ms"], f"<= {results['max_lag_ms']}",
         bursty["lag_max_ms"] <= results["max_lag_ms"]),
        ("fast upstream duration ratio", fast["duration_ratio"], f"<= {TARGETS['fast_duration_ratio']}",
         fast["duration_ratio"] <= TARGETS["fast_duration_ratio"]),
        (f"HTTPS: new TLS connections per {results['reuse']['requests']} requests", reuse["tls_connections"],
         "reused", reuse["tls_connections"] <= 2),
    ]


def print_table(results):
    lines = []
    ttft = results["ttft"]
    lines.append("1. time to first token (ms)       direct p50/p99   proxy p50/p99    added p50/p99")
    for name in ("smoothing_off", "smoothing_on"):
        row = ttft[name]
        lines.append(f"   {name:<30} {ttft['direct']['p50_ms']:>6}/{ttft['direct']['p99_ms']:<8} "
                     f"{row['p50_ms']:>6}/{row['p99_ms']:<8} {row['added_p50_ms']:>6}/{row['added_p99_ms']}")
    cpu = results["cpu"]
    lines.append("2. CPU per relayed chunk          proxy us   chunks per CPU-s   fake us (producer, for scale)")
    for name in ("smoothing_off", "smoothing_on", "smoothing_off_responses", "smoothing_on_responses"):
        if name not in cpu:
            continue
        row = cpu[name]
        lines.append(f"   {name:<30} {row['proxy_us_per_chunk']:>8} {row['chunks_per_cpu_second']:>14}"
                     f"   {row['fake_us_per_chunk']:>8}   (errors {row['errors']})")
    lines.append(f"   direct (no proxy)              {'-':>8} {'-':>14}   {cpu['direct']['fake_us_per_chunk']:>8}")
    request = cpu["non_streaming"]
    lines.append(f"   non-streaming request: proxy {request['proxy_ms_per_request']} ms CPU each "
                 f"(fake {request['fake_ms_per_request']} ms), errors {request['errors']}/{request['requests']}")
    lines.append("3. streams at 30 tokens/s         per-token lag p50/p99 (ms): direct | proxy off | proxy on")
    for row in results["concurrency"]["levels"]:
        cells = " | ".join(f"{row[n]['lag_p50_ms']}/{row[n]['lag_p99_ms']} e{row[n]['errors']}"
                           + (f" core {row[n]['proxy_core_share']}" if "proxy_core_share" in row[n] else "")
                           for n in ("direct", "smoothing_off", "smoothing_on") if n in row)
        lines.append(f"   {row['streams']:>5} streams                   {cells}")
    concurrency = results["concurrency"]
    for name in ("smoothing_off", "smoothing_on"):
        if f"{name}_streams_added_p50_within_50ms" in concurrency:
            lines.append(f"   most streams with added lag within 50 ms, {name}: "
                         f"{concurrency[name + '_streams_added_p50_within_50ms']} (p50), "
                         f"{concurrency[name + '_streams_added_p99_within_50ms']} (p99)")
    memory = results["memory"]
    lines.append(f"   {memory['streams']} open streams: {memory['most_open_at_once']} open at once, errors "
                 f"{memory['errors']}, RSS idle {memory['rss_idle_mb']} MB, peak {memory['peak_rss_mb']} MB")
    lines.append("4. smoothing (20 ms windows)      CV     lag p50/p99/max (ms)    duration ratio")
    for pattern, rows in results["smoothing"].items():
        for name, row in rows.items():
            lines.append(f"   {pattern:<7} {name:<22} {row['window_cv']:>6}  {row['lag_p50_ms']:>6}/{row['lag_p99_ms']}"
                         f"/{row['lag_max_ms']:<10} {row['duration_ratio']}   lost {row['lost']}")
    reuse = results["reuse"]
    lines.append(f"5. HTTPS upstream, new TLS connections (= handshakes) per {reuse['requests']} requests: proxy "
                 f"{reuse['proxy']['tls_connections']}, "
                 f"direct keep-alive {reuse['direct_keepalive']['tls_connections']}"
                 f", Tornado's simple client (the proxy before) {reuse['tornado_simple_client']['tls_connections']}")
    lines.append("targets:")
    for label, value, target, met in verdicts(results):
        lines.append(f"   {'met   ' if met else 'MISSED'} {label}: {value} (target {target})")
    print("\n".join(lines))


def draw(results, series, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sent = series["smoothing_on"]["sent"]
    upstream_times, upstream_total = [], []
    total = 0
    for emitted, count in series["smoothing_on"]["upstream"]:
        total += count
        upstream_times.append(emitted - sent)
        upstream_total.append(total)
    for name, color in (("smoothing_off", "tab:orange"), ("smoothing_on", "tab:blue")):
        times = [t - series[name]["sent"] for t in series[name]["client"]]
        left.plot(times, range(1, len(times) + 1), label=f"client via proxy, {name.replace('_', ' ')}", color=color)
    left.step(upstream_times, upstream_total, where="post", label="upstream (fake Dify emits)", color="black",
              linestyle=":")
    shown = 3.0
    left.set_xlim(0, shown)
    left.set_ylim(0, max([n for t, n in zip(upstream_times, upstream_total) if t <= shown] or [1]) * 1.3)
    left.set_xlabel("seconds since request")
    left.set_ylabel("characters received")
    left.set_title(f"Bursty answer, first {shown:g} s: cumulative characters")
    left.legend()
    labels = ["added TTFT p50\n(ms)", "CPU per chunk\n(us / 10)", "CPU per request\n(ms)"]
    off = [results["ttft"]["smoothing_off"]["added_p50_ms"], results["cpu"]["smoothing_off"]["proxy_us_per_chunk"] / 10,
           results["cpu"]["non_streaming"]["proxy_ms_per_request"]]
    on = [results["ttft"]["smoothing_on"]["added_p50_ms"], results["cpu"]["smoothing_on"]["proxy_us_per_chunk"] / 10,
          results["cpu"]["non_streaming"]["proxy_ms_per_request"]]
    targets = [TARGETS["ttft_added_p50_ms"], TARGETS["cpu_us_per_chunk"] / 10, TARGETS["cpu_ms_per_request"]]
    positions = range(len(labels))
    right.bar([p - 0.2 for p in positions], off, width=0.4, label="smoothing off", color="tab:orange")
    right.bar([p + 0.2 for p in positions], on, width=0.4, label="smoothing on", color="tab:blue")
    right.scatter(list(positions), targets, marker="_", s=2000, color="red", label="target", zorder=3)
    right.set_xticks(list(positions))
    right.set_xticklabels(labels)
    right.set_title("Proxy overhead")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- main ------------------------------------------------------------------------------------

async def bench(quick):
    folder = Path(tempfile.mkdtemp(prefix="opendify-bench-"))
    cert, key = make_certificate(folder)
    limit = 120 if quick else 1800
    fake, http_port, https_port = start_fake(cert, key, limit)
    upstream = f"http://127.0.0.1:{http_port}/v1"
    proxies = {"smoothing_off": start_proxy("smoothing_off", upstream, False),
               "smoothing_on": start_proxy("smoothing_on", upstream, True)}
    secure = start_proxy("https", f"https://127.0.0.1:{https_port}/v1", True, cert)
    children = [fake, secure] + list(proxies.values())
    try:
        for proxy in list(proxies.values()) + [secure]:
            await wait_ready(proxy)
        results = {"mode": "quick" if quick else "full", "proxy_dir": str(PROXY_DIR),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "python": sys.version.split()[0], "cpus": os.cpu_count(), "max_lag_ms": 400}
        started = time.monotonic()
        phase = time.monotonic()

        def done(label):
            nonlocal phase
            print(f"   {label}: {time.monotonic() - phase:.1f} s", flush=True)
            phase = time.monotonic()
        print("1. time to first token ...", flush=True)
        results["ttft"] = await figure_ttft({"direct": (http_port, "dify"),
                                             "smoothing_off": (proxies["smoothing_off"].port, "openai"),
                                             "smoothing_on": (proxies["smoothing_on"].port, "openai")},
                                            30 if quick else 300)
        done("ttft"); print("2. CPU per chunk and per request ...", flush=True)
        results["cpu"] = await figure_cpu(fake, http_port, proxies, 20 if quick else 50, 200 if quick else 800,
                                          100 if quick else 1000)
        done("cpu"); print("3. concurrency ...", flush=True)
        results["concurrency"] = await figure_concurrency(
            http_port, proxies if not quick else {"smoothing_off": proxies["smoothing_off"]},
            [200] if quick else [100, 200, 300, 400, 600, 800, 1000], 2 if quick else 5)
        results["memory"] = await figure_memory(proxies["smoothing_on"], http_port, 1000, 2 if quick else 6)
        done("concurrency and memory"); print("4. smoothing ...", flush=True)
        patterns = {"steady": "rate=30 size=3 size_max=6 tokens=" + ("60" if quick else "300"),
                    "bursty": "tokens=" + ("10" if quick else "40"),
                    "fast": "tokens=" + ("300" if quick else "2000")}
        results["smoothing"], series = await figure_smoothing(http_port, proxies, patterns)
        done("smoothing"); print("5. connection reuse ...", flush=True)
        results["reuse"] = await figure_reuse(http_port, https_port, secure, cert, 100)
        done("reuse")
        results["seconds"] = round(time.monotonic() - started, 1)
        results["verdicts"] = [{"figure": label, "value": value, "target": target, "met": met}
                               for label, value, target, met in verdicts(results)]
    finally:
        for child in children:
            child.stop()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    try:
        draw(results, series, RESULTS / f"{stamp}.png")
        draw(results, series, RESULTS / "latest.png")
        print(f"wrote {RESULTS / (stamp + '.json')} and .png")
    except ImportError:
        print(f"wrote {RESULTS / (stamp + '.json')} (no chart: pip install -r bench/requirements.txt)")
    return results


def main():
    parser = argparse.ArgumentParser(description="OpenDify benchmark: proxy vs. straight to a fake Dify")
    parser.add_argument("--quick", action="store_true", help="a short run, well under a minute")
    parser.add_argument("--proxy-dir", type=Path, default=ROOT,
                        help="run the proxy from this checkout instead (e.g. `git archive` of an older commit)")
    args = parser.parse_args()
    global PROXY_DIR
    PROXY_DIR = args.proxy_dir.resolve()
    try:
        import uvloop  # the load generator is not what is measured: keep it light
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(bench(args.quick))


if __name__ == "__main__":
    main()
