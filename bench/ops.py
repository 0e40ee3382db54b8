"""Operations figures, side by side in one run (see bench/README.md):

1. streams at 30 tokens/s before the added lag passes 50 ms, WORKERS=1 and WORKERS=2;
2. 1,000 simultaneous streams from a proxy started under `ulimit -n 1024` (this tree, and
   --proxy-dir for another checkout, e.g. one without the limit raised);
3. proxy CPU per relayed chunk with metrics off and on (METRICS_KEY set).

    python bench/ops.py [--quick] [--proxy-dir /work/wt/base]

Writes bench/results/ops-<time>.json and prints it.
"""

import argparse
import asyncio
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as bench  # noqa: E402
from loadgen import CLIENT_KEY, DIFY_KEY  # noqa: E402


def start_proxy(name, upstream, directory, env=None, limit=None):
    """`python main.py` from `directory`, smoothing off, optionally under a soft open-file limit."""
    port = bench.free_port()
    variables = {key: value for key, value in os.environ.items() if not key.startswith(("DIFY_", "SMOOTH_"))}
    variables.update({"DIFY_API_KEYS": DIFY_KEY, "DIFY_API_BASE": upstream, "VALID_API_KEYS": CLIENT_KEY,
                      "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port), "LOG_LEVEL": "WARNING",
                      "SMOOTH_STREAMING": "off", "DIFY_MAX_CONNECTIONS": "5000", **(env or {})})
    command = [sys.executable, "main.py"]
    if limit is not None:
        command = ["bash", "-c", f"ulimit -S -n {limit}; exec {sys.executable} main.py"]
    proxy = bench.Process(name, command, env=variables, cwd=directory)
    proxy.port = port
    return proxy


def tree_cpu(proxy):
    """CPU seconds of the proxy and its worker processes."""
    total = proxy.cpu()
    try:
        with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as listed:
            children = listed.read().split()
    except OSError:
        children = []
    for child in children:
        worker = bench.Process.__new__(bench.Process)
        worker.pid = int(child)
        try:
            total += worker.cpu()
        except OSError:
            pass
    return total


async def limit_figure(proxies, streams, seconds):
    out = {}
    query = f"bench pattern=steady rate=2 tokens={int(2 * seconds)}"
    for name, proxy in proxies.items():
        results = await bench.streams_at_once(proxy.port, "openai", [query] * streams, stagger=1.0)
        errors = sum(1 for r in results if isinstance(r, Exception) or r[0] != 200 or r[1].first is None)
        out[name] = {"streams": streams, "errors": errors}
        print(f"  {name}: {streams} streams, {errors} errors", flush=True)
    return out


async def cpu_figure(fake, fake_port, proxies, streams, tokens, rounds):
    """CPU per relayed chunk, the targets interleaved over several rounds (a shared machine drifts)."""
    query = f"bench pattern=steady rate=100 size=3 size_max=6 tokens={tokens}"
    used = {name: 0.0 for name in proxies}
    chunks = {name: 0 for name in proxies}
    for _ in range(rounds):
        for name, proxy in proxies.items():
            before = (await bench.fake_stats(fake_port))["events"]
            cpu = tree_cpu(proxy)
            await bench.streams_at_once(proxy.port, "openai", [query] * streams, stagger=0.5)
            used[name] += tree_cpu(proxy) - cpu
            chunks[name] += (await bench.fake_stats(fake_port))["events"] - before
    return {name: {"chunks": chunks[name], "proxy_us_per_chunk": round(used[name] / chunks[name] * 1e6, 1)}
            for name in proxies}


async def main(quick, other):
    folder = Path(tempfile.mkdtemp(prefix="opendify-bench-ops-"))
    cert, key = bench.make_certificate(folder)
    fake, http_port, _ = bench.start_fake(cert, key, 300 if quick else 1800)
    upstream = f"http://127.0.0.1:{http_port}/v1"
    here = bench.ROOT
    children = [fake]
    results = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
               "quick": quick, "other": str(other) if other else None}
    try:
        workers = {"workers_1": start_proxy("workers_1", upstream, here, {"WORKERS": "1"}),
                   "workers_2": start_proxy("workers_2", upstream, here, {"WORKERS": "2"})}
        limited = {"this_tree_ulimit_1024": start_proxy("limited", upstream, here, limit=1024)}
        if other:
            limited["other_tree_ulimit_1024"] = start_proxy("limited_other", upstream, other, limit=1024)
        metered = {"metrics_off": start_proxy("metrics_off", upstream, here),
                   "metrics_on": start_proxy("metrics_on", upstream, here, {"METRICS_KEY": "bench-metrics"})}
        children += list(workers.values()) + list(limited.values()) + list(metered.values())
        for proxy in children[1:]:
            await bench.wait_ready(proxy)
        print("1. streams at 30 tokens/s, WORKERS=1 vs 2 ...", flush=True)
        levels = [200, 400, 600] if quick else [200, 400, 600, 800, 1000, 1200]
        results["workers"] = await bench.figure_concurrency(http_port, workers, levels, 2 if quick else 4)
        print("2. 1,000 streams under ulimit -n 1024 ...", flush=True)
        results["open_file_limit"] = await limit_figure(limited, 1000, 2 if quick else 4)
        print("3. CPU per relayed chunk, metrics off / on ...", flush=True)
        results["metrics_cpu"] = await cpu_figure(fake, http_port, metered, 20, 200 if quick else 400,
                                                  2 if quick else 4)
    finally:
        for child in children:
            child.stop()
    bench.RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = bench.RESULTS / f"ops-{stamp}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "workers"}, indent=2))
    print(json.dumps({k: v for k, v in results["workers"].items() if k != "levels"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="OpenDify operations benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--proxy-dir", type=Path, default=None, help="another checkout, run under the same limit")
    arguments = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(arguments.quick, arguments.proxy_dir.resolve() if arguments.proxy_dir else None))
