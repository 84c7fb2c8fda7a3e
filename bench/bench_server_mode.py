"""Which gRPC server mode serves the Rewriter fastest: sync ``grpc.server`` over a thread pool,
``grpc.aio`` with the (synchronous) Rewriter called inline on the event loop, or ``grpc.aio``
with the Rewriter in ``loop.run_in_executor``?

For each mode this script starts the server in its own process (127.0.0.1, ephemeral port),
beside an embedded Redis holding a small published version, then drives it from this process
with a ``grpc.aio`` client: ``--requests`` Rewrite calls (alternating precomputed hits and
misses) at each concurrency level, and as many calls to a trivial echo RPC (bytes in, same
bytes out; registered only here as ``qrw.bench.Echo/Echo``) on the same server, so the
Rewrite figures can be read relative to the gRPC floor of that mode. Prints p50/p99 latency
(ms, client-side, per call) and QPS (calls / wall seconds) per mode, RPC and concurrency,
plus Rewrite/echo ratios. Modes are interleaved over ``--rounds`` rounds and medians printed,
because a shared machine is noisy. Bounded: rounds x modes x levels x (2 x requests + 600
warm-up) calls (119,000 by default; about 75 s on 2 cores).

Run from the repository root: ``python bench/bench_server_mode.py [--requests 3000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # allow `python bench/bench_server_mode.py` without install
    sys.path.insert(0, str(ROOT))

from rewrite import keyspace  # noqa: E402
from rewrite._pb.queryrewrite.v1 import rewrite_pb2  # noqa: E402
from rewrite.client import rewrite_stub  # noqa: E402
from rewrite.config import Settings, load_settings  # noqa: E402
from rewrite.redis_server import EmbeddedRedis  # noqa: E402
from rewrite.rewriter import Rewriter  # noqa: E402
from rewrite.server import (  # noqa: E402
    MAX_CONCURRENT_RPCS,
    SERVICE_NAME,
    QueryRewriteServicer,
    RewriteContext,
    RewriteServer,
    channel_options,
    pass_through_response,
    request_from_proto,
    result_to_proto,
    rewrite_handler,
)
from rewrite.types import InvalidRequestError  # noqa: E402

MODES = ("sync", "aio", "aio_executor")
ECHO_SERVICE = "qrw.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
VERSION = "bench-v1"
N_PAIRS = 50


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _aio_echo(request: bytes, context: Any) -> bytes:
    return request


def echo_handler(*, asynchronous: bool) -> grpc.GenericRpcHandler:
    """A bytes-passthrough method (no (de)serializers): the floor of one unary call."""
    behavior: Any = _aio_echo if asynchronous else _echo
    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(behavior)}
    )


def publish(url: str) -> None:
    """Write a small complete version by hand and make it active."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    pipe = client.pipeline()
    for i in range(N_PAIRS):
        key = keyspace.pair_key(VERSION, f"play song number {i}")
        pipe.hset(
            key,
            mapping={
                "rewrite": f"play the song {i}",
                "confidence": 0.9,
                "support": 5,
                "n_users": 2,
            },
        )
    pipe.hset(keyspace.meta_key(VERSION), mapping={"n_pairs": N_PAIRS, "complete": 1})
    pipe.set(keyspace.ACTIVE, VERSION)
    pipe.execute()
    client.close()


def requests() -> list[rewrite_pb2.RewriteRequest]:
    """Alternating hits (different casing/punctuation than the stored key) and misses."""
    out = []
    for i in range(N_PAIRS):
        out.append(rewrite_pb2.RewriteRequest(utterance=f"Play song number {i}!", user_id="u1"))
        out.append(rewrite_pb2.RewriteRequest(utterance=f"what is the time in {i}", user_id="u2"))
    return out


# --------------------------------------------------------------------------- server side


class SyncServicer:
    """The alternative measured: :class:`rewrite.server.QueryRewriteServicer`'s logic for a
    sync ``grpc.server`` (each call runs on a pool thread)."""

    def __init__(self, rewriter: Rewriter, request_deadline_s: float) -> None:
        self.rewriter = rewriter
        self.request_deadline_s = request_deadline_s

    def Rewrite(
        self, request: rewrite_pb2.RewriteRequest, context: grpc.ServicerContext
    ) -> rewrite_pb2.RewriteResponse:
        if context.time_remaining() <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        try:
            return result_to_proto(self.rewriter.rewrite(request_from_proto(request)))
        except InvalidRequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception:
            return pass_through_response(request, "internal_error")


class ExecutorServicer(QueryRewriteServicer):
    """The other alternative: grpc.aio with the Rewriter in ``loop.run_in_executor``."""

    async def Rewrite(
        self, request: rewrite_pb2.RewriteRequest, context: RewriteContext
    ) -> rewrite_pb2.RewriteResponse:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        try:
            req = request_from_proto(request)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self.rewriter.rewrite, req)
            return result_to_proto(result)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception:
            return pass_through_response(request, "internal_error")


def serve_sync(settings: Settings) -> None:
    """The sync variant: ``grpc.server`` over a ``service.max_workers`` thread pool."""
    svc = settings.service
    rewriter = Rewriter(settings)
    rewriter.warm_up()
    servicer = SyncServicer(rewriter, svc.request_deadline_s)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=svc.max_workers),
        options=channel_options(svc.max_message_bytes),
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "Rewrite": grpc.unary_unary_rpc_method_handler(
                        servicer.Rewrite,
                        request_deserializer=rewrite_pb2.RewriteRequest.FromString,
                        response_serializer=rewrite_pb2.RewriteResponse.SerializeToString,
                    )
                },
            ),
            echo_handler(asynchronous=False),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"PORT {port}", flush=True)
    stop.wait()
    server.stop(0).wait()
    rewriter.close()


