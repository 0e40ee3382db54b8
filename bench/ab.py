"""Two proxy trees side by side in ONE run, interleaved: a before/after comparison that load on the
machine cannot tilt (the run.py figures, run one tree after the other, can).

    python bench/ab.py BEFORE_DIR AFTER_DIR [--ttft 300] [--blocks 5] [--cpu-rounds 6] [--memory]

e.g. `git worktree add --detach /tmp/before <commit>` then `python bench/ab.py /tmp/before .`.
It uses this bench's load fake, load generator and figure functions (run.py), so both trees are
driven by the same /v1/chat/completions requests. Per tree: one proxy smoothing off,
one smoothing on (python main.py, as the bench starts them). TTFT: every round asks direct,
A_off, A_on, B_off, B_on in turn. CPU per chunk: figure_cpu's streams, alternating A and B
for --cpu-rounds rounds; non-streaming CPU per request likewise. Prints medians and spread.
"""
import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import run
from loadgen import Connection, run_one


def start(tree, name, upstream, smoothing):
    """A proxy from `tree` (its own `python main.py`), named for the report."""
    run.PROXY_DIR = Path(tree).resolve()
    return run.start_proxy(name, upstream, smoothing)


def load():
    """The machine's 1-minute load average, printed beside the figures it may have disturbed."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


async def main(args):
    """Per tree one proxy smoothing off and one on, all against one fake; then each figure's rounds
    alternate between them."""
    folder = Path(tempfile.mkdtemp(prefix="ttft-ab-"))
    cert, key = run.make_certificate(folder)
    fake, http_port, https_port = run.start_fake(cert, key, 3600)
    upstream = f"http://127.0.0.1:{http_port}/v1"
    trees = {"A": args.a, "B": args.b}
    proxies = {}
    for label, tree in trees.items():
        proxies[label + "_off"] = start(tree, label + "_off", upstream, False)
        proxies[label + "_on"] = start(tree, label + "_on", upstream, True)
    try:
        for p in proxies.values():
            await run.wait_ready(p)
        print("load before:", load(), flush=True)
        targets = {"direct": (http_port, "dify")}
        targets.update({n: (p.port, "openai") for n, p in proxies.items()})
        # warm-up
        await run.figure_ttft(targets, 20)
        ttft = {n: [] for n in targets}
        for block in range(args.blocks):
            r = await run.figure_ttft(targets, args.ttft // args.blocks)
            for n in targets:
                ttft[n].append(r[n]["p50_ms"])
        print("TTFT p50 per block (ms):", flush=True)
        for n in targets:
            print(f"  {n:8s} {ttft[n]}")
        print("added TTFT p50 (median over blocks of block p50 - direct p50), spread min..max:")
        for n in proxies:
            added = [a - d for a, d in zip(ttft[n], ttft["direct"])]
            print(f"  {n:8s} {statistics.median(added):.2f} ms  ({min(added):.2f}..{max(added):.2f})")
        print("load:", load(), flush=True)
        cpu = {n: [] for n in proxies}
        query = f"bench pattern=steady rate=100 size=3 size_max=6 tokens={args.tokens}"
        order = list(proxies)
        for rnd in range(args.cpu_rounds):
            for n in (order if rnd % 2 == 0 else order[::-1]):
                p = proxies[n]
                before = (await run.fake_stats(http_port))["events"]
                c0 = p.cpu()
                res = await run.streams_at_once(p.port, "openai", [query] * args.streams, stagger=0.5)
                chunks = (await run.fake_stats(http_port))["events"] - before
                errors = sum(1 for r in res if isinstance(r, Exception) or r[0] != 200)
                cpu[n].append(round((p.cpu() - c0) / chunks * 1e6, 1))
                if errors:
                    print("  errors", n, errors)
        print("CPU per relayed chunk (us), per round; median:")
        for n in proxies:
            print(f"  {n:8s} {cpu[n]}  median {statistics.median(cpu[n]):.1f}  min {min(cpu[n]):.1f}")
        print("load:", load(), flush=True)
        ns = {n: [] for n in proxies if n.endswith("_on")}
        q = "bench pattern=steady rate=2000 size=3 size_max=6 tokens=10"
        for rnd in range(args.cpu_rounds):
            for n in ns:
                p = proxies[n]
                conns = [await Connection.open(p.port) for _ in range(10)]
                c0 = p.cpu()
                done = 0
                for _ in range(args.requests // 10):
                    res = await asyncio.gather(*(run_one(c, "openai", q, stream=False) for c in conns))
                    done += len(res)
                for c in conns:
                    c.close()
                ns[n].append(round((p.cpu() - c0) / done * 1000, 3))
        print("non-streaming CPU per request (ms):")
        for n in ns:
            print(f"  {n:8s} {ns[n]}  median {statistics.median(ns[n]):.3f}  min {min(ns[n]):.3f}")
        if args.memory:
            for n in ("A_on", "B_on"):
                m = await run.figure_memory(proxies[n], http_port, 1000, 2)
                print(f"1000 streams {n}: {m}")
        print("load after:", load(), flush=True)
    finally:
        for p in list(proxies.values()) + [fake]:
            p.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="the tree before (A)")
    ap.add_argument("b", help="the tree after (B)")
    ap.add_argument("--ttft", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--cpu-rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop  # the load generator is not what is measured: keep it light
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args))
