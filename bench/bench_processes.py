"""Throughput of the online path against the number of service processes (issue 4, issue 6
(b)): ``service.processes`` = 1 and 2 (``--processes``) on the same 1M-entry index, Redis,
ranker and workload as ``bench/bench_online.py`` (whose helpers build and publish them; see
its docstring for what is real and what is synthetic).

Why: one service process is capped by its GIL (held ~98 % of the time at concurrency 64) while
it uses ~1.25 of the 2 cores; :mod:`rewrite.processes` runs one process per core on one port
(``SO_REUSEPORT``).

Per process count, per round (``--rounds``; the process counts alternate within a round, so
a drift of the shared VM's speed falls on each alike): the supervisor
(:class:`rewrite.processes.ServiceProcesses`, spawned processes, each also serving the
benchmark's echo RPC) starts; this process opens ``--channels`` grpc.aio channels, **each its
own TCP connection** (``grpc.use_local_subchannel_pool``: channels to one target share a
connection otherwise), because the kernel spreads connections, not calls, over the processes;
then, at each ``--concurrency``, echo and online rows interleaved in ``--blocks`` blocks
(coroutine ``k`` calls on channel ``k mod channels``; at concurrency 1 one channel, so one
process, serves). Printed: client p50/p99 (ms) and QPS, online ÷ echo in the same seconds,
service CPU ms per call (all service processes, ``/proc``), this client's CPU ms per call;
memory of the service at the end: VmRSS and VmHWM per process, and the **proportional set
size** summed over processes (``/proc/<pid>/smaps_rollup`` Pss: a page shared by k processes
counts 1/k in each, so the sum is the service's real footprint; the mapped index file's pages
are shared through the page cache, the rest is per process), split into anonymous and
file-backed. Online requests are never repeated across the whole run (no cache hits).

Bounded: rounds x process counts x levels x 2 x (requests + warm-up) calls; ~3 minutes with
the defaults after ``bench_online.py`` built the index (``--build-only``).

Run from the repository root::

    .venv/bin/python bench/bench_processes.py --dpr var/bench/dpr-static/<id>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_online as bo  # noqa: E402
from bench._artifacts import zero_shot_artifact  # noqa: E402
from bench._machine import describe  # noqa: E402
from bench.bench_server_mode import ECHO_METHOD, echo_handler  # noqa: E402
from rewrite._pb.queryrewrite.v1 import rewrite_pb2  # noqa: E402
from rewrite.client import rewrite_stub  # noqa: E402
from rewrite.config import Settings, load_settings  # noqa: E402
from rewrite.processes import ServiceProcesses  # noqa: E402

WARMUP = 200
RPCS = ("echo", "online")


def extra_handlers() -> list[grpc.GenericRpcHandler]:
    """The echo RPC in every service process (module-level: spawn pickles it by name)."""
    return [echo_handler(asynchronous=True)]


def smaps_mb(pid: int) -> dict[str, float]:
    """``Rss``, ``Pss``, ``Pss_Anon``, ``Pss_File`` of a process (``smaps_rollup``), MB."""
    return bo.proc_fields_mb(
        Path(f"/proc/{pid}/smaps_rollup"), ("Rss", "Pss", "Pss_Anon", "Pss_File")
    )


@dataclass
class Row:
    """One measured block: latencies (s), wall s, service and client CPU s, answers."""

    processes: int
    rpc: str
    conc: int
    latencies: list[float]
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    bad: int = 0  # online answers that are degraded (online_unavailable, errors)


class Channels:
    """``n`` channels, each its own connection, with Rewrite and echo stubs."""

    def __init__(self, target: str, n: int) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(n)]
        self.rewrite = [rewrite_stub(ch) for ch in self.channels]
        self.echo = [ch.unary_unary(ECHO_METHOD) for ch in self.channels]

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


async def drive(
    calls: Sequence[Callable[[Any], Any]], payloads: Sequence[Any], concurrency: int
) -> tuple[list[float], float, list[Any]]:
    """``concurrency`` coroutines, coroutine ``k`` on ``calls[k % len(calls)]``, one call per
    payload (closed loop); returns (latencies s, wall s, responses)."""
    latencies: list[float] = []
    responses: list[Any] = []
    it = iter(payloads)

    async def worker(k: int) -> None:
        call = calls[k % len(calls)]
        for p in it:
            t0 = time.perf_counter()
            r = await call(p, timeout=5)
            latencies.append(time.perf_counter() - t0)
            responses.append(r)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return latencies, time.perf_counter() - t0, responses


class Load:
    """The workload's online requests, each sent once (a cursor)."""

    def __init__(self, work: bo.Workload) -> None:
        self.pool = work.online
        self.next = 0

    def take(self, n: int) -> list[rewrite_pb2.RewriteRequest]:
        out = [self.pool[(self.next + i) % len(self.pool)] for i in range(n)]
        self.next += n
        return out


