"""Rephrase chains: follow a session's rephrase links from each chain start to its end.

Shared by both engines (:mod:`offline.engine`): the local engine calls it on the whole run,
the Spark engine on each user group. Chains are emitted in the run's chain order — sessions
ordered by (user, start time), chains by their start turn — which :func:`offline.markov.
solve_component` relies on for bit-identical results.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from offline.defects import DefectLabel
from offline.markov import RephraseChain
from offline.rephrase import RephraseLink
from offline.sessionize import Session, Turn


def chain_walks(
    turns: Sequence[Turn], sessions: Sequence[Session], links: Sequence[RephraseLink]
) -> list[tuple[Session, int, list[int]]]:
    """The turn-index sequence of every chain, with its session and start position.

    Chains hold the user's own turns only: a turn the service rewrote (:attr:`Turn.rewritten`)
    is cut out — no state, no absorbing outcome — because its success or failure is the
    rewrite's (:mod:`offline.self_learning`). The links into and out of it are dropped, so the
    turns before it end their chain with their own label and the turn after it starts a new
    chain.

    Args:
        turns: the turns (``turns[i].idx == i``).
        sessions: their sessions, in (user, start time) order.
        links: rephrase links (turn indices into ``turns``).

    Returns:
        ``(session, position of the start turn in the session, turn indices)`` per chain, in
        the run's chain order; singletons included.
    """
    own = [not t.rewritten for t in turns]
    next_of = {lk.earlier: lk.later for lk in links if own[lk.earlier] and own[lk.later]}
    has_prev = set(next_of.values())
    out: list[tuple[Session, int, list[int]]] = []
    for s in sessions:
        for pos, start in enumerate(s.turns):
            if start in has_prev or not own[start]:
                continue
            seq = [start]
            while seq[-1] in next_of:
                seq.append(next_of[seq[-1]])
            out.append((s, pos, seq))
    return out


def build_chains(
    turns: Sequence[Turn],
    sessions: Sequence[Session],
    links: Sequence[RephraseLink],
    labels: Sequence[DefectLabel],
) -> tuple[list[RephraseChain], Counter[str]]:
    """Follow rephrase links into chains (:func:`chain_walks`); each chain ends in its last
    turn's label under the defect rule (``labels``: :func:`offline.defects.label_turns`, one
    per turn).

    Returns:
        (chains — one per chain start, singletons included; defect-reason counts over all
        turns, rewritten ones included).
    """
    reasons = defect_reason_counts(labels)
    chains = [
        RephraseChain(
            tuple(turns[i].normalized for i in seq), not labels[seq[-1]].defect, s.user_id
        )
        for s, _, seq in chain_walks(turns, sessions, links)
    ]
    return chains, reasons


def defect_reason_counts(labels: Sequence[DefectLabel]) -> Counter[str]:
    """Every reason's count over ``labels`` plus ``defect`` / ``success`` totals."""
    reasons: Counter[str] = Counter()
    for lab in labels:
        reasons.update(lab.reasons)
        reasons["defect" if lab.defect else "success"] += 1
    return reasons
