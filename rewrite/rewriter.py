"""The plain-Python :class:`Rewriter`: validate → run the configured stages → result.

No gRPC here; :mod:`rewrite.server` is a thin adapter over it. Never raises on a Redis outage
(pass-through instead); raises :class:`~rewrite.types.InvalidRequestError` for requests that
break the API contract.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import rewrite.online  # noqa: F401  (registers the online stages)
from rewrite import metrics
from rewrite.config import Settings, load_settings
from rewrite.experiment import ArmAssigner
from rewrite.normalize import normalize_device_type
from rewrite.pipeline import PairLookup, Resources, RewriteState, Stage, build_pipeline
from rewrite.redis_server import resolve_redis_url
from rewrite.store import PairStore
from rewrite.types import InvalidRequestError, RewriteRequest, RewriteResult

log = logging.getLogger(__name__)


#: C0 control characters other than tab, newline and carriage return, and DEL.
_BAD_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _has_bad_control_chars(text: str) -> bool:
    """Whether ``text`` holds a C0 control character other than tab, newline or carriage
    return, or DEL (one ``re`` scan: 0.6 us for a 40-character command against 5.5 us for a
    Python loop over its characters, run on the event loop for every request)."""
    return _BAD_CONTROL_CHARS.search(text) is not None


def _run_stage(stage: Stage, states: list[RewriteState]) -> None:
    """One stage over a batch (``run_batch`` when the stage has it and there are several
    requests); requests the stage raises on get ``error`` and ``done`` (see
    :meth:`Rewriter.complete_batch`)."""
    run_batch = getattr(stage, "run_batch", None)
    if run_batch is not None and len(states) > 1:
        try:
            run_batch(states)
            return
        except Exception:
            log.exception(
                "stage %s failed on a batch of %d requests; running them one by one",
                stage.name,
                len(states),
            )
    for state in states:
        try:
            stage.run(state)
        except Exception as err:
            state.error, state.done = err, True


class Rewriter:
    """Query rewriter: normalize → precomputed pair → (miss) encode → global + personal
    retrieval → rerank → trigger → rewrite or pass-through (stages from ``service.pipeline``).

    Args:
        settings: loaded :class:`~rewrite.config.Settings`.
        pair_store: store to use; default one built from ``settings.redis``.

    Call :meth:`warm_up` once before :meth:`rewrite`.
    """

    def __init__(self, settings: Settings, pair_store: PairLookup | None = None) -> None:
        self.settings = settings
        if pair_store is None:
            url = resolve_redis_url(settings.redis.url, settings.redis.data_dir)
            pair_store = PairStore(
                url,
                socket_timeout_s=settings.redis.socket_timeout_s,
                connect_timeout_s=settings.redis.connect_timeout_s,
                version_cache_s=settings.service.version_cache_s,
                pair_cache_size=settings.service.pair_cache_size,
            )
        self.resources = Resources(settings=settings, pair_store=pair_store)
        self.stages: list[Stage] = build_pipeline(settings.service.pipeline, self.resources)
        self.arms = ArmAssigner(settings.experiment)
        self._offload_from = next(
            (i for i, st in enumerate(self.stages) if getattr(st, "offload", False)),
            len(self.stages),
        )
        self._warm = False

    @classmethod
    def from_config(cls, config: str | None = None) -> Rewriter:
        """Build from a YAML config path (default: ``configs/default.yaml``)."""
        return cls(load_settings(config))

    def warm_up(self) -> None:
        """Warm every stage up (idempotent)."""
        if not self._warm:
            for stage in self.stages:
                stage.warm_up()
            self._warm = True

    def validate(self, request: RewriteRequest) -> None:
        """Check the API contract.

        Raises:
            InvalidRequestError: empty/oversized utterance or user id, control characters,
                too many context turns, negative ``seconds_ago``, an over-long request id
                (it is echoed in the response, which must fit ``service.max_message_bytes``),
                a ``device_type`` that is not a short ``[a-z0-9_.-]`` token
                (:func:`rewrite.normalize.normalize_device_type`); (at :meth:`rewrite`) an
                unknown experiment arm.
        """
        svc = self.settings.service
        if not request.utterance or not request.utterance.strip():
            raise InvalidRequestError("utterance is required and must not be blank")
        if len(request.utterance) > svc.max_utterance_chars:
            raise InvalidRequestError(
                f"utterance too long: {len(request.utterance)} > {svc.max_utterance_chars} chars"
            )
        if _has_bad_control_chars(request.utterance):
            raise InvalidRequestError("utterance contains control characters")
        if not request.user_id or not request.user_id.strip():
            raise InvalidRequestError("user_id is required")
        if len(request.user_id) > svc.max_user_id_chars:
            raise InvalidRequestError(f"user_id longer than {svc.max_user_id_chars} chars")
        if len(request.request_id) > svc.max_request_id_chars:
            raise InvalidRequestError(f"request_id longer than {svc.max_request_id_chars} chars")
        try:
            normalize_device_type(request.device_type)
        except ValueError as err:
            raise InvalidRequestError(str(err)) from None
        if len(request.context) > svc.max_context_turns:
            raise InvalidRequestError(
                f"too many context turns: {len(request.context)} > {svc.max_context_turns}"
            )
        for i, turn in enumerate(request.context):
            if turn.seconds_ago < 0 or turn.seconds_ago != turn.seconds_ago:
                raise InvalidRequestError(f"context[{i}].seconds_ago must be >= 0")
            if len(turn.utterance) > svc.max_utterance_chars:
                raise InvalidRequestError(f"context[{i}].utterance too long")

    def rewrite(self, request: RewriteRequest) -> RewriteResult:
        """Rewrite one utterance, or pass it through (:meth:`prepare`, :meth:`complete` and
        :meth:`finish` on the calling thread).

        Returns:
            :class:`RewriteResult`; on pass-through ``rewrite == request.utterance``.
        Raises:
            InvalidRequestError: see :meth:`validate`.
        """
        return self.finish(self.complete(self.prepare(request)))

    @property
    def offload_from(self) -> int:
        """Index of the first stage with ``offload`` set (``len(stages)`` when none)."""
        return self._offload_from

    def prepare(self, request: RewriteRequest) -> RewriteState:
        """Validate, resolve the arm and run the stages before the first offloadable one
        (normalize, precomputed: cheap, on the caller's thread). A precomputed hit, a
        control-arm request or a pass-through finishes here (``state.done``); otherwise
        :meth:`complete` runs the rest, on any thread.

        Raises:
            InvalidRequestError: see :meth:`validate`.
        """
        t0 = time.perf_counter()
        try:
            self.validate(request)
            arm = self.arms.resolve(request.user_id, request.arm)
        except InvalidRequestError:
            metrics.INVALID.inc()
            raise
        if not self._warm:
            self.warm_up()
        state = RewriteState(
            request=request,
            arm=arm.name,
            layers=arm.layers,
            started_s=t0,
            device_type=normalize_device_type(request.device_type),
        )
        if not arm.layers:
            state.reason, state.done = "control_arm", True
            return state
        for stage in self.stages[: self.offload_from]:
            state = stage.run(state)
            if state.done:
                break
        return state

    def complete(self, state: RewriteState) -> RewriteState:
        """Run the stages :meth:`prepare` left for one request (:meth:`complete_batch` of one).

        Raises:
            Exception: whatever a stage raised on this request.
        """
        self.complete_batch([state])
        if state.error is not None:
            raise state.error
        return state

    def complete_batch(self, states: Sequence[RewriteState]) -> list[RewriteState]:
        """Run the stages :meth:`prepare` left (none for a state already ``done``) on a
        micro-batch of requests, stage by stage: a stage with ``run_batch`` serves all of
        them in one call (one FAISS search, one feature pass, one ranker call), any other
        stage runs per request. Thread-safe: several batches may run on several threads.

        Before each stage it checks, per request, whether to go on: when ``state.abandoned``
        is set (the server's call was cancelled: client deadline, disconnect, shutdown) the
        request ends with ``reason="abandoned"``, and when ``time.perf_counter()`` is past
        ``state.deadline_s`` (the call's budget) with ``reason="over_budget"`` — a
        pass-through, counted in ``qrw_pass_through_total``; a running stage is not
        interrupted. So a request nobody waits for stops costing CPU after its current stage.

        Never raises for one request's sake: when a stage raises on a batch, its requests are
        run through that stage one by one, and a request on which it raises again is finished
        with ``state.error`` set (:meth:`complete` re-raises it; the server answers that call
        with an internal-error pass-through) while the others go on.

        Returns:
            ``states`` as a list (the same objects, mutated).
        """
        active = [s for s in states if not s.done]
        for stage in self.stages[self.offload_from :]:
            if not active:
                break
            now = time.perf_counter()
            ready: list[RewriteState] = []
            for state in active:
                if state.abandoned:
                    state.reason, state.done = "abandoned", True
                elif now > state.deadline_s:
                    state.reason, state.done = "over_budget", True
                else:
                    ready.append(state)
            if ready:
                _run_stage(stage, ready)
            active = [s for s in ready if not s.done]
        return list(states)

    def finish(self, state: RewriteState) -> RewriteResult:
        """The :class:`RewriteResult` of a completed request; counts it in the metrics
        (latency from :meth:`prepare` on)."""
        request = state.request
        rewritten = state.rewrite is not None
        if not rewritten and not state.reason:
            state.reason = "below_threshold"
        latency_ms = (time.perf_counter() - state.started_s) * 1000.0
        metrics.LATENCY.observe(latency_ms / 1000.0)
        metrics.REQUESTS.labels(state.source, state.arm).inc()
        if not rewritten:
            metrics.PASS_THROUGH.labels(state.reason).inc()
        return RewriteResult(
            rewrite=state.rewrite if state.rewrite is not None else request.utterance,
            rewritten=rewritten,
            source=state.source if rewritten else "none",
            confidence=state.confidence if rewritten else 0.0,
            model_version=state.model_version,
            normalized=state.normalized,
            arm=state.arm,
            reason="" if rewritten else state.reason,
            candidates=tuple(state.candidates) if request.explain else (),
            latency_ms=latency_ms,
            request_id=request.request_id,
        )

    def close(self) -> None:
        """Release connections."""
        if self.resources.pair_store is not None:
            self.resources.pair_store.close()
