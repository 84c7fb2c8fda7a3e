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

Library: asyncio and ``concurrent.futures`` (standard library).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
from collections.abc import Callable, Sequence

from prometheus_client import Histogram

from rewrite.pipeline import RewriteState

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "qrw_online_batch_size",
    "Requests per micro-batch of the online stages",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)

CompleteBatch = Callable[[Sequence[RewriteState]], list[RewriteState]]


class OnlineBatcher:
    """Queue of requests waiting for the online stages, served in micro-batches.

    Args:
        complete_batch: runs the online stages on a batch
            (:meth:`rewrite.rewriter.Rewriter.complete_batch`); called on ``pool``.
        pool: the worker threads (``service.online_threads``); the caller shuts it down.
        workers: batches in flight at once (the pool's size).
        max_batch: requests per batch at most (``service.online_max_batch``).

    Raises:
        ValueError: ``workers`` or ``max_batch`` below 1.

    Use from the event loop only (:meth:`complete` is a coroutine; the bookkeeping is not
    thread-safe and need not be: every callback runs on the loop).
    """

    def __init__(
        self,
        complete_batch: CompleteBatch,
        pool: concurrent.futures.Executor,
        workers: int,
        max_batch: int,
    ) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError(f"workers and max_batch must be >= 1 (got {workers}, {max_batch})")
        self._complete_batch = complete_batch
        self._pool = pool
        self.workers = workers
        self.max_batch = max_batch
        self._queue: collections.deque[tuple[RewriteState, asyncio.Future[RewriteState]]] = (
            collections.deque()
        )
        self._running = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    async def complete(self, state: RewriteState) -> RewriteState:
        """Run the online stages on ``state`` within some micro-batch; returns it.

        Raises:
            Exception: what a stage raised on this request (``state.error``).
            RuntimeError: the worker pool was shut down (the server is stopping).
            asyncio.CancelledError: the call was cancelled; ``state.abandoned`` is then set,
                so its batch skips it from the next stage on (a queued one never runs).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RewriteState] = loop.create_future()
        self._queue.append((state, future))
        self._dispatch(loop)
        try:
            return await future
        except asyncio.CancelledError:
            state.abandoned = True
            raise

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self.workers and self._queue:
            batch: list[tuple[RewriteState, asyncio.Future[RewriteState]]] = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item[1].done():  # a cancelled call is dropped before it costs anything
                    batch.append(item)
            if not batch:
                continue
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
            done.add_done_callback(functools.partial(self._finished, loop, batch))

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[RewriteState, asyncio.Future[RewriteState]]],
        done: asyncio.Future[list[RewriteState]],
    ) -> None:
        self._running -= 1
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
