"""A cheap first stage in front of the span detector: examples that cannot be rephrases skip it.

The span model is the nightly job's whole cost (85-90 % of it with the BERT detector) and
most of the examples it scores are not rephrases. :class:`RephraseGate` is a small LightGBM
classifier over string and interaction features of an example (per context turn: lexical
and phonetic similarity to the current turn, time gap, barge-in, failure response, lengths);
an example whose gate score is below the gate's threshold gets "no rephrase" without running
the span model. This is a classic detection cascade (Viola & Jones, "Rapid object detection
using a boosted cascade of simple features", CVPR 2001; for ranking: Wang, Lin & Metzler,
"A cascade ranking model for efficient ranked retrieval", SIGIR 2011): the first stage is
tuned for recall, the expensive stage decides.

The threshold is chosen on out-of-fold scores of the training examples (folds by user, never
by turn) as the highest one that keeps at least ``target_recall`` of the gold rephrases **of
every source** (simulated sessions and DSTC2 dialogue separately, so the larger source cannot
hide losses on real dialogue). The artifact is two files next to the span model:
``gate.txt`` (LightGBM text model) and ``gate.json`` (threshold, features, the failure-response
patterns the features were computed with, out-of-fold figures).

Features depend only on the example, so the gate drops the same examples on every engine and
the span model's batches (hence its int8 scores) stay identical between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz import fuzz

from offline.defects import DefectRule
from offline.detector.examples import NO_REPHRASE, DetectorExample, Prediction
from rewrite.config import DefectSettings
from rewrite.normalize import phonetic_key

log = logging.getLogger(__name__)

GATE_MODEL = "gate.txt"
GATE_META = "gate.json"
#: Bump when :func:`gate_features` changes: a gate trained on other features is refused.
FEATURES_VERSION = "gate-v1"
#: Context turns featurised (newest first); the job's ``lookback_turns`` default.
SLOTS = 3
SLOT_FEATURES = (
    "token_sort",
    "phonetic",
    "partial",
    "token_set",
    "gap_s",
    "barge_in",
    "failure_response",
    "words",
)
EXAMPLE_FEATURES = ("n_context", "current_words", "best_similarity")
FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"c{k}_{name}" for k in range(SLOTS) for name in SLOT_FEATURES) + EXAMPLE_FEATURES
)


def gate_features(
    examples: Sequence[DetectorExample], failure_patterns: Sequence[str]
) -> np.ndarray:
    """The gate's feature matrix.

    Per context slot ``k`` (newest first, the first :data:`SLOTS` turns): rapidfuzz
    ``token_sort_ratio``, ``ratio`` of Metaphone keys (jellyfish, via
    :func:`rewrite.normalize.phonetic_key`), ``partial_ratio`` and ``token_set_ratio`` of the
    context turn against the current turn (each / 100), the gap in seconds, barge-in (0/1),
    a failure response (0/1, :meth:`offline.defects.DefectRule.is_failure_response` with
    ``failure_patterns``),
    the context turn's word count; NaN for absent slots (LightGBM treats them as missing).
    Then the example's context size, the current turn's word count and the best
    ``(token_sort + phonetic) / 2`` over its context.

    Args:
        examples: detector examples (labels ignored).
        failure_patterns: regexes of failure responses (``defects.failure_response_patterns``).

    Returns:
        ``(len(examples), len(FEATURE_NAMES))`` float32.
    """
    rule = DefectRule(DefectSettings(failure_response_patterns=list(failure_patterns)))
    out = np.full((len(examples), len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    width = len(SLOT_FEATURES)
    for i, ex in enumerate(examples):
        cur = ex.current
        cur_key = phonetic_key(cur)
        row = out[i]
        best = 0.0
        for k, c in enumerate(ex.context[:SLOTS]):
            lex = fuzz.token_sort_ratio(c.text, cur) / 100.0
            phon = fuzz.ratio(phonetic_key(c.text), cur_key) / 100.0
            best = max(best, 0.5 * (lex + phon))
            failed = rule.is_failure_response(c.response) if c.response else False
            row[k * width : (k + 1) * width] = (
                lex,
                phon,
                fuzz.partial_ratio(c.text, cur) / 100.0,
                fuzz.token_set_ratio(c.text, cur) / 100.0,
                c.gap_s,
                float(c.barge_in),
                float(failed),
                float(len(c.text.split())),
            )
        base = SLOTS * width
        row[base] = float(len(ex.context))
        row[base + 1] = float(len(cur.split()))
        row[base + 2] = best
    return out


@dataclass
class GateReport:
    """How the gate was trained and what it keeps (written to ``gate.json``).

    Attributes:
        threshold: examples scoring below it skip the span model (LightGBM probability).
        target_recall: the share of gold rephrases of each source the threshold keeps on
            out-of-fold scores.
        oof: per source (``sim``, ``dstc2``, ``all``) out-of-fold ``recall`` (gold rephrases
            kept) and ``skip_rate`` (share of examples skipped) at ``threshold``.
        examples / positives: training examples and gold rephrases among them.
        train_seconds: wall time of the folds and the final fit, seconds.
    """

    threshold: float
    target_recall: float
    oof: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: int = 0
    positives: int = 0
    train_seconds: float = 0.0


#: LightGBM parameters of the gate: small, deterministic, two threads.
GATE_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "bagging_fraction": 1.0,
    "num_threads": 2,
    "deterministic": True,
    "force_row_wise": True,
    "seed": 13,
    "verbose": -1,
}
GATE_ROUNDS = 200


def _fold_of(user_id: str, folds: int) -> int:
    return zlib.crc32(user_id.encode("utf-8")) % folds


def _threshold_for_recall(scores: np.ndarray, target_recall: float) -> float:
    """Highest threshold keeping at least ``target_recall`` of ``scores`` (positives' scores)."""
    if scores.size == 0:
        return 1.0
    s = np.sort(scores)
    drop = int(np.floor((1.0 - target_recall) * s.size))  # positives allowed below the bar
    return float(s[drop])


class RephraseGate:
    """The trained gate: :meth:`keep` says which examples the span model must still score.

    Args:
        booster: a trained ``lightgbm.Booster`` over :data:`FEATURE_NAMES`.
        threshold: probability below which an example is skipped.
        failure_patterns: the failure-response regexes the gate was trained with.
    """

    def __init__(self, booster: Any, threshold: float, failure_patterns: Sequence[str]) -> None:
        self.booster = booster
        self.threshold = float(threshold)
        self.failure_patterns = list(failure_patterns)

    def scores(self, examples: Sequence[DetectorExample]) -> np.ndarray:
        """Gate probabilities, ``(len(examples),)`` float64 in [0, 1]."""
        if not examples:
            return np.zeros(0, dtype=np.float64)
        x = gate_features(examples, self.failure_patterns)
        return np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64)

    def keep(self, examples: Sequence[DetectorExample]) -> np.ndarray:
        """``(len(examples),)`` bool: True where the span model must score the example."""
        return self.scores(examples) >= self.threshold

    @staticmethod
    def train(
        examples: Sequence[DetectorExample],
        failure_patterns: Sequence[str],
        target_recall: float = 0.995,
        folds: int = 5,
    ) -> tuple[RephraseGate, GateReport]:
        """Fit the gate on labelled examples and pick its threshold out of fold.

        ``folds`` LightGBM fits on users outside each fold give every example an out-of-fold
        score; the threshold is the lowest of the per-source thresholds that keep
        ``target_recall`` of that source's gold rephrases; the returned booster is then fit
        on all examples.

        Raises:
            ValueError: no positive or no negative example, or ``target_recall`` not in (0, 1].
        """
        import lightgbm as lgb

        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        y = np.array([ex.label != NO_REPHRASE for ex in examples], dtype=np.float64)
        if y.sum() == 0 or y.sum() == len(y):
            raise ValueError("the gate needs both rephrase and non-rephrase examples")
        started = time.perf_counter()
        x = gate_features(examples, failure_patterns)
        fold = np.array([_fold_of(ex.user_id, folds) for ex in examples])
        oof = np.zeros(len(examples), dtype=np.float64)
        for f in range(folds):
            fit, held = fold != f, fold == f
            if not held.any():
                continue
            booster = lgb.train(
                GATE_PARAMS, lgb.Dataset(x[fit], y[fit], feature_name=list(FEATURE_NAMES)),
                num_boost_round=GATE_ROUNDS,
            )  # fmt: skip
            oof[held] = booster.predict(x[held])
        sources = np.array([ex.source for ex in examples])
        thresholds = [
            _threshold_for_recall(oof[(sources == src) & (y == 1)], target_recall)
            for src in sorted(set(sources.tolist()))
            if ((sources == src) & (y == 1)).any()
        ]
        threshold = min(thresholds)
        report = GateReport(threshold, target_recall, examples=len(y), positives=int(y.sum()))
        for src in [*sorted(set(sources.tolist())), "all"]:
            m = np.ones(len(y), bool) if src == "all" else sources == src
            kept = oof[m] >= threshold
            pos = y[m] == 1
            report.oof[src] = {
                "examples": int(m.sum()),
                "recall": float(kept[pos].mean()) if pos.any() else 1.0,
                "skip_rate": float(1.0 - kept.mean()),
            }
        booster = lgb.train(
            GATE_PARAMS, lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES)),
            num_boost_round=GATE_ROUNDS,
        )  # fmt: skip
        report.train_seconds = time.perf_counter() - started
        return RephraseGate(booster, threshold, failure_patterns), report

    def save(self, artifact: Path, report: GateReport) -> Path:
        """Write ``gate.txt`` and ``gate.json`` into the detector ``artifact`` folder."""
        artifact = Path(artifact)
        model_text = self.booster.model_to_string()
        (artifact / GATE_MODEL).write_text(model_text)
        meta = {
            "features_version": FEATURES_VERSION,
            "feature_names": list(FEATURE_NAMES),
            "failure_patterns": self.failure_patterns,
            "model_sha256": hashlib.sha256(model_text.encode()).hexdigest(),
            **asdict(report),
        }
        (artifact / GATE_META).write_text(json.dumps(meta, indent=2) + "\n")
        return artifact / GATE_META

    @classmethod
    def load(cls, artifact: Path) -> RephraseGate | None:
        """The gate saved in a detector ``artifact`` folder, or ``None`` if it has none.

        Raises:
            ValueError: the gate was trained on other features (:data:`FEATURES_VERSION`) or
                its model file does not match ``gate.json``.
        """
        import lightgbm as lgb

        meta_path = Path(artifact) / GATE_META
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("features_version") != FEATURES_VERSION:
            raise ValueError(
                f"{meta_path}: gate features {meta.get('features_version')!r}, this code computes "
                f"{FEATURES_VERSION!r}; retrain it with `qrw train detector-gate`"
            )
        text = (Path(artifact) / GATE_MODEL).read_text()
        if hashlib.sha256(text.encode()).hexdigest() != meta["model_sha256"]:
            raise ValueError(f"{Path(artifact) / GATE_MODEL} does not match {meta_path}")
        return cls(lgb.Booster(model_str=text), meta["threshold"], meta["failure_patterns"])