async def wait_online(ch: Channels, load: Load, timeout_s: float) -> None:
    """Until every channel's process answers online requests from its online layer."""
    deadline = time.monotonic() + timeout_s
    for call in ch.rewrite:
        while True:
            r = await call(load.take(1)[0], timeout=5)
            if r.reason != "online_unavailable":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"online layer not loaded after {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


async def measure_config(
    target: str, pids: list[int], processes: int, load: Load, args: argparse.Namespace
) -> list[Row]:
    """Echo and online rows at every concurrency for one running service."""
    ch = Channels(target, args.channels)
    rows: list[Row] = []
    try:
        await wait_online(ch, load, args.load_timeout)
        for conc in args.concurrency:
            for rpc in RPCS:  # warm-up
                reqs = load.take(WARMUP)
                calls = ch.echo if rpc == "echo" else ch.rewrite
                data = [r.SerializeToString() for r in reqs] if rpc == "echo" else reqs
                await drive(calls, data, conc)
            size = args.requests // args.blocks
            for b in range(args.blocks):
                for rpc in RPCS[b % 2 :] + RPCS[: b % 2]:
                    reqs = load.take(size)
                    calls = ch.echo if rpc == "echo" else ch.rewrite
                    data = [r.SerializeToString() for r in reqs] if rpc == "echo" else reqs
                    s0 = sum(bo.proc_cpu_s(p) for p in pids)
                    c0 = bo.own_cpu_s()
                    lat, wall, resp = await drive(calls, data, conc)
                    s1 = sum(bo.proc_cpu_s(p) for p in pids)
                    c1 = bo.own_cpu_s()
                    bad = 0
                    if rpc == "online":
                        bad = sum(1 for r in resp if r.reason in bo.BAD_REASONS)
                    rows.append(Row(processes, rpc, conc, lat, wall, s1 - s0, c1 - c0, bad))
    finally:
        await ch.close()
    return rows


def server_settings(redis_url: str, ranker: str, artifact: Path) -> Settings:
    """What ``bench_online.py`` serves (:func:`bench_online.server_settings`), with the
    query tower of the DPR ``artifact``."""
    settings = bo.server_settings(redis_url, ranker)
    settings.dpr.artifacts_dir = artifact.parent
    return settings


