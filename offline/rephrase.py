"""Rephrase detection: which later turn of a session rephrases which earlier one.

The stage is an interface (:class:`RephraseDetector`) so the contextual BERT span model
(a later issue) can replace the transparent baseline here by a name in YAML
(``rephrase.detector``).

Baseline (:class:`HeuristicBaselineDetector`): within a session, a turn rephrases one of
the ``lookback_turns`` previous turns when it follows within ``max_gap_s`` seconds and their
similarity — a mix of lexical similarity (rapidfuzz ``token_sort_ratio``) and phonetic
similarity (``ratio`` over per-word Metaphone codes from jellyfish) — clears
``min_similarity``, or ``min_similarity_after_failure`` when the earlier turn already shows a
failure signal (barge-in, failure response, negative feedback). Each earlier turn is
rephrased at most once, so rephrases form simple chains.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jellyfish
from rapidfuzz import fuzz

from offline.defects import DefectRule
from offline.sessionize import Session, Turn
from rewrite.config import DefectSettings, RephraseSettings


@dataclass(frozen=True)
class RephraseLink:
    """``later`` (turn idx) rephrases ``earlier`` (turn idx) with detector score in [0, 1]."""

    earlier: int
    later: int
    score: float


@dataclass
class RephraseResult:
    """Links found plus how many candidate pairs were scored."""

    links: list[RephraseLink] = field(default_factory=list)
    candidates_scored: int = 0


class RephraseDetector(Protocol):
    """Finds rephrase links inside sessions."""

    name: str

    def warm_up(self) -> None:
        """Load models (no-op for the baseline)."""

    def detect(self, turns: Sequence[Turn], sessions: Sequence[Session]) -> RephraseResult:
        """Return links between turns of the same session (earlier → later)."""


@functools.lru_cache(maxsize=200_000)
def phonetic_key(normalized: str) -> str:
    """Space-joined Metaphone codes of the words of a normalized utterance (jellyfish)."""
    return " ".join(jellyfish.metaphone(w) or w for w in normalized.split())


def similarity(a: str, b: str, phonetic_weight: float = 0.5) -> float:
    """Lexical + phonetic similarity of two normalized utterances, in [0, 1].

    ``(1 - w) * token_sort_ratio(a, b) + w * ratio(metaphone(a), metaphone(b))``, both
    rapidfuzz scores divided by 100.
    """
    lexical = fuzz.token_sort_ratio(a, b) / 100.0
    if phonetic_weight <= 0:
        return lexical
    phon = fuzz.ratio(phonetic_key(a), phonetic_key(b)) / 100.0
    return (1.0 - phonetic_weight) * lexical + phonetic_weight * phon


class HeuristicBaselineDetector:
    """Time gap + lexical/phonetic similarity + failure signals. A named baseline.

    Args:
        settings: thresholds from ``rephrase`` in config.
        defects: the failure-response regexes (shared defect rule).
    """

    name = "heuristic_baseline"

    def __init__(self, settings: RephraseSettings, defects: DefectSettings) -> None:
        self.settings = settings
        self.rule = DefectRule(defects)

    def warm_up(self) -> None:
        return None

    def detect(self, turns: Sequence[Turn], sessions: Sequence[Session]) -> RephraseResult:
        s = self.settings
        res = RephraseResult()
        for session in sessions:
            ids = session.turns
            used: set[int] = set()
            for j in range(1, len(ids)):
                later = turns[ids[j]]
                best: tuple[float, int] | None = None
                for i in range(max(0, j - s.lookback_turns), j):
                    earlier = turns[ids[i]]
                    if earlier.idx in used or later.ts - earlier.ts > s.max_gap_s:
                        continue
                    res.candidates_scored += 1
                    sim = similarity(earlier.normalized, later.normalized, s.phonetic_weight)
                    failed = self.rule.failure_signal(
                        earlier.response, earlier.barge_in, earlier.feedback
                    )
                    bar = s.min_similarity_after_failure if failed else s.min_similarity
                    if sim >= bar and (best is None or sim > best[0]):
                        best = (sim, earlier.idx)
                if best is not None:
                    used.add(best[1])
                    res.links.append(RephraseLink(best[1], later.idx, round(best[0], 6)))
        return res


DetectorFactory = Callable[[RephraseSettings, DefectSettings], RephraseDetector]
DETECTORS: dict[str, DetectorFactory] = {"heuristic_baseline": HeuristicBaselineDetector}


def build_detector(settings: RephraseSettings, defects: DefectSettings) -> RephraseDetector:
    """The detector named by ``settings.detector``.

    Raises:
        ValueError: unknown detector name (the message lists the known ones).
    """
    try:
        factory = DETECTORS[settings.detector]
    except KeyError:
        raise ValueError(
            f"unknown rephrase detector {settings.detector!r}; known: {sorted(DETECTORS)}"
        ) from None
    return factory(settings, defects)
