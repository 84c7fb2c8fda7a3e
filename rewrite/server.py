"""The gRPC service ``queryrewrite.v1.QueryRewrite``: a thin ``grpc.aio`` adapter over
:class:`~rewrite.rewriter.Rewriter` (which holds all the logic and knows nothing of gRPC).

What this module adds to the Rewriter:

- proto ↔ dataclass conversion (small pure functions, also used by :mod:`rewrite.client`);
- status codes: :class:`~rewrite.types.InvalidRequestError` → ``INVALID_ARGUMENT`` with its
  message (cut to :data:`MAX_STATUS_MESSAGE_CHARS`); request bytes that do not parse as a
  ``RewriteRequest`` (corrupt wire format, invalid UTF-8 in a string field) → also
  ``INVALID_ARGUMENT`` (gRPC itself would answer ``UNKNOWN``); any other exception is logged
  and answered as a pass-through (``reason="internal_error"``), so no internals leak and the
  caller's NLU still gets the text;
- the standard health service (``grpc.health.v1``; ``""`` and ``queryrewrite.v1.QueryRewrite``
  are SERVING while up, NOT_SERVING from the start of shutdown) and server reflection
  (``grpc.reflection.v1alpha``);
- limits: max receive/send message size = ``service.max_message_bytes`` bytes (larger
  messages get ``RESOURCE_EXHAUSTED`` from gRPC itself), at most :data:`MAX_CONCURRENT_RPCS`
  calls in handlers (more get ``RESOURCE_EXHAUSTED`` at once), at most
  ``service.max_pending_calls`` calls waiting inside gRPC for a handler (more are cancelled
  at once, status ``CANCELLED``), and a per-call time budget. With the Rewriter inline each
  handler finishes before the next starts, so under overload calls wait in gRPC's pending
  queue, not in handlers: that queue is the real bound. gRPC core's own default
  (``grpc.server.max_pending_requests`` 1,000 / hard limit 3,000) rejects at random from
  1,000 pending calls, about 0.5 s of work here (measured: a burst of 3,000 calls had ~700
  cancelled); ``max_pending_calls`` (default 2,000, ~1 s of work, the size of the default
  ``service.request_deadline_s``) sets both limits, so the bound is explicit and exact;
- graceful shutdown: on SIGTERM/SIGINT health flips to NOT_SERVING; the server keeps answering
  until no call has started for ``service.drain_quiet_s`` seconds (at most half of
  ``service.grace_s``), then new calls are refused and in-flight ones get the rest of the grace
  to finish (``grpc.aio.Server.stop(grace)``). The quiet wait matters: ``stop()`` cancels
  (``CANCELLED``) every call gRPC has received but not yet handed to a handler — with the
  Rewriter inline on the loop, a burst queues there — so without it a drain under load failed
  hundreds of calls sent well before the signal;
- an optional Prometheus ``/metrics`` endpoint on 127.0.0.1 (``prometheus_client``).

Server mode: ``grpc.aio``. Validation, normalization and the precomputed lookup
(:meth:`Rewriter.prepare`) run inline on the event loop (no thread hop); a request that
needs the online stages (encode → trigger) continues on one of ``service.online_threads``
worker threads, because those stages spend most of their time in ONNX Runtime, FAISS, a Redis
socket and the ranker, which release the GIL, so two batches' online work overlaps on two
cores (``bench/bench_online.py`` measures it; 0 threads = all inline). Requests that arrive
while both workers are busy queue in a :class:`rewrite.batching.OnlineBatcher` and run
together as one micro-batch (:meth:`Rewriter.complete_batch`, at most
``service.online_max_batch``) when a worker frees up; a request that finds a free worker runs
at once, alone. A call that is the service's only open call, finding no batch running, runs
its online stages inline on the event loop instead (``service.online_inline_max_ms``: the
hand-over and the wait cost 0.3-1 ms at concurrency 1; see :mod:`rewrite.batching`). Up to
:data:`MAX_CONCURRENT_RPCS` calls may then wait inside their handlers.
The inline choice for the precomputed path was made by measurement with
``bench/bench_server_mode.py`` (3,000 Rewrite calls per row, half precomputed hits and half
misses, against an embedded Redis; server in its own process, a grpc.aio load client in
another, 127.0.0.1; 2-core machine, grpcio 1.85.1; medians of 5 interleaved rounds; the echo
baseline is a trivial bytes echo RPC on the same server)::

    mode (Rewrite)     conc  p50 ms  p99 ms   QPS   QPS/echo-QPS of that mode
    sync ThreadPool       1   0.817   1.194  1184   0.67
    aio inline            1   0.790   1.064  1223   0.75
    aio run_in_executor   1   0.957   1.348  1032   0.62
    sync ThreadPool       8   4.259   7.564  1872   0.36
    aio inline            8   3.344   4.842  2314   0.63
    aio run_in_executor   8   3.639   8.321  1991   0.50
    (echo p50 at conc 1: sync 0.545, aio 0.603 ms; QPS at conc 8: sync 5209, aio 3679)

At concurrency 1 the modes tie (within run-to-run noise; earlier runs had sync ahead by up to
0.1 ms p50); at 8, aio inline gives +24 % QPS and -36 % p99 over the thread pool, whose
workers contend for the GIL. run_in_executor only adds a thread hop. Re-measure when
CPU-heavy online stages (DPR encoder, FAISS, which release the GIL) join the pipeline.

Per-call budget (work stays bounded when the client sends no deadline): a call's budget is
the client's deadline, capped at ``service.request_deadline_s`` seconds. A call whose client
deadline has already passed when the handler starts (it queued behind a burst) is shed with
``DEADLINE_EXCEEDED`` without running the Rewriter. Running work is bounded by construction:
the Rewriter's only I/O is Redis with ``redis.socket_timeout_s`` (50 ms) per command and a
0.5 s back-off after a failure, and its CPU work is linear in an utterance capped at
``service.max_utterance_chars``; queueing on the loop is bounded by
:data:`MAX_CONCURRENT_RPCS` × the per-call loop time (< 1 ms). A call that overruns its
budget is logged at WARNING. A running stage cannot be pre-empted, but the online stages stop
at the next stage boundary when the call's budget has run out (the caller gets a pass-through,
``reason="over_budget"``) or the call was cancelled (``abandoned``: its worker does no more
work for an answer nobody will read).

Sources: gRPC Python API and AsyncIO API (https://grpc.github.io/grpc/python/grpc.html,
https://grpc.github.io/grpc/python/grpc_asyncio.html), the asyncio route_guide example
(https://github.com/grpc/grpc/tree/master/examples/python/route_guide), health checking
(https://github.com/grpc/grpc/blob/master/doc/health-checking.md), reflection
(https://github.com/grpc/grpc/blob/master/doc/python/server_reflection.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, cast

import grpc
import prometheus_client
from google.protobuf.message import DecodeError
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rewrite import metrics
from rewrite._pb.queryrewrite.v1 import rewrite_pb2
from rewrite.batching import OnlineBatcher
from rewrite.config import Settings
from rewrite.rewriter import Rewriter
from rewrite.types import (
    Candidate,
    ContextTurn,
    InvalidRequestError,
    RewriteRequest,
    RewriteResult,
)

log = logging.getLogger(__name__)

#: Full proto name of the service (what health checks and reflection use).
SERVICE_NAME: str = rewrite_pb2.DESCRIPTOR.services_by_name["QueryRewrite"].full_name
#: HTTP/2 path of the Rewrite method.
REWRITE_METHOD = f"/{SERVICE_NAME}/Rewrite"
#: ``reason`` of a pass-through caused by an unexpected server error.
INTERNAL_ERROR_REASON = "internal_error"
#: Calls in flight at once (incl. health watches); more are refused with RESOURCE_EXHAUSTED.
MAX_CONCURRENT_RPCS = 512
#: Longest status message sent, characters. The message travels percent-encoded in the
#: ``grpc-message`` trailer (up to 12 bytes per character); gRPC's default metadata limits are
#: 8 KiB (soft) and 16 KiB (hard), and a longer trailer reaches the caller as
#: ``RESOURCE_EXHAUSTED`` ("received metadata size exceeds hard limit") instead of the status
#: the server sent. 512 characters stay within 6 KiB.
MAX_STATUS_MESSAGE_CHARS = 512

#: The handler's context (the request type is the raw ``bytes``, parsed by the handler).
RewriteContext = grpc.aio.ServicerContext[Any, rewrite_pb2.RewriteResponse]


# --------------------------------------------------------------------------- conversion


def context_turn_from_proto(pb: rewrite_pb2.ContextTurn) -> ContextTurn:
    """``queryrewrite.v1.ContextTurn`` → :class:`ContextTurn` (``seconds_ago`` in seconds)."""
    return ContextTurn(
        utterance=pb.utterance,
        response=pb.response,
        seconds_ago=pb.seconds_ago,
        barge_in=pb.barge_in,
    )


def context_turn_to_proto(turn: ContextTurn) -> rewrite_pb2.ContextTurn:
    """:class:`ContextTurn` → ``queryrewrite.v1.ContextTurn``."""
    return rewrite_pb2.ContextTurn(
        utterance=turn.utterance,
        response=turn.response,
        seconds_ago=turn.seconds_ago,
        barge_in=turn.barge_in,
    )


def request_from_proto(pb: rewrite_pb2.RewriteRequest) -> RewriteRequest:
    """``queryrewrite.v1.RewriteRequest`` → :class:`RewriteRequest` (no validation here)."""
    return RewriteRequest(
        utterance=pb.utterance,
        user_id=pb.user_id,
        context=tuple(context_turn_from_proto(t) for t in pb.context),
        device_id=pb.device_id,
        locale=pb.locale,
        arm=pb.arm,
        explain=pb.explain,
        request_id=pb.request_id,
        device_type=pb.device_type,
    )


def request_to_proto(request: RewriteRequest) -> rewrite_pb2.RewriteRequest:
    """:class:`RewriteRequest` → ``queryrewrite.v1.RewriteRequest``."""
    return rewrite_pb2.RewriteRequest(
        utterance=request.utterance,
        user_id=request.user_id,
        context=[context_turn_to_proto(t) for t in request.context],
        device_id=request.device_id,
        locale=request.locale,
        arm=request.arm,
        explain=request.explain,
        request_id=request.request_id,
        device_type=request.device_type,
    )


def candidate_to_proto(candidate: Candidate) -> rewrite_pb2.Candidate:
    """:class:`Candidate` → ``queryrewrite.v1.Candidate``."""
    return rewrite_pb2.Candidate(
        text=candidate.text,
        source=candidate.source,
        score=candidate.score,
        features=dict(candidate.features),
    )


def candidate_from_proto(pb: rewrite_pb2.Candidate) -> Candidate:
    """``queryrewrite.v1.Candidate`` → :class:`Candidate`."""
    return Candidate(
        text=pb.text, source=pb.source, score=pb.score, features=dict(pb.features.items())
    )


def result_to_proto(result: RewriteResult) -> rewrite_pb2.RewriteResponse:
    """:class:`RewriteResult` → ``queryrewrite.v1.RewriteResponse`` (``latency_ms`` in ms)."""
    return rewrite_pb2.RewriteResponse(
        rewrite=result.rewrite,
        rewritten=result.rewritten,
        source=result.source,
        confidence=result.confidence,
        model_version=result.model_version,
        normalized=result.normalized,
        arm=result.arm,
        reason=result.reason,
        candidates=[candidate_to_proto(c) for c in result.candidates],
        latency_ms=result.latency_ms,
        request_id=result.request_id,
    )


def result_from_proto(pb: rewrite_pb2.RewriteResponse) -> RewriteResult:
    """``queryrewrite.v1.RewriteResponse`` → :class:`RewriteResult`."""
    return RewriteResult(
        rewrite=pb.rewrite,
        rewritten=pb.rewritten,
        source=pb.source,
        confidence=pb.confidence,
        model_version=pb.model_version,
        normalized=pb.normalized,
        arm=pb.arm,
        reason=pb.reason,
        candidates=tuple(candidate_from_proto(c) for c in pb.candidates),
        latency_ms=pb.latency_ms,
        request_id=pb.request_id,
    )


def pass_through_response(
    request: rewrite_pb2.RewriteRequest, reason: str
) -> rewrite_pb2.RewriteResponse:
    """A pass-through answer (``rewrite == utterance``, ``source="none"``) for ``request``."""
    return rewrite_pb2.RewriteResponse(
        rewrite=request.utterance,
        rewritten=False,
        source="none",
        confidence=0.0,
        arm=request.arm,
        reason=reason,
        request_id=request.request_id,
    )


def status_message(text: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (``…`` marks a cut), for a status message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """gRPC channel/server arguments shared by the server and the client.

    Args:
        max_message_bytes: cap on one serialized message in either direction, bytes.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