def pooled(rows: list[Row], processes: int, rpc: str, conc: int) -> dict[str, float]:
    """p50/p99 ms, QPS, CPU ms per call of the blocks of one (processes, rpc, conc)."""
    sel = [r for r in rows if (r.processes, r.rpc, r.conc) == (processes, rpc, conc)]
    lat = np.asarray([x for r in sel for x in r.latencies]) * 1e3
    n = len(lat)
    wall = sum(r.wall_s for r in sel)
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "qps": n / wall,
        "server_cpu_ms": sum(r.server_cpu_s for r in sel) / n * 1e3,
        "client_cpu_ms": sum(r.client_cpu_s for r in sel) / n * 1e3,
        "bad": float(sum(r.bad for r in sel)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="catalog entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--channels", type=int, default=16, help="client connections")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests", type=int, default=2000, help="timed calls per row and round")
    ap.add_argument("--blocks", type=int, default=4, help="interleaved blocks per row")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument(
        "--ranker", default="synthetic", help="synthetic | trained | heuristic | ARTIFACT_DIR"
    )
    ap.add_argument("--ranker-trees", type=int, default=500)
    ap.add_argument("--dpr", type=Path, help="DPR artifact dir (as bench_online.py --dpr)")
    ap.add_argument("--load-timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = ap.parse_args()
    if args.blocks < 1 or args.requests < args.blocks:
        ap.error("--requests must be >= --blocks >= 1")
    start = time.perf_counter()
    settings = load_settings()
    artifact = zero_shot_artifact(Path(settings.dpr.artifacts_dir))
    if args.dpr is not None:
        meta = json.loads((args.dpr / "dpr.json").read_text())
        if meta.get("distilled_from") != artifact.name:
            ap.error(f"--dpr {args.dpr} is not distilled from the zero-shot {artifact.name}")
        artifact = args.dpr.resolve()
    build = bo.build_index(args.n, args.seed, artifact.name, settings, 2)
    ranker = bo.resolve_ranker(args.ranker, args.ranker_trees, args.seed)[0]
    per_config = len(args.concurrency) * len(RPCS) * (args.requests + WARMUP) + 100
    n_online = args.rounds * len(args.processes) * per_config
    rows: list[Row] = []
    memory: dict[int, list[dict[str, Any]]] = {p: [] for p in args.processes}
    caches: dict[int, dict[str, float]] = {}  # each process's cache sizes (split_caches)
    with tempfile.TemporaryDirectory(prefix="qrw-bench-processes-") as tmp:
        redis_server = bo.EmbeddedRedis(Path(tmp) / "redis")
        redis_server.start()
        try:
            bo.log("publishing pairs, personal histories and the index")
            work = bo.publish_workload(
                redis_server.url, build, artifact, settings, n_online, args.users, args.seed
            )
            load = Load(work)
            srv_settings = server_settings(redis_server.url, ranker, artifact)
            for rnd in range(args.rounds):
                for procs_n in args.processes:
                    t0 = time.perf_counter()
                    with ServiceProcesses(
                        srv_settings,
                        procs_n,
                        port=0,
                        extra_handlers=extra_handlers,
                        start_timeout_s=args.load_timeout,
                    ) as procs:
                        bo.log(
                            f"round {rnd + 1}: {procs_n} process(es) ready in "
                            f"{time.perf_counter() - t0:.1f} s (pids {procs.pids})"
                        )
                        target = f"127.0.0.1:{procs.port}"
                        rows += asyncio.run(measure_config(target, procs.pids, procs_n, load, args))
                        per_pid = {
                            pid: {**bo.proc_memory_mb(pid), **smaps_mb(pid)} for pid in procs.pids
                        }
                        memory[procs_n].append(per_pid)
                        run = procs.process_settings
                        assert run is not None
                        caches[procs_n] = {
                            "pair_cache_size": run.service.pair_cache_size,
                            "personal_cache_mb": run.service.personal_cache_mb,
                            "query_cache_size": run.dpr.query_cache_size,
                        }
        finally:
            redis_server.stop()
    report(args, build, rows, memory, caches, start)


def report(
    args: argparse.Namespace,
    build: bo.IndexBuild,
    rows: list[Row],
    memory: dict[int, list[dict[int, dict[str, float]]]],
    caches: dict[int, dict[str, float]],
    start: float,
) -> None:
    """Print the table (and ``--json``)."""
    print()
    print(
        f"qrw service processes benchmark: {build.info.n:,} entries ({build.info.kind}); "
        f"{args.requests} calls per row and round in {args.blocks} interleaved blocks, "
        f"{args.rounds} round(s) pooled; {args.channels} client connections; {describe()}"
    )
    head = (
        f"{'procs':>5} {'rpc':<7} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>7} "
        f"{'QPS/echo':>8} {'srv CPU':>8} {'cli CPU':>8}"
    )
    print(head)
    table = []
    for procs_n in args.processes:
        for conc in args.concurrency:
            echo = pooled(rows, procs_n, "echo", conc)
            for rpc in RPCS:
                m = pooled(rows, procs_n, rpc, conc)
                ratio = m["qps"] / echo["qps"]
                print(
                    f"{procs_n:>5} {rpc:<7} {conc:>4} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} "
                    f"{m['qps']:>7.0f} {ratio:>8.2f} {m['server_cpu_ms']:>8.3f} "
                    f"{m['client_cpu_ms']:>8.3f}"
                    + (f"  degraded {m['bad']:.0f}" if m["bad"] else "")
                )
                table.append({"processes": procs_n, "rpc": rpc, "concurrency": conc, **m})
    print("(ms; srv/cli CPU = CPU ms per call of all service processes / of this client)")
    print()
    print("service memory at the end of each run (MB): per process VmRSS / VmHWM; summed Pss")
    mem_out = []
    for procs_n in args.processes:
        for i, per_pid in enumerate(memory[procs_n]):
            rss = " ".join(f"{m['VmRSS']:.0f}/{m['VmHWM']:.0f}" for m in per_pid.values())
            pss = sum(m["Pss"] for m in per_pid.values())
            anon = sum(m["Pss_Anon"] for m in per_pid.values())
            file = sum(m["Pss_File"] for m in per_pid.values())
            c = caches.get(procs_n, {})
            print(
                f"  {procs_n} process(es), round {i + 1}: RSS/HWM {rss}; Pss total {pss:.0f} "
                f"(anonymous {anon:.0f}, file-backed {file:.0f}); caches per process: "
                f"{c.get('pair_cache_size', 0):.0f} pair answers, "
                f"{c.get('personal_cache_mb', 0):.0f} MiB of histories, "
                f"{c.get('query_cache_size', 0):.0f} query vectors"
            )
            mem_out.append(
                {"processes": procs_n, "per_process": list(per_pid.values()), "caches": c}
            )
    best = {
        p: max(pooled(rows, p, "online", c)["qps"] for c in args.concurrency)
        for p in args.processes
    }
    if 1 in best:
        for p, q in best.items():
            if p != 1:
                print(f"online QPS, best level: {p} processes / 1 = {q / best[1]:.2f}")
    print(f"(whole run {time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": describe(), "rows": table, "memory_mb": mem_out, "best_qps": best},
                indent=2,
            )
        )
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
