"""The grpc.aio floor of a call that waits: what a handler costs that suspends for a few ms.

The online path's handler hands its request to a worker thread and awaits it for the
Rewriter's few milliseconds; the echo RPC answers at once. This benchmark measures, on a bare
``grpc.aio`` server (no qrw code) in its own process on 127.0.0.1, five handlers at
concurrency 1 (one call after another from a ``grpc.aio`` client in this process):

- ``echo``: returns the request bytes at once (the floor ``bench_online.py`` divides by);
- ``hop``: returns them from ``loop.run_in_executor`` on a 2-thread pool (the hand-over
  alone, no work);
- ``sleep``: ``await asyncio.sleep(--wait-ms)`` on the loop (a suspension, no thread);
- ``hop_wait``: a worker thread sleeps ``--wait-ms`` (``time.sleep``) — the shape of an
  online call handed to a worker;
- ``spin``: the handler itself busy-waits ``--wait-ms`` on the loop (no suspension) — the
  shape of an online call run inline when the service is idle
  (``service.online_inline_max_ms``).

Printed per handler: client p50 / p99 (ms), the p50 above ``--wait-ms`` for the waiting
handlers, and the server event-loop thread's CPU per call (µs; ``time.thread_time`` read by a
fifth RPC before and after each row). The handlers are interleaved over ``--rounds``
rounds; medians of the rounds are printed, because the machine is shared. Bounded:
``rounds x 5 x (calls + 200 warm-up)`` calls (6,000 by default; ~35 s on 2 cores). The
server process is started and stopped by handle.

Run from the repository root: ``python bench/bench_grpc_floor.py [--wait-ms 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._machine import describe  # noqa: E402

SERVICE = "qrw.bench.Floor"
HANDLERS = ("echo", "hop", "sleep", "hop_wait", "spin")
WARMUP = 200


def serve(wait_s: float) -> None:
    """Server process: the five handlers plus ``loop_cpu`` (the loop thread's CPU seconds);
    prints ``PORT <n>`` when ready, runs until terminated."""
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="floor")

    async def echo(req: bytes, ctx: object) -> bytes:
        return req

    async def hop(req: bytes, ctx: object) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(pool, bytes, req)

    async def sleep(req: bytes, ctx: object) -> bytes:
        await asyncio.sleep(wait_s)
        return req

    def nap(req: bytes) -> bytes:
        time.sleep(wait_s)
        return req

    async def hop_wait(req: bytes, ctx: object) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(pool, nap, req)

    async def spin(req: bytes, ctx: object) -> bytes:
        end = time.perf_counter() + wait_s
        while time.perf_counter() < end:
            pass
        return req

    async def loop_cpu(req: bytes, ctx: object) -> bytes:
        return repr(time.thread_time()).encode()

    async def main() -> None:
        server = grpc.aio.server()
        fns = {
            "echo": echo,
            "hop": hop,
            "sleep": sleep,
            "hop_wait": hop_wait,
            "spin": spin,
            "cpu": loop_cpu,
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in fns.items()}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"PORT {port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


async def measure(port: int, calls: int, rounds: int) -> dict[str, list[tuple[float, ...]]]:
    """Per handler and round: (p50 ms, p99 ms, loop CPU µs per call)."""
    out: dict[str, list[tuple[float, ...]]] = {h: [] for h in HANDLERS}
    payload = b"x" * 64
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stubs = {h: channel.unary_unary(f"/{SERVICE}/{h}") for h in (*HANDLERS, "cpu")}

        async def loop_cpu_s() -> float:
            return float(await stubs["cpu"](b""))

        for r in range(rounds):
            order = HANDLERS[r % len(HANDLERS) :] + HANDLERS[: r % len(HANDLERS)]
            for h in order:
                for _ in range(WARMUP):
                    await stubs[h](payload)
                lat = []
                c0 = await loop_cpu_s()
                for _ in range(calls):
                    t0 = time.perf_counter()
                    await stubs[h](payload)
                    lat.append(time.perf_counter() - t0)
                c1 = await loop_cpu_s()
                q = statistics.quantiles(lat, n=100)
                out[h].append((1e3 * statistics.median(lat), 1e3 * q[98], 1e6 * (c1 - c0) / calls))
    return out


def main() -> None:
    """Start the server process, measure, print, stop the server by its handle."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="timed calls per handler and round")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    ap.add_argument("--wait-ms", type=float, default=4.0, help="the waiting handlers' wait")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.wait_ms / 1e3)
        return
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--wait-ms", str(args.wait_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server did not start: {line!r}")
        res = asyncio.run(measure(int(line.split()[1]), args.calls, args.rounds))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    print(
        f"\ngrpc.aio floor, concurrency 1, {args.calls} calls per row, median of {args.rounds} "
        f"round(s); waiting handlers wait {args.wait_ms:g} ms; {describe()}; grpcio "
        f"{grpc.__version__}"
    )
    print(f"{'handler':<10}{'p50 ms':>9}{'p99 ms':>9}{'p50 - wait':>12}{'loop CPU us':>13}")
    for h in HANDLERS:
        p50, p99, cpu = (statistics.median(v[i] for v in res[h]) for i in range(3))
        over = f"{p50 - args.wait_ms:.3f}" if h in ("sleep", "hop_wait", "spin") else "-"
        print(f"{h:<10}{p50:>9.3f}{p99:>9.3f}{over:>12}{cpu:>13.0f}")
    print(
        "(p50 - wait: what a call that waits costs beyond its wait; compare with echo's p50, "
        "the cost of a call that does not)"
    )


if __name__ == "__main__":
    main()