async def serve_aio(settings: Settings, executor: bool) -> None:
    """``aio``: the real :class:`rewrite.server.RewriteServer`; ``aio_executor``: the same
    server options with :class:`ExecutorServicer`."""
    svc = settings.service
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if not executor:
        srv = RewriteServer(settings, port=0, extra_handlers=[echo_handler(asynchronous=True)])
        await srv.astart()
        print(f"PORT {srv.port}", flush=True)
        await stop.wait()
        await srv.astop(0)
        return
    rewriter = Rewriter(settings)
    rewriter.warm_up()
    server = grpc.aio.server(
        options=channel_options(svc.max_message_bytes), maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS
    )
    servicer = ExecutorServicer(rewriter, svc.request_deadline_s)
    server.add_generic_rpc_handlers((rewrite_handler(servicer), echo_handler(asynchronous=True)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await stop.wait()
    await server.stop(0)
    rewriter.close()


def run_server(mode: str, redis_url: str) -> None:
    settings = load_settings()
    settings.redis.url = redis_url
    if mode == "sync":
        serve_sync(settings)
    else:
        asyncio.run(serve_aio(settings, executor=mode == "aio_executor"))


# --------------------------------------------------------------------------- client side


async def drive(
    call: Callable[[Any], Awaitable[Any]], payloads: list[Any], n: int, concurrency: int
) -> tuple[list[float], float]:
    """``n`` calls from ``concurrency`` coroutines; returns (latencies in s, wall seconds)."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(payloads[i % len(payloads)])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def summary(latencies: list[float], wall_s: float) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, QPS)."""
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49] * 1000.0, q[98] * 1000.0, len(latencies) / wall_s


async def measure(port: int, n: int, levels: list[int]) -> list[tuple[int, str, tuple[float, ...]]]:
    rows: list[tuple[int, str, tuple[float, ...]]] = []
    reqs = requests()
    echo_payloads = [r.SerializeToString() for r in reqs]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        rewrite = rewrite_stub(channel)
        echo = channel.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None)
        check = await rewrite(reqs[0], timeout=5)
        if not (check.rewritten and check.model_version == VERSION):
            raise RuntimeError(f"server did not rewrite a known utterance: {check}")

        async def call_rewrite(req: Any) -> Any:
            return await rewrite(req, timeout=5)

        async def call_echo(payload: Any) -> Any:
            return await echo(payload, timeout=5)

        for conc in levels:
            await drive(call_rewrite, reqs, 300, conc)  # warm-up
            await drive(call_echo, echo_payloads, 300, conc)
            rows.append((conc, "echo", summary(*await drive(call_echo, echo_payloads, n, conc))))
            rows.append((conc, "rewrite", summary(*await drive(call_rewrite, reqs, n, conc))))
    return rows


def start_server(mode: str, redis_url: str) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--redis-url", redis_url],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"{mode} server failed to start: {line!r}")
    return proc, int(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="timed calls per row")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--rounds", type=int, default=3, help="repeat all modes, report medians")
    ap.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args.serve, args.redis_url)
        return

    with tempfile.TemporaryDirectory(prefix="qrw-bench-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis")
        redis_server.start()
        try:
            publish(redis_server.url)
            results: dict[tuple[str, int, str], list[tuple[float, ...]]] = {}
            for _ in range(args.rounds):  # modes interleaved per round, medians reported
                for mode in args.modes:
                    proc, port = start_server(mode, redis_server.url)
                    try:
                        rows = asyncio.run(measure(port, args.requests, args.concurrency))
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(timeout=10)
                    for conc, rpc, figures in rows:
                        results.setdefault((mode, conc, rpc), []).append(figures)
        finally:
            redis_server.stop()
    report(results, args)


def report(results: dict[tuple[str, int, str], list[tuple[float, ...]]], args: Any) -> None:
    """Print medians over rounds (and the QPS range) per mode, concurrency and RPC."""
    print(
        f"{args.requests} calls per row, median of {args.rounds} rounds; server in its own "
        f"process; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
        f"grpcio {grpc.__version__}"
    )
    print(
        f"{'mode':<13}{'conc':>5} {'rpc':<8}{'p50 ms':>8}{'p99 ms':>8}{'QPS':>8}"
        f"{'QPS range':>13}{'p50/echo':>10}{'QPS/echo':>10}"
    )

    def med(key: tuple[str, int, str], i: int) -> float:
        return statistics.median(f[i] for f in results[key])

    for mode in args.modes:
        for conc in args.concurrency:
            for rpc in ("echo", "rewrite"):
                key = (mode, conc, rpc)
                p50, p99, qps = med(key, 0), med(key, 1), med(key, 2)
                lo, hi = min(f[2] for f in results[key]), max(f[2] for f in results[key])
                e50, eqps = med((mode, conc, "echo"), 0), med((mode, conc, "echo"), 2)
                print(
                    f"{mode:<13}{conc:>5} {rpc:<8}{p50:>8.3f}{p99:>8.3f}{qps:>8.0f}"
                    f"{f'{lo:.0f}-{hi:.0f}':>13}{p50 / e50:>10.2f}{qps / eqps:>10.2f}"
                )


if __name__ == "__main__":
    main()
