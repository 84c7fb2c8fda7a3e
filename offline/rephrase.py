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

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rapidfuzz import fuzz

from offline.defects import DefectRule
from offline.sessionize import Session, Turn
from rewrite.config import DefectSettings, RephraseSettings
from rewrite.normalize import phonetic_key

log = logging.getLogger(__name__)


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

    def score_pair(
        self, earlier: str, later: str, response: str, barge_in: bool, feedback: int = 0
    ) -> tuple[float, bool]:
        """The baseline's test of one (earlier, later) pair of normalized utterances.

        Returns:
            ``(similarity in [0, 1], clears the bar)``: the bar is
            ``min_similarity_after_failure`` when the earlier turn shows a failure signal
            (barge-in, failure response, negative feedback), else ``min_similarity``.
        """
        s = self.settings
        sim = similarity(earlier, later, s.phonetic_weight)
        failed = self.rule.failure_signal(response, barge_in, feedback)
        bar = s.min_similarity_after_failure if failed else s.min_similarity
        return sim, sim >= bar

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
                    sim, ok = self.score_pair(
                        earlier.normalized,
                        later.normalized,
                        earlier.response,
                        earlier.barge_in,
                        earlier.feedback,
                    )
                    if ok and (best is None or sim > best[0]):
                        best = (sim, earlier.idx)
                if best is not None:
                    used.add(best[1])
                    res.links.append(RephraseLink(best[1], later.idx, round(best[0], 6)))
        return res


class DetectorModelMissingError(FileNotFoundError):
    """No trained rephrase-detector artifact where the settings point."""


def resolve_detector_artifact(settings: RephraseSettings) -> Path:
    """The artifact dir to load: ``detector_artifact`` or the one ``artifacts_dir/LATEST`` names.

    Raises:
        DetectorModelMissingError: nothing trained there (the message names the command).
    """
    if settings.detector_artifact is not None:
        path = Path(settings.detector_artifact)
    else:
        latest = Path(settings.artifacts_dir) / "LATEST"
        name = latest.read_text().strip() if latest.exists() else ""
        path = Path(settings.artifacts_dir) / name if name else Path(settings.artifacts_dir)
    if not (path / "detector.json").exists():
        raise DetectorModelMissingError(
            f"no trained rephrase detector at {path}; run `qrw train detector` first "
            "(or set rephrase.detector: heuristic_baseline, or rephrase.on_missing_model: train)"
        )
    return path


class BertSpanRephraseDetector:
    """The contextual BERT span detector (ContReph, Wang et al., EMNLP 2021) as a job stage.

    Builds one :class:`~offline.detector.examples.DetectorExample` per turn with earlier
    session turns within ``max_gap_s`` (newest first, at most ``lookback_turns``), runs the
    span model batched on ONNX Runtime on the examples the artifact's gate keeps
    (:mod:`offline.detector.gate`, with ``gate`` on), and keeps predicted rephrases with span
    probability >= ``min_detector_score``. Each earlier turn is rephrased at most once
    (highest score wins).

    Args:
        settings: ``rephrase`` settings (artifact location, backend, thresholds).
        defects: unused (signals reach the model as input tokens); kept for the factory shape.
    """

    name = "bert_span"

    def __init__(self, settings: RephraseSettings, defects: DefectSettings) -> None:
        del defects
        self.settings = settings
        self._model: Any = None
        self._gate: Any = None
        self.artifact: Path | None = None

    def warm_up(self) -> None:
        """Load the artifact (or train one when ``on_missing_model: train``).

        Raises:
            DetectorModelMissingError: no artifact and ``on_missing_model: refuse``.
        """
        if self._model is not None:
            return
        try:
            self.artifact = resolve_detector_artifact(self.settings)
        except DetectorModelMissingError:
            if self.settings.on_missing_model != "train":
                raise
            from offline.detector.pipeline import train_detector_pipeline
            from offline.detector.train import SpanTrainConfig
            from rewrite.config import load_settings

            budget = self.settings.train_budget
            log.warning(
                "no rephrase detector artifact; training one (on_missing_model: train, budget %s)",
                budget,
            )
            settings = load_settings()
            settings.rephrase = self.settings
            config = SpanTrainConfig.for_budget(budget)
            self.artifact = train_detector_pipeline(settings, config=config).artifact
        from offline.detector.gate import RephraseGate
        from offline.detector.inference import SpanDetector

        self._model = SpanDetector.load(self.artifact, backend=self.settings.detector_backend)
        self._gate = RephraseGate.load(self.artifact) if self.settings.gate else None

    def detect(self, turns: Sequence[Turn], sessions: Sequence[Session]) -> RephraseResult:
        from offline.detector.examples import build_examples

        self.warm_up()
        s = self.settings
        examples = build_examples(turns, sessions, s.lookback_turns, s.max_gap_s)
        if self._gate is not None and examples:
            keep = self._gate.keep(examples)
            examples = [ex for ex, k in zip(examples, keep, strict=True) if k]
        preds = self._model.predict(examples, batch_size=s.batch_size) if examples else []
        res = RephraseResult(candidates_scored=sum(len(ex.context) for ex in examples))
        res.links = select_links(
            (p.score, ex.context_idx[p.label], ex.current_idx)
            for ex, p in zip(examples, preds, strict=True)
            if p.label >= 0 and p.score >= s.min_detector_score
        )
        return res


def select_links(candidates: Iterable[tuple[float, int, int]]) -> list[RephraseLink]:
    """The span detector's link choice: each earlier turn is rephrased at most once, the
    highest-scoring candidate wins (ties: lower earlier, then lower later index).

    Only candidates with the same ``earlier`` compete, and an earlier turn and all its
    candidate later turns belong to one user, so choosing per user (the Spark engine's groups)
    gives the same links as choosing over the whole run.

    Args:
        candidates: ``(score in [0, 1], earlier turn idx, later turn idx)`` that passed
            ``min_detector_score``.

    Returns:
        Links sorted by ``later``; scores rounded to 6 decimals.
    """
    chosen = sorted(candidates, key=lambda x: (-x[0], x[1], x[2]))
    used: set[int] = set()
    links: list[RephraseLink] = []
    for score, earlier, later in chosen:
        if earlier in used:
            continue
        used.add(earlier)
        links.append(RephraseLink(earlier, later, round(float(score), 6)))
    links.sort(key=lambda lk: lk.later)
    return links


DetectorFactory = Callable[[RephraseSettings, DefectSettings], RephraseDetector]
DETECTORS: dict[str, DetectorFactory] = {
    "heuristic_baseline": HeuristicBaselineDetector,
    "bert_span": BertSpanRephraseDetector,
}


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
