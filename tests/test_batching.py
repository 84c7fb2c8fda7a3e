"""The online micro-batcher (:class:`rewrite.batching.OnlineBatcher`) on a real thread pool and
event loop, with a recording ``complete_batch`` in place of the Rewriter (the Rewriter's own
batch path is tested end to end in ``test_online.py``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from rewrite.batching import OnlineBatcher
from rewrite.pipeline import RewriteState
from rewrite.types import RewriteRequest


def _state(utterance: str) -> RewriteState:
    return RewriteState(request=RewriteRequest(utterance, user_id="u"))


class Recorder:
    """``complete_batch`` that records each batch's utterances; the first batch waits for
    ``release`` (so later requests queue); utterances in ``fail`` get ``state.error``; a batch
    holding ``"crash"`` raises."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.fail = set(fail)

    def __call__(self, states: Sequence[RewriteState]) -> list[RewriteState]:
        self.batches.append([s.request.utterance for s in states])
        if len(self.batches) == 1:
            assert self.release.wait(5.0)
        if any(s.request.utterance == "crash" for s in states):
            raise OSError("worker crashed")
        for s in states:
            if s.request.utterance in self.fail:
                s.error, s.done = ValueError(s.request.utterance), True
            else:
                s.reason, s.done = "done", True
        return list(states)


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_a_lone_request_runs_at_once_and_queued_ones_share_the_next_batches() -> None:
    rec = Recorder(fail=["d"])

    async def main() -> list[object]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = OnlineBatcher(rec, pool, workers=1, max_batch=2)
            states = {u: _state(u) for u in "abcde"}
            first = asyncio.ensure_future(batcher.complete(states["a"]))
            await _until(lambda: rec.batches == [["a"]])  # started alone, without waiting
            rest = [asyncio.ensure_future(batcher.complete(states[u])) for u in "bcde"]
            await _until(lambda: batcher.queued == 4)
            rest[1].cancel()  # "c" gives up while queued: never run, marked abandoned
            await asyncio.sleep(0)
            assert states["c"].abandoned
            rec.release.set()
            return await asyncio.gather(first, *rest, return_exceptions=True)

    a, b, c, d, e = asyncio.run(main())
    # max_batch 2: b and d together (c dropped before it cost anything), then e
    assert rec.batches == [["a"], ["b", "d"], ["e"]]
    assert isinstance(a, RewriteState) and a.reason == "done"
    assert isinstance(b, RewriteState) and isinstance(e, RewriteState)
    assert isinstance(c, asyncio.CancelledError)
    assert isinstance(d, ValueError)  # only the request the stage failed on sees the error


def test_two_workers_run_two_batches_at_once_and_a_crashed_batch_fails_only_its_calls() -> None:
    rec = Recorder()

    async def main() -> list[object]:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            batcher = OnlineBatcher(rec, pool, workers=2, max_batch=8)
            first = asyncio.ensure_future(batcher.complete(_state("a")))
            await _until(lambda: len(rec.batches) == 1)
            crash = asyncio.ensure_future(batcher.complete(_state("crash")))
            await _until(lambda: len(rec.batches) == 2)  # the second worker took it at once
            late = [asyncio.ensure_future(batcher.complete(_state(u))) for u in "xy"]
            await asyncio.sleep(0.05)
            rec.release.set()
            return await asyncio.gather(first, crash, *late, return_exceptions=True)

    a, crash, x, y = asyncio.run(main())
    assert rec.batches[:2] == [["a"], ["crash"]]
    assert sorted(u for batch in rec.batches[2:] for u in batch) == ["x", "y"]
    assert isinstance(crash, OSError)
    assert all(isinstance(r, RewriteState) and r.reason == "done" for r in (a, x, y))


def test_batcher_refuses_a_size_below_one() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(ValueError):
        OnlineBatcher(Recorder(), pool, workers=1, max_batch=0)


def test_requests_queued_when_the_pool_shuts_down_fail_instead_of_hanging() -> None:
    """A server stopping shuts the worker pool down while a batch runs; what queued behind it
    gets an error when that batch finishes (the next batch cannot be scheduled), not a hang."""
    rec = Recorder()

    async def main() -> list[object]:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        batcher = OnlineBatcher(rec, pool, workers=1, max_batch=4)
        first = asyncio.ensure_future(batcher.complete(_state("a")))
        await _until(lambda: rec.batches == [["a"]])
        queued = asyncio.ensure_future(batcher.complete(_state("b")))
        await _until(lambda: batcher.queued == 1)
        pool.shutdown(wait=False)
        rec.release.set()
        return await asyncio.wait_for(
            asyncio.gather(first, queued, return_exceptions=True), timeout=5.0
        )

    first, queued = asyncio.run(main())
    assert isinstance(first, RewriteState) and first.reason == "done"
    assert isinstance(queued, RuntimeError) and rec.batches == [["a"]]


