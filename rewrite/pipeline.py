"""Pipeline stages of the :class:`~rewrite.rewriter.Rewriter`, assembled by name from YAML.

Each stage follows the haystack-2.x component shape: a light ``__init__``, a heavy
``warm_up()`` (load models, open connections) and a typed ``run(state) -> state``. A stage
may finish the request (``state.done = True``) — e.g. a precomputed hit — and later stages
are then skipped. New stages register with :func:`register_stage` and are listed in
``service.pipeline`` in ``configs/*.yaml``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rewrite import metrics
from rewrite.config import LAYERS, Settings
from rewrite.normalize import normalize_utterance
from rewrite.store import PairHit, StoreUnavailableError
from rewrite.types import Candidate, RewriteRequest

log = logging.getLogger(__name__)


@dataclass
class RewriteState:
    """Mutable per-request state passed through the stages."""

    request: RewriteRequest
    arm: str = ""  # the experiment arm applied (rewrite.experiment)
    layers: frozenset[str] = frozenset(LAYERS)  # the rewrite layers the arm may use
    normalized: str = ""
    device_type: str = ""  # normalize_device_type(request.device_type), "" unknown
    rewrite: str | None = None
    source: str = "none"
    confidence: float = 0.0
    model_version: str = ""
    reason: str = ""
    candidates: list[Candidate] = field(default_factory=list)
    done: bool = False
    started_s: float = 0.0  # time.perf_counter() when the Rewriter took the request
    # cooperative stop between stages (Rewriter.complete): the caller went away (set from the
    # server's event loop while a worker runs the online stages), or the budget ran out
    abandoned: bool = False
    deadline_s: float = math.inf  # time.perf_counter() after which no further stage starts
    # online stages (rewrite/online.py)
    online: Any = None  # the OnlineSnapshot answering this request
    query_vector: np.ndarray | None = None  # (dim,) float32, L2-normalised
    retrieved: list[Any] = field(default_factory=list)  # RetrievedCandidate, best first
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) ranker scores
    decision_score: float = 0.0  # what the trigger compares with the threshold (ranker)
    user_success_count: int = 0  # the user's successful uses of the query itself
    # the user's PersonalHistory, when the catalog gate found it in the cache (its version
    # says which snapshot it belongs to); the personal stage then does not read it again
    personal_history: Any = None
    # a stage raised on this request (Rewriter.complete_batch); complete() re-raises it
    error: BaseException | None = None


class Stage(Protocol):
    """One pipeline step.

    ``offload``: the stage may run on the service's online worker threads
    (``service.online_threads``) instead of the event loop: it spends most of its time in code
    that releases the GIL (ONNX Runtime, FAISS, a Redis socket) and is
    safe to call from several threads at once. The first offloadable stage and every stage
    after it run on a worker thread (see :meth:`rewrite.rewriter.Rewriter.prepare`).

    An offloadable stage may also define ``run_batch(states) -> None``: the same work for a
    micro-batch of requests at once (one FAISS search, one ranker call; see
    :meth:`rewrite.rewriter.Rewriter.complete_batch`), mutating each state as ``run`` would.
    Without it the batch runs ``run`` per request.
    """

    name: str
    offload: bool

    def warm_up(self) -> None:
        """Load heavy resources once before serving."""

    def run(self, state: RewriteState) -> RewriteState:
        """Process one request; set ``state.done`` to stop the pipeline. Return the same
        ``state`` object, mutated (the server flags ``state.abandoned`` on that object)."""


class PairLookup(Protocol):
    """What the precomputed stage needs from a store (:class:`rewrite.store.PairStore`,
    :class:`rewrite.store.StaticPairStore`)."""

    def active_version(self, refresh: bool = False) -> str | None: ...

    def lookup(self, normalized: str) -> PairHit | None: ...

    def close(self) -> None: ...


@dataclass
class Resources:
    """Shared handles the stages may use (built once per Rewriter)."""

    settings: Settings
    pair_store: PairLookup | None = None
    online: Any = None  # rewrite.online.OnlineLayer, created by the first online stage


class NormalizeStage:
    """Fills ``state.normalized`` with :func:`rewrite.normalize.normalize_utterance`."""

    name = "normalize"
    offload = False

    def __init__(self, resources: Resources) -> None:
        del resources

    def warm_up(self) -> None:
        return None

    def run(self, state: RewriteState) -> RewriteState:
        state.normalized = normalize_utterance(state.request.utterance)
        if not state.normalized:
            state.reason, state.done = "empty_after_normalization", True
        return state


class PrecomputedStage:
    """Exact-key lookup of a precomputed (absorbing-Markov-chain) pair in Redis.

    Skipped (only the active version is read) when the request's arm lacks the
    ``precomputed`` layer.

    On a Redis failure it records ``reason="store_unavailable"`` and finishes the request as a
    pass-through (the caller never sees the error).
    """

    name = "precomputed"
    offload = False

    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    def warm_up(self) -> None:
        if self._resources.pair_store is None:
            raise RuntimeError("precomputed stage needs a pair store (redis)")

    def run(self, state: RewriteState) -> RewriteState:
        store = self._resources.pair_store
        assert store is not None, "warm_up() not called"
        if "precomputed" not in state.layers:
            try:
                state.model_version = store.active_version() or ""
            except StoreUnavailableError:
                metrics.STORE_ERRORS.inc()
                state.reason, state.done = "store_unavailable", True
            return state
        try:
            hit = store.lookup(state.normalized)
        except StoreUnavailableError:
            metrics.STORE_ERRORS.inc()
            state.reason, state.done = "store_unavailable", True
            return state
        if hit is None:
            state.reason = "no_pair"
            try:
                state.model_version = store.active_version() or ""
            except StoreUnavailableError:
                state.model_version = ""
            return state
        state.model_version = hit.version
        if state.request.explain:
            state.candidates.append(
                Candidate(
                    hit.rewrite,
                    "precomputed",
                    hit.confidence,
                    {"support": float(hit.support), "n_users": float(hit.n_users)},
                )
            )
        if hit.rewrite != state.normalized:
            state.rewrite, state.source = hit.rewrite, "precomputed"
            state.confidence = hit.confidence
            state.reason, state.done = "", True
        return state


StageFactory = Callable[[Resources], Stage]
_REGISTRY: dict[str, StageFactory] = {}


def register_stage(name: str, factory: StageFactory) -> None:
    """Make a stage available to ``service.pipeline`` under ``name``."""
    _REGISTRY[name] = factory


def available_stages() -> list[str]:
    return sorted(_REGISTRY)


def build_pipeline(names: list[str], resources: Resources) -> list[Stage]:
    """Instantiate the stages named in config, in order.

    Raises:
        ValueError: an unknown stage name (the message lists the known ones).
    """
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {unknown}; known: {available_stages()}")
    return [_REGISTRY[n](resources) for n in names]


register_stage("normalize", NormalizeStage)
register_stage("precomputed", PrecomputedStage)