# --------------------------------------------------------------------------- servicer


class QueryRewriteServicer:
    """Implements ``queryrewrite.v1.QueryRewrite`` (grpc.aio) over a :class:`Rewriter`.

    Args:
        rewriter: a warmed-up Rewriter; the servicer neither warms nor closes it. Its
            :meth:`~Rewriter.prepare` and :meth:`~Rewriter.finish` run inline on the event
            loop; the online stages run in micro-batches on ``online``'s worker threads when
            given (inline when the call is alone and the batcher idle, if it allows), else
            inline too.
        request_deadline_s: server-side budget per call, seconds; the client's deadline wins
            when it is earlier (see the module docstring).
        online: the micro-batcher of the online stages over the worker threads
            (``service.online_threads``, ``service.online_max_batch``); None = inline.
    """

    def __init__(
        self,
        rewriter: Rewriter,
        request_deadline_s: float,
        online: OnlineBatcher | None = None,
    ) -> None:
        self.rewriter = rewriter
        self.request_deadline_s = request_deadline_s
        self.online = online
        #: ``time.monotonic()`` when the last Rewrite call reached its handler (drain uses it)
        self.last_call_at = -1e18
        #: Rewrite calls whose handler started and that gRPC has not yet finished (their
        #: done callback has not run); 1 = this call alone (the batcher's inline-when-idle test)
        self.open_calls = 0

    def _call_finished(self, _context: object) -> None:
        self.open_calls -= 1

    async def Rewrite(  # the gRPC method name
        self, request: rewrite_pb2.RewriteRequest, context: RewriteContext
    ) -> rewrite_pb2.RewriteResponse:
        """Answer one ``Rewrite`` call.

        Returns:
            The rewrite, or a pass-through (also on an unexpected error, then with
            ``reason="internal_error"``).

        Aborts the call with:
            ``INVALID_ARGUMENT`` when the request breaks the API contract (the
            :class:`InvalidRequestError` message), ``DEADLINE_EXCEEDED`` when the client's
            deadline passed before the handler started.
        """
        started = time.monotonic()
        self.open_calls += 1
        # grpc-stubs (only) declares the callback as a generic class; gRPC takes any callable
        done = cast("grpc.aio.DoneCallback[Any, Any]", self._call_finished)
        context.add_done_callback(done)
        remaining = context.time_remaining()  # seconds; None when the client set no deadline
        budget_s = self.request_deadline_s
        if remaining is not None:
            if remaining <= 0:
                log.warning("shed a Rewrite call whose deadline passed while it queued")
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            budget_s = min(budget_s, remaining)
        try:
            try:
                state = self.rewriter.prepare(request_from_proto(request))
                state.deadline_s = time.perf_counter() + budget_s - (time.monotonic() - started)
                if state.done or self.online is None:
                    state = self.rewriter.complete(state)
                else:
                    # a cancelled call (client deadline, disconnect, shutdown) is marked
                    # abandoned: its batch drops it before the next stage
                    state = await self.online.complete(state, alone=self.open_calls == 1)
                return result_to_proto(self.rewriter.finish(state))
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_message(str(e)))
            except Exception:
                log.exception("Rewrite failed; passing through (request_id=%r)", request.request_id)
                metrics.PASS_THROUGH.labels(INTERNAL_ERROR_REASON).inc()
                return pass_through_response(request, INTERNAL_ERROR_REASON)
        finally:  # also when the call was cancelled while its online stages ran
            elapsed_s = time.monotonic() - started
            if elapsed_s > budget_s:
                log.warning(
                    "Rewrite took %.1f ms, over its %.1f ms budget (request_id=%r)",
                    elapsed_s * 1000.0,
                    budget_s * 1000.0,
                    request.request_id,
                )


