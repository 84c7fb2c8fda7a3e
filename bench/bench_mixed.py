"""Mixed traffic with the online stages inline when idle or always handed to a worker (issue 4).

``service.online_inline_max_ms`` runs a lone call's online stages on the event loop, which
blocks the loop for the call's few milliseconds; a precomputed hit arriving meanwhile waits
for it. This benchmark measures that trade-off on the same 1M-entry index, Redis, ranker and
workload as ``bench/bench_online.py`` (whose helpers build and publish them): one closed-loop
client sends online requests (never repeated) while another sends precomputed hits with a
``--gap-ms`` pause after each, for ``--seconds``; before that, the precomputed client alone
for as long. Each setting (``--inline-ms``, default 0 = always hand over, and 5 = the
default) runs in a fresh service process, settings alternating over ``--rounds``. Printed per
setting and round: client p50 / p99 (ms) and calls of each stream, alone and mixed.

Bounded: rounds x settings x 2 x ``--seconds`` of load (~2 minutes with the defaults, after
``bench_online.py --build-only``); every service process is started and stopped by handle.

Run from the repository root::

    .venv/bin/python bench/bench_mixed.py --dpr var/bench/dpr-static/<id>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_online as bo  # noqa: E402
from bench._artifacts import zero_shot_artifact  # noqa: E402
from bench._machine import describe  # noqa: E402
from rewrite.config import load_settings  # noqa: E402
from rewrite.redis_server import EmbeddedRedis  # noqa: E402

Stats = tuple[float, float, int]  # p50 ms, p99 ms, calls


def summary(latencies_s: list[float]) -> Stats:
    """(p50 ms, p99 ms, calls) of per-call latencies in seconds."""
    q = statistics.quantiles(latencies_s, n=100)
    return 1e3 * statistics.median(latencies_s), 1e3 * q[98], len(latencies_s)


async def online_stream(client: bo.Client, stop: float, out: list[float]) -> None:
    """Online requests one after another until ``stop`` (``time.monotonic()``)."""
    while time.monotonic() < stop:
        req = client.take_online(1)[0]
        t0 = time.perf_counter()
        await client.rewrite(req)
        out.append(time.perf_counter() - t0)


async def precomputed_stream(
    client: bo.Client, work: bo.Workload, stop: float, gap_s: float, out: list[float]
) -> None:
    """Precomputed hits with a ``gap_s`` pause after each, until ``stop``."""
    i = 0
    while time.monotonic() < stop:
        req = work.precomputed[i % len(work.precomputed)]
        i += 1
        t0 = time.perf_counter()
        await client.rewrite(req)
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(gap_s)


async def streams(port: int, work: bo.Workload, seconds: float, gap_s: float) -> dict[str, Stats]:
    """Precomputed stream alone, then precomputed + online streams together, on one channel;
    keys ``"precomputed alone"``, ``"precomputed mixed"``, ``"online mixed"``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = bo.Client(channel, work, 0)
        await client.wait_online(60.0)
        alone: list[float] = []
        await precomputed_stream(client, work, time.monotonic() + seconds, gap_s, alone)
        pre: list[float] = []
        onl: list[float] = []
        stop = time.monotonic() + seconds
        await asyncio.gather(
            precomputed_stream(client, work, stop, gap_s, pre), online_stream(client, stop, onl)
        )
        return {
            "precomputed alone": summary(alone),
            "precomputed mixed": summary(pre),
            "online mixed": summary(onl),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="catalog entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpr", type=Path, help="DPR artifact dir (as bench_online.py --dpr)")
    ap.add_argument("--inline-ms", type=float, nargs="+", default=[0.0, 5.0])
    ap.add_argument("--seconds", type=float, default=12.0, help="load per phase")
    ap.add_argument("--gap-ms", type=float, default=2.0, help="pause after each precomputed call")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = ap.parse_args()

    settings = load_settings()
    artifact = zero_shot_artifact(Path(settings.dpr.artifacts_dir))
    env: dict[str, str] = {}
    if args.dpr is not None:
        artifact = args.dpr.resolve()
        env["QRW_DPR__ARTIFACTS_DIR"] = str(artifact.parent)
    build = bo.build_index(args.n, args.seed, artifact.name, settings, 2)
    ranker = str(bo.synthetic_ranker(500, args.seed))
    n_online = int(args.rounds * len(args.inline_ms) * args.seconds * 1000) + 1000
    results: list[tuple[int, float, dict[str, Stats]]] = []
    with tempfile.TemporaryDirectory(prefix="qrw-bench-mixed-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis")
        redis_server.start()
        try:
            work = bo.publish_workload(
                redis_server.url, build, artifact, settings, n_online, args.users, args.seed
            )
            for rnd in range(args.rounds):
                for inline_ms in args.inline_ms:
                    proc, port = bo.start_server(
                        redis_server.url,
                        ranker,
                        300.0,
                        {**env, "QRW_SERVICE__ONLINE_INLINE_MAX_MS": str(inline_ms)},
                    )
                    try:
                        res = asyncio.run(streams(port, work, args.seconds, args.gap_ms / 1e3))
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(30)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait(10)
                    results.append((rnd + 1, inline_ms, res))
        finally:
            redis_server.stop()

    print(
        f"\nqrw mixed traffic: {args.n:,} entries; an online stream and a precomputed stream "
        f"(gap {args.gap_ms:g} ms) for {args.seconds:g} s per phase; {describe()}"
    )
    print(f"{'inline ms':>9}{'round':>6}  {'stream':<20}{'p50 ms':>9}{'p99 ms':>9}{'calls':>8}")
    for rnd, inline_ms, res in results:
        for key, (p50, p99, calls) in res.items():
            print(f"{inline_ms:>9g}{rnd:>6}  {key:<20}{p50:>9.3f}{p99:>9.3f}{calls:>8}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"round": r, "inline_max_ms": m, **res} for r, m, res in results]
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
