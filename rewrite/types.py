"""Plain-Python request/response types of the :class:`rewrite.rewriter.Rewriter` (no gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request breaks the API contract (maps to gRPC ``INVALID_ARGUMENT``)."""


@dataclass(frozen=True)
class ContextTurn:
    """An earlier turn of the same session.

    Attributes:
        utterance: what the user said then (ASR 1-best).
        response: the system response to it, if known.
        seconds_ago: seconds between that turn and now (>= 0).
        barge_in: whether the user interrupted that response.
    """

    utterance: str
    response: str = ""
    seconds_ago: float = 0.0
    barge_in: bool = False


@dataclass(frozen=True)
class RewriteRequest:
    """One rewrite request. ``utterance`` and ``user_id`` are required.

    ``device_type`` (e.g. ``"speaker"``, ``"display"``, ``"tv"``; normalized by
    :func:`rewrite.normalize.normalize_device_type`) reaches the ranker: the catalog records
    on which device types each rewrite target was said and succeeded.
    """

    utterance: str
    user_id: str
    context: tuple[ContextTurn, ...] = ()
    device_id: str = ""
    locale: str = ""
    arm: str = ""
    explain: bool = False
    request_id: str = ""
    device_type: str = ""


@dataclass(frozen=True)
class Candidate:
    """A rewrite candidate considered by the pipeline (returned when ``explain`` is set)."""

    text: str
    source: str
    score: float
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RewriteResult:
    """What the service answers.

    Attributes:
        rewrite: text to hand to NLU (the input utterance itself on pass-through).
        rewritten: whether ``rewrite`` differs from the input.
        source: ``"precomputed"``, ``"global"``, ``"personal"`` or ``"none"``.
        confidence: rewrite confidence in [0, 1]; 0.0 on pass-through.
        model_version: the published version that answered (``""`` when none is active).
        normalized: normalized input utterance.
        arm: experiment arm applied.
        reason: why the service passed through (``"no_pair"``, ``"store_unavailable"``, ...).
        candidates: considered candidates (only when ``explain``).
        latency_ms: time spent inside the Rewriter, milliseconds.
    """

    rewrite: str
    rewritten: bool
    source: str
    confidence: float
    model_version: str
    normalized: str
    arm: str = ""
    reason: str = ""
    candidates: tuple[Candidate, ...] = ()
    latency_ms: float = 0.0
    request_id: str = ""