async def parse_request(data: bytes, context: RewriteContext) -> rewrite_pb2.RewriteRequest:
    """Parse the request bytes of a ``Rewrite`` call.

    Aborts the call with ``INVALID_ARGUMENT`` (and counts it in ``qrw_invalid_requests_total``)
    when ``data`` is not a valid serialized ``RewriteRequest``: a corrupt wire format, or a
    string field that is not valid UTF-8 (proto3 requires UTF-8). A request deserializer
    registered with gRPC cannot choose the status: gRPC answers its exception with ``UNKNOWN``.
    """
    try:
        return rewrite_pb2.RewriteRequest.FromString(data)
    except DecodeError as e:
        metrics.INVALID.inc()
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, status_message(f"malformed RewriteRequest: {e}")
        )


def rewrite_handler(servicer: QueryRewriteServicer) -> grpc.GenericRpcHandler:
    """The generic handler serving ``REWRITE_METHOD`` with ``servicer``.

    Same as the generated ``rewrite_pb2_grpc.add_QueryRewriteServicer_to_server``, which is
    not used because that module has no ``.pyi`` and fails ``mypy`` (untyped defs); the
    typed ``rewrite_pb2`` serializer is used instead. Requests arrive as raw bytes and are
    parsed by :func:`parse_request`, so undecodable ones get ``INVALID_ARGUMENT``.
    """

    async def rewrite(data: bytes, context: RewriteContext) -> rewrite_pb2.RewriteResponse:
        servicer.last_call_at = time.monotonic()
        return await servicer.Rewrite(await parse_request(data, context), context)

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Rewrite": grpc.unary_unary_rpc_method_handler(
                rewrite,
                request_deserializer=None,  # raw bytes; parse_request decides the status
                response_serializer=rewrite_pb2.RewriteResponse.SerializeToString,
            )
        },
    )


