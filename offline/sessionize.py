"""Sessionization: split each user's turns into sessions by inactivity gap.

A session is a maximal run of one user's turns, ordered by ``(timestamp, turn_id)``, in
which consecutive turns are at most ``gap_s`` seconds apart (a gap of exactly ``gap_s``
stays in the session). Ties in time keep a deterministic order by ``turn_id``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from offline.schema import TurnLog
from rewrite.normalize import normalize_utterance


@dataclass(frozen=True, slots=True)
class Turn:
    """A validated turn in the job's working form.

    Attributes:
        idx: position in the job's turn list (stable id inside one run).
        ts: UTC timestamp, seconds since the epoch.
        normalized: :func:`normalize_utterance` of what the user said (the logged
            ``utterance``, ASR 1-best) — also for a turn the service rewrote: the job learns
            from users' words, and a service rewrite is feedback on the service.
        rewrite_source: the logged ``rewrite_source`` (``""`` when not logged).
        domain, intent: the NLU result when logged, else ``""``.
        device_type: normalized device type when logged, else ``""``.
        rewrite: :func:`normalize_utterance` of the logged ``rewrite`` when the service
            changed the request (NLU received this instead of ``normalized``), else ``""``
            (no rewrite logged, or one equal to ``normalized`` after normalization). Such a
            turn's outcome is evidence about the pair ``(normalized, rewrite)`` only
            (:mod:`offline.self_learning`).
    """

    idx: int
    turn_id: str
    user_id: str
    ts: float
    utterance: str
    normalized: str
    response: str
    barge_in: bool
    feedback: int
    rewrite_source: str
    domain: str = ""
    intent: str = ""
    rewrite: str = ""
    device_type: str = ""

    @property
    def rewritten(self) -> bool:
        """The service changed this turn (NLU acted on :attr:`rewrite`, not on what was said)."""
        return bool(self.rewrite)


@dataclass(frozen=True)
class Session:
    """One user's session: turn indices in time order."""

    session_id: str
    user_id: str
    turns: tuple[int, ...]


def to_turns(logs: Sequence[TurnLog]) -> list[Turn]:
    """Convert validated logs to :class:`Turn` (index = position in ``logs``).

    Equal strings (utterances, responses, user ids, NLU labels) share one object and each
    distinct utterance is normalized once: a day of logs repeats its head utterances and
    system responses across many users, and the job holds every turn until it ends.

    ``normalized`` is what the user said; a logged ``rewrite`` goes to ``rewrite`` (see
    :class:`Turn`), so no later stage mistakes the service's words for the user's.
    """
    out = []
    shared: dict[str, str] = {}  # one str object per distinct value (logs repeat heavily)
    normalized: dict[str, str] = {}  # utterance -> normalize_utterance(utterance), once each

    def one(text: str) -> str:
        return shared.setdefault(text, text)

    def norm(text: str) -> str:
        got = normalized.get(text)
        if got is None:
            got = normalized[text] = one(normalize_utterance(text))
        return got

    for i, t in enumerate(logs):
        said = norm(t.utterance)
        rewrite = norm(t.rewrite) if t.rewrite else ""
        out.append(
            Turn(
                idx=i,
                turn_id=t.turn_id,
                user_id=one(t.user_id),
                ts=t.timestamp.timestamp(),
                utterance=one(t.utterance),
                normalized=said,
                response=one(t.response or ""),
                barge_in=bool(t.barge_in),
                feedback=int(t.feedback or 0),
                rewrite_source=one(t.rewrite_source or ""),
                domain=one(t.domain or ""),
                intent=one(t.intent or ""),
                rewrite=rewrite if rewrite != said else "",
                device_type=t.device_type or "",
            )
        )
    return out


def sessionize(turns: Sequence[Turn], gap_s: float) -> list[Session]:
    """Group turns into sessions per user by time gap.

    Args:
        turns: turns in any order.
        gap_s: a gap strictly greater than this (seconds) starts a new session.

    Returns:
        Sessions ordered by (user_id, start time); ids ``{user_id}#{n}``.

    Raises:
        ValueError: ``gap_s`` is negative.
    """
    if gap_s < 0:
        raise ValueError("gap_s must be >= 0")
    by_user: dict[str, list[Turn]] = defaultdict(list)
    for t in turns:
        by_user[t.user_id].append(t)
    sessions: list[Session] = []
    for user in sorted(by_user):
        ordered = sorted(by_user[user], key=lambda t: (t.ts, t.turn_id))
        current: list[int] = []
        last_ts = None
        n = 0
        for t in ordered:
            if last_ts is not None and t.ts - last_ts > gap_s:
                sessions.append(Session(f"{user}#{n}", user, tuple(current)))
                n += 1
                current = []
            current.append(t.idx)
            last_ts = t.ts
        if current:
            sessions.append(Session(f"{user}#{n}", user, tuple(current)))
    return sessions
