"""The implicit-feedback defect rule — one rule, used by the nightly job's absorbing states
and (later) by A/B defect labelling.

A turn is a **defect** when any of these holds:

- ``barge_in``: the user interrupted the system's response;
- ``negative_feedback``: explicit ``feedback == -1``;
- ``failure_response``: the system's response says it did not understand (regexes in
  ``defects.failure_response_patterns``);
- ``rephrased``: a later turn of the session rephrases it (the rephrase detector);
- ``abandoned``: it is the last turn of its session and the response was a failure — the
  user gave up (reported separately from ``failure_response``).

Otherwise the turn is a success. Source of the signals: Ponnusamy et al., "Feedback-Based
Self-Learning in Large-Scale Conversational AI Agents", AAAI 2020.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rewrite.config import DefectSettings

if TYPE_CHECKING:
    from offline.rephrase import RephraseLink
    from offline.sessionize import Session, Turn


@dataclass(frozen=True)
class DefectLabel:
    """Defect decision for one turn with the signals that fired."""

    defect: bool
    reasons: tuple[str, ...]


class DefectRule:
    """Applies the defect rule. Args: ``settings`` — regexes and gaps from config."""

    def __init__(self, settings: DefectSettings) -> None:
        self._failure = [re.compile(p, re.IGNORECASE) for p in settings.failure_response_patterns]

    def is_failure_response(self, response: str) -> bool:
        """True when the system response says the request was not understood."""
        return bool(response) and any(p.search(response) for p in self._failure)

    def failure_signal(self, response: str, barge_in: bool, feedback: int) -> bool:
        """Signals visible on the turn itself (no look-ahead): barge-in, -1, failure text."""
        return barge_in or feedback < 0 or self.is_failure_response(response)

    def label(
        self,
        response: str,
        barge_in: bool,
        feedback: int,
        rephrased: bool,
        last_in_session: bool,
    ) -> DefectLabel:
        """Label one turn.

        Args:
            response: system response text ('' if unknown).
            barge_in: the user interrupted the response.
            feedback: explicit feedback (-1, 0, +1).
            rephrased: a later turn rephrases this one.
            last_in_session: no later turn in the session.
        """
        reasons: list[str] = []
        if barge_in:
            reasons.append("barge_in")
        if feedback < 0:
            reasons.append("negative_feedback")
        failed = self.is_failure_response(response)
        if failed:
            reasons.append("failure_response")
        if rephrased:
            reasons.append("rephrased")
        if failed and last_in_session:
            reasons.append("abandoned")
        return DefectLabel(bool(reasons), tuple(reasons))


def label_turns(
    turns: Sequence[Turn],
    sessions: Sequence[Session],
    links: Sequence[RephraseLink],
    rule: DefectRule,
) -> list[DefectLabel]:
    """Label every turn with the defect rule — the one place the job (absorbing states, catalog
    success) and A/B defect labelling get their labels from.

    Args:
        turns: the job's turns (``turns[i].idx == i``).
        sessions: their sessions (for ``last_in_session``).
        links: rephrase links from the detector (``earlier`` is rephrased by ``later``).
        rule: the configured :class:`DefectRule`.

    Returns:
        ``len(turns)`` labels, in turn order.
    """
    rephrased = {lk.earlier for lk in links}
    last_in_session = {s.turns[-1] for s in sessions if s.turns}
    return [
        rule.label(t.response, t.barge_in, t.feedback, t.idx in rephrased, t.idx in last_in_session)
        for t in turns
    ]