# --------------------------------------------------------------------------- server


class RewriteServer:
    """The rewrite service on a ``grpc.aio`` server, with health, reflection and optional
    Prometheus metrics.

    Two ways to run it:

    - inside a running event loop: ``await srv.astart()`` … ``await srv.astop()`` (what
      :func:`serve` does);
    - from synchronous code (tests, tools): ``srv.start()`` … ``srv.stop()``, or
      ``with RewriteServer(settings) as srv:``, which runs the server on its own event loop
      in a background daemon thread.

    Args:
        settings: loaded settings (``service.*`` for limits, ``redis.*`` for the Rewriter).
        host: interface to bind; default ``settings.service.host``.
        port: TCP port; 0 = an ephemeral port (read :attr:`port` after starting).
        metrics_port: when given, serve Prometheus ``/metrics`` on ``127.0.0.1:metrics_port``
            (0 = ephemeral; read :attr:`metrics_port`).
        rewriter: a Rewriter to serve; default one built from ``settings`` (and closed on
            stop; a given one is left open).
        extra_handlers: more generic RPC handlers to serve beside the API (async behaviours;
            e.g. the benchmark's echo method).
        reuse_port: bind with ``SO_REUSEPORT`` (gRPC's ``grpc.so_reuseport``), so that
            several service processes listen on one port and the kernel spreads incoming
            connections over them (:mod:`rewrite.processes`); off by default, so a second
            server on a taken port fails to bind instead of sharing it by accident.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int = 0,
        metrics_port: int | None = None,
        rewriter: Rewriter | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self._reuse_port = reuse_port
        self.host = host if host is not None else settings.service.host
        self._requested_port = port
        self._requested_metrics_port = metrics_port
        self._owns_rewriter = rewriter is None
        self._rewriter = rewriter
        self._extra_handlers = tuple(extra_handlers)
        self._server: grpc.aio.Server | None = None
        self._servicer: QueryRewriteServicer | None = None
        self._metrics_httpd: Any = None
        self._online_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._port = 0
        self._metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (0 before start)."""
        return self._port

    @property
    def target(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self._port}"

    @property
    def metrics_port(self) -> int | None:
        """Port of the Prometheus endpoint, or None when it is off."""
        return self._metrics_port

    @property
    def rewriter(self) -> Rewriter | None:
        """The Rewriter being served (None before start when none was given)."""
        return self._rewriter

    async def astart(self) -> RewriteServer:
        """Build and warm the Rewriter (unless given), bind, start, set health SERVING.

        Must run on the event loop that will serve. Returns self.

        Raises:
            RuntimeError: already started, or the port could not be bound.
        """
        if self._server is not None:
            raise RuntimeError("server already started")
        svc = self.settings.service
        if self._rewriter is None:
            self._rewriter = Rewriter(self.settings)
        self._rewriter.warm_up()
        server = grpc.aio.server(
            options=[
                *channel_options(svc.max_message_bytes),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
                # calls received but not yet handed to a handler; beyond this gRPC core
                # cancels new ones at once (soft = hard limit: no random early rejection)
                ("grpc.server.max_pending_requests", svc.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", svc.max_pending_calls),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        if svc.online_threads > 0 and self._online_pool is None:
            self._online_pool = concurrent.futures.ThreadPoolExecutor(
                svc.online_threads, thread_name_prefix="qrw-online"
            )
        batcher = None
        if self._online_pool is not None:
            batcher = OnlineBatcher(
                self._rewriter.complete_batch,
                self._online_pool,
                workers=svc.online_threads,
                max_batch=svc.online_max_batch,
                inline_max_s=svc.online_inline_max_ms / 1e3,
            )
        servicer = QueryRewriteServicer(self._rewriter, svc.request_deadline_s, batcher)
        server.add_generic_rpc_handlers((rewrite_handler(servicer), *self._extra_handlers))
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{self.host}:{self._requested_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise RuntimeError(f"cannot bind the gRPC server to {address}: {e}") from e
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self._port = server, health_servicer, port
        self._servicer = servicer
        if self._requested_metrics_port is not None:
            httpd, _thread = prometheus_client.start_http_server(
                self._requested_metrics_port, addr="127.0.0.1"
            )
            self._metrics_httpd, self._metrics_port = httpd, int(httpd.server_port)
        log.info("qrw gRPC server on %s (metrics port %s)", self.target, self._metrics_port)
        return self

    async def astop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown (idempotent) within ``grace_s`` seconds (default
        ``service.grace_s``): health NOT_SERVING; keep answering until no call has started for
        ``service.drain_quiet_s`` seconds (at most ``grace_s / 2``; see the module docstring);
        then refuse new calls, give in-flight ones the rest of the grace, cancel what is left;
        then close the metrics endpoint and the Rewriter (when this server built it).
        """
        server, self._server = self._server, None
        if server is None:
            return
        grace = self.settings.service.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("qrw gRPC server draining (grace %.1f s)", grace)
        await self._health.enter_graceful_shutdown()  # every service → NOT_SERVING
        await self._serve_queued(min(grace / 2, self.settings.service.drain_quiet_s), grace / 2)
        await server.stop(max(0.0, deadline - time.monotonic()))
        if self._online_pool is not None:
            pool, self._online_pool = self._online_pool, None
            await asyncio.to_thread(pool.shutdown, True)
        if self._metrics_httpd is not None:
            httpd, self._metrics_httpd = self._metrics_httpd, None
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()
        if self._owns_rewriter and self._rewriter is not None:
            self._rewriter.close()
        log.info("qrw gRPC server stopped")

    async def _serve_queued(self, quiet_s: float, limit_s: float) -> None:
        """Keep serving until no Rewrite call has started for ``quiet_s`` seconds (counted from
        the later of the last call and now), for at most ``limit_s`` seconds."""
        if quiet_s <= 0 or limit_s <= 0 or self._servicer is None:
            return
        begin = time.monotonic()
        while (now := time.monotonic()) - begin < limit_s:
            idle = now - max(self._servicer.last_call_at, begin)
            if idle >= quiet_s:
                return
            await asyncio.sleep(min(quiet_s - idle, limit_s - (now - begin)))
        log.warning("calls kept arriving for %.1f s after shutdown began; stopping", limit_s)

    def start(self, timeout_s: float = 30.0) -> RewriteServer:
        """Start on a new event loop in a background daemon thread; returns once serving.

        Raises:
            RuntimeError: already started, or the port could not be bound.
            TimeoutError: not serving within ``timeout_s`` seconds.
        """
        if self._loop is not None:
            raise RuntimeError("server already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="qrw-grpc-loop", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.astart(), loop).result(timeout_s)
        except BaseException:
            self._close_loop()
            raise
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stop a server started with :meth:`start` (idempotent); see :meth:`astop`."""
        if self._loop is None:
            return
        try:
            grace = self.settings.service.grace_s if grace_s is None else grace_s
            asyncio.run_coroutine_threadsafe(self.astop(grace), self._loop).result(grace + 30.0)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> RewriteServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def serve_async(
    settings: Settings,
    port: int | None = None,
    metrics_port: int | None = None,
    *,
    reuse_port: bool = False,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    on_ready: Callable[[RewriteServer], None] | None = None,
) -> None:
    """Serve on the running event loop until SIGTERM or SIGINT, then drain and stop.

    Args: ``settings``, ``port``, ``metrics_port``: see :func:`serve`; ``reuse_port``,
    ``extra_handlers``: see :class:`RewriteServer`; ``on_ready``: called once the server
    answers (after warm-up and bind), with the server (its ``port``, ``metrics_port``).
    """
    server = RewriteServer(
        settings,
        port=settings.service.port if port is None else port,
        metrics_port=metrics_port,
        extra_handlers=extra_handlers,
        reuse_port=reuse_port,
    )
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s; draining", sig.name)
        stop_requested.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.astart()
        if on_ready is not None:
            on_ready(server)
        await stop_requested.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.astop()


def serve(settings: Settings, port: int | None = None, metrics_port: int | None = None) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully (blocking).

    Call from the main thread (signal handlers). With ``service.processes`` = 1 it runs its
    own event loop in this process; with more it supervises that many service processes on
    one port (:func:`rewrite.processes.serve_processes`).

    Args:
        settings: loaded settings; binds ``service.host``.
        port: TCP port; default ``service.port`` (0 = ephemeral, logged).
        metrics_port: serve Prometheus ``/metrics`` on ``127.0.0.1:metrics_port`` when given
            (with several processes the supervisor serves it, every process's counters summed).

    Raises:
        RuntimeError: the port could not be bound, or (several processes) one of them failed
            to start or exited while serving.
    """
    if settings.service.processes > 1:
        from rewrite.processes import serve_processes

        serve_processes(settings, port=port, metrics_port=metrics_port)
        return
    asyncio.run(serve_async(settings, port=port, metrics_port=metrics_port))
