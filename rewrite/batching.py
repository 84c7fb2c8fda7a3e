"""Continuous micro-batching of the online stages for the asyncio server.

Requests that need the online stages (encode → trigger) queue in an :class:`OnlineBatcher`;
whenever one of its ``workers`` threads is free it takes everything queued (at most
``max_batch`` requests) and runs :meth:`rewrite.rewriter.Rewriter.complete_batch` on it, so
the requests that arrived while the workers were busy share one FAISS search, one feature
pass and one ranker call (a transformer query tower still encodes one text per call, a
static one the batch's uncached texts in one call, see
:meth:`rewrite.encoder.QueryEncoder.encode_cached`). There is no timer: a request that finds a free
worker starts at once as a batch of one, so at low load nothing waits for company (the
dynamic batching of TensorFlow Serving and Triton's dynamic batcher, without their max-delay
window). Under load, batch sizes grow with the queue by themselves.

**Inline when idle** (``inline_max_s``, ``service.online_inline_max_ms``): a request that is
the service's only open call, finding no batch running or queued, runs its online stages
right on the event loop instead of handing them to a worker thread and awaiting the result.
On the 2-vCPU benchmark VM a call whose handler suspends for its work pays more gRPC/asyncio
overhead than one doing the same work without suspending (``bench/bench_grpc_floor.py``, 2 ms
of work: busy on the loop 0.86 ms beyond it, echo 0.83, a worker thread 1.11, a sleep on the
loop 1.01), and the hand-over itself costs the loop and the worker a few wake-ups.
While a request runs inline the loop is blocked and calls that arrive meanwhile wait inside
gRPC; the next to start usually finds the service idle again and also runs inline, so at
concurrency 2 calls are served one after the other (measured faster than the hand-over
there), and once two calls are open at the same moment or a batch runs, calls go to the
workers and batch as before. Only while a lone request's online stages are fast: when their
moving average (batches of one, inline or on a worker) exceeds ``inline_max_s``, every
request goes to the workers, so a slow query tower or store stalls the loop once, not on
every call. A request run inline cannot be marked abandoned when its call is cancelled (the
loop is busy running it); its budget still ends it between stages. Measured in interleaved
``bench_online.py`` runs (README "Benchmarks" (b), four pairs): online p50 at concurrency 1
lower by 0.3-1.0 ms, QPS at concurrency 2 up 14-42 %, the same within the noise at 64.

Library: asyncio and ``concurrent.futures`` (standard library).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Histogram

from rewrite.pipeline import RewriteState

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "qrw_online_batch_size",
    "Requests per micro-batch of the online stages (a request run inline counts as one)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
INLINE = Counter(
    "qrw_online_inline_total",
    "Requests whose online stages ran inline on the event loop (the service was idle)",
)

#: weight of the newest lone request in :attr:`OnlineBatcher.lone_s`
INLINE_EWMA_WEIGHT = 0.2

CompleteBatch = Callable[[Sequence[RewriteState]], list[RewriteState]]


class OnlineBatcher:
    """Queue of requests waiting for the online stages, served in micro-batches.

    Args:
        complete_batch: runs the online stages on a batch
            (:meth:`rewrite.rewriter.Rewriter.complete_batch`); called on ``pool``.
        pool: the worker threads (``service.online_threads``); the caller shuts it down.
        workers: batches in flight at once (the pool's size).
        max_batch: requests per batch at most (``service.online_max_batch``).
        inline_max_s: run a request on the event loop when the caller says it is alone, no
            batch is running or queued and a lone request's online stages have been taking at
            most this many seconds (exponential moving average, weight
            :data:`INLINE_EWMA_WEIGHT`); see the module docstring
            (``service.online_inline_max_ms``). 0 = always hand over to ``pool``.

    Raises:
        ValueError: ``workers`` or ``max_batch`` below 1, or ``inline_max_s`` negative.

    Use from the event loop only (:meth:`complete` is a coroutine; the bookkeeping is not
    thread-safe and need not be: every callback runs on the loop).
    """

    def __init__(
        self,
        complete_batch: CompleteBatch,
        pool: concurrent.futures.Executor,
        workers: int,
        max_batch: int,
        inline_max_s: float = 0.0,
    ) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError(f"workers and max_batch must be >= 1 (got {workers}, {max_batch})")
        if inline_max_s < 0:
            raise ValueError(f"inline_max_s must be >= 0 (got {inline_max_s})")
        self._complete_batch = complete_batch
        self._pool = pool
        self.workers = workers
        self.max_batch = max_batch
        self._queue: collections.deque[tuple[RewriteState, asyncio.Future[RewriteState]]] = (
            collections.deque()
        )
        self._running = 0
        self.inline_max_s = inline_max_s
        #: moving average of a lone request's online time, seconds (0 until one ran)
        self.lone_s = 0.0

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    async def complete(self, state: RewriteState, alone: bool = False) -> RewriteState:
        """Run the online stages on ``state`` within some micro-batch; returns it.

        Args:
            state: a prepared request (:meth:`rewrite.rewriter.Rewriter.prepare`).
            alone: the caller's request is the service's only open call. With
                ``inline_max_s`` > 0, no batch running or queued and :attr:`lone_s` within
                ``inline_max_s``, the stages then run inline on the event loop (a batch of
                one, counted in ``qrw_online_inline_total``) and the coroutine returns
                without suspending.

        Raises:
            Exception: what a stage raised on this request (``state.error``).
            RuntimeError: the worker pool was shut down (the server is stopping).
            asyncio.CancelledError: the call was cancelled; ``state.abandoned`` is then set,
                so its batch skips it from the next stage on (a queued one never runs).
        """
        if (
            alone
            and self._running == 0
            and not self._queue
            and self.inline_max_s > 0.0
            and self.lone_s <= self.inline_max_s
        ):
            return self._complete_inline(state)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RewriteState] = loop.create_future()
        self._queue.append((state, future))
        self._dispatch(loop)
        try:
            return await future
        except asyncio.CancelledError:
            state.abandoned = True
            raise

    def _observe_lone(self, seconds: float) -> None:
        self.lone_s += INLINE_EWMA_WEIGHT * (seconds - self.lone_s)

    def _complete_inline(self, state: RewriteState) -> RewriteState:
        INLINE.inc()
        BATCH_SIZE.observe(1)
        started = time.perf_counter()
        try:
            self._complete_batch([state])  # never raises for the request's sake: state.error
        finally:
            self._observe_lone(time.perf_counter() - started)
        if state.error is not None:
            raise state.error
        return state

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self.workers and self._queue:
            batch: list[tuple[RewriteState, asyncio.Future[RewriteState]]] = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item[1].done():  # a cancelled call is dropped before it costs anything
                    batch.append(item)
            if not batch:
                continue
            started = time.perf_counter()
            try:
                done = loop.run_in_executor(
                    self._pool, self._complete_batch, [state for state, _ in batch]
                )
            except RuntimeError as err:  # the pool was shut down (server stopping)
                for _state, future in batch:
                    future.set_exception(err)
                continue
            self._running += 1
            BATCH_SIZE.observe(len(batch))
            done.add_done_callback(functools.partial(self._finished, loop, batch, started))

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[RewriteState, asyncio.Future[RewriteState]]],
        started: float,
        done: asyncio.Future[list[RewriteState]],
    ) -> None:
        self._running -= 1
        if len(batch) == 1:  # a lone request's time, hand-over included
            self._observe_lone(time.perf_counter() - started)
        err = asyncio.CancelledError() if done.cancelled() else done.exception()
        if err is not None and not isinstance(err, asyncio.CancelledError):
            log.error("online micro-batch of %d requests failed: %r", len(batch), err)
        for state, future in batch:
            if future.done():
                continue
            if isinstance(err, asyncio.CancelledError):  # the pool was shut down
                future.cancel()
            elif err is not None:
                future.set_exception(err)
            elif state.error is not None:
                future.set_exception(state.error)
            else:
                future.set_result(state)
        self._dispatch(loop)
