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


@dataclass(frozen=True)
class Turn:
    """A validated turn in the job's working form.

    Attributes:
        idx: position in the job's turn list (stable id inside one run).
        ts: UTC timestamp, seconds since the epoch.
        normalized: :func:`normalize_utterance` of the text NLU received (the logged
            ``rewrite`` when the service rewrote the turn, else ``utterance``).
        domain, intent: the NLU result when logged, else ``""``.
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


@dataclass(frozen=True)
class Session:
    """One user's session: turn indices in time order."""

    session_id: str
    user_id: str
    turns: tuple[int, ...]


def to_turns(logs: Sequence[TurnLog]) -> list[Turn]:
    """Convert validated logs to :class:`Turn` (index = position in ``logs``)."""
    out = []
    for i, t in enumerate(logs):
        received = t.rewrite if t.rewrite else t.utterance
        out.append(
            Turn(
                idx=i,
                turn_id=t.turn_id,
                user_id=t.user_id,
                ts=t.timestamp.timestamp(),
                utterance=t.utterance,
                normalized=normalize_utterance(received),
                response=t.response or "",
                barge_in=bool(t.barge_in),
                feedback=int(t.feedback or 0),
                rewrite_source=t.rewrite_source or "",
                domain=t.domain or "",
                intent=t.intent or "",
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