class GatedDetector:
    """A detector behind the gate: examples the gate rules out get ``Prediction(-1, 0.0)``,
    the rest go to ``detector`` in one call (so its batches hold only kept examples, as in the
    job).

    Args:
        detector: anything with ``predict(examples) -> list[Prediction]`` (the span model).
        gate: the trained gate.
        name: the name shown in evaluation tables.
    """

    def __init__(self, detector: Any, gate: RephraseGate, name: str = "gated") -> None:
        self.detector = detector
        self.gate = gate
        self.name = name

    def predict(self, examples: Sequence[DetectorExample]) -> list[Prediction]:
        """One prediction per example, same order."""
        keep = self.gate.keep(examples)
        kept = [ex for ex, k in zip(examples, keep, strict=True) if k]
        scored = iter(self.detector.predict(kept) if kept else [])
        return [next(scored) if k else Prediction(NO_REPHRASE, 0.0) for k in keep]


def copy_gate(source: Path, artifact: Path) -> None:
    """Copy ``gate.txt`` and ``gate.json`` from one detector artifact folder into another.

    The gate's features and training read the examples only, never the span model, so a
    teacher's gate serves its student as it is (``qrw train detector`` trains it once).

    Raises:
        FileNotFoundError: ``source`` has no gate.
    """
    for name in (GATE_MODEL, GATE_META):
        shutil.copyfile(Path(source) / name, Path(artifact) / name)


def train_gate(
    artifact: Path,
    train: Sequence[DetectorExample],
    failure_patterns: Sequence[str],
    target_recall: float = 0.995,
) -> GateReport:
    """Train a gate on the detector's training examples and save it into ``artifact``.

    Raises:
        ValueError: as :meth:`RephraseGate.train`.
    """
    gate, report = RephraseGate.train(train, failure_patterns, target_recall=target_recall)
    gate.save(artifact, report)
    log.info(
        "gate: threshold %.4g keeps %s of gold rephrases and skips %s of examples (out of fold)",
        report.threshold,
        {k: round(v["recall"], 4) for k, v in report.oof.items()},
        {k: round(v["skip_rate"], 3) for k, v in report.oof.items()},
    )
    return report