class ThreadRecorder:
    """``complete_batch`` that records, per batch, its utterances and the thread it ran on."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], int]] = []

    def __call__(self, states: Sequence[RewriteState]) -> list[RewriteState]:
        self.batches.append(([s.request.utterance for s in states], threading.get_ident()))
        for s in states:
            if s.request.utterance == "bad":
                s.error, s.done = ValueError("bad"), True
            else:
                s.reason, s.done = "done", True
        return list(states)


def test_an_idle_batcher_runs_a_lone_call_inline_and_hands_over_otherwise() -> None:
    """``inline_max_s``: the only open call, with nothing running or queued, runs on the
    event loop's thread without suspending; a call that is not alone, or that finds a batch
    running, goes to a worker; with the option off (0) every call goes to a worker."""
    from rewrite.batching import INLINE

    rec = ThreadRecorder()
    slow = Recorder()  # its first batch blocks a worker until released

    async def main() -> dict[str, object]:
        loop_thread = threading.get_ident()
        out: dict[str, object] = {"loop": loop_thread}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = OnlineBatcher(rec, pool, workers=1, max_batch=4, inline_max_s=1.0)
            inline0 = INLINE._value.get()
            coro = batcher.complete(_state("a"), alone=True)
            with pytest.raises(StopIteration):  # finished at its first step: never suspended
                coro.send(None)
            out["inline"] = INLINE._value.get() - inline0
            await batcher.complete(_state("b"), alone=False)  # another call is open
            with pytest.raises(ValueError, match="bad"):  # a failed stage raises inline too
                await batcher.complete(_state("bad"), alone=True)
            off = OnlineBatcher(rec, pool, workers=1, max_batch=4)
            await off.complete(_state("c"), alone=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = OnlineBatcher(slow, pool, workers=1, max_batch=4, inline_max_s=1.0)
            first = asyncio.ensure_future(busy.complete(_state("x"), alone=False))
            await _until(lambda: slow.batches == [["x"]])
            # alone, but a batch is running: it queues behind it rather than blocking the loop
            queued = asyncio.ensure_future(busy.complete(_state("y"), alone=True))
            await _until(lambda: busy.queued == 1)
            slow.release.set()
            await asyncio.gather(first, queued)
        return out

    out = asyncio.run(main())
    threads = {utterances[0]: thread for utterances, thread in rec.batches}
    assert threads["a"] == out["loop"] and threads["bad"] == out["loop"]
    assert threads["b"] != out["loop"] and threads["c"] != out["loop"]
    assert out["inline"] == 1
    assert slow.batches == [["x"], ["y"]]


def test_inline_stops_while_lone_requests_are_slow_and_resumes_when_they_are_fast() -> None:
    """A lone request whose online stages took longer than ``inline_max_s`` (moving average)
    sends the next ones to the workers, so a slow tower or store does not block the event
    loop; once lone requests are fast again (measured on the workers) inline resumes."""
    seen: list[tuple[str, int]] = []

    def complete(states: Sequence[RewriteState]) -> list[RewriteState]:
        for st in states:
            seen.append((st.request.utterance, threading.get_ident()))
            if st.request.utterance == "slow":
                time.sleep(0.05)
            st.reason, st.done = "done", True
        return list(states)

    async def main() -> tuple[int, int]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = OnlineBatcher(complete, pool, workers=1, max_batch=4, inline_max_s=0.005)
            await batcher.complete(_state("slow"), alone=True)  # inline: nothing measured yet
            assert batcher.lone_s > 0.005
            await batcher.complete(_state("next"), alone=True)  # too slow lately: a worker
            fast = 0
            while seen[-1][1] != threading.get_ident():
                fast += 1
                assert fast < 100, "inline never resumed"
                await batcher.complete(_state("fast"), alone=True)
            return threading.get_ident(), fast

    loop_thread, fast = asyncio.run(main())
    assert seen[0] == ("slow", loop_thread)
    assert seen[1][0] == "next" and seen[1][1] != loop_thread
    assert fast >= 2  # the average came down over several fast requests on the workers
