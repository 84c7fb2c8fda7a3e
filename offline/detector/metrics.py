"""Rephrase-detection measures, threshold tuning and the detectors × test sets comparison.

Measures (names from the design; Wang et al., "Contextual Rephrase Detection for Reducing
Friction in Dialogue Systems", EMNLP 2021, compare contextual and pairwise detectors with them):

- **Rephrase pairs.** A *gold pair* is an example whose gold ``label`` is a context index
  (not -1): (that context turn, the current turn). A *predicted pair* is an example whose
  predicted ``label`` is not -1. A predicted pair is *correct* when its label equals the gold
  label (same earlier turn). ``precision = correct / predicted_pairs``,
  ``recall = correct / gold_pairs``, ``f1`` their harmonic mean; each is 0.0 when its
  denominator is 0 (no division warnings, as scikit-learn's ``zero_division=0``).
- **Exact-span accuracy.** The share of *all* examples whose decision is fully right: gold -1
  and predicted -1, or gold ``k`` and predicted ``k`` with ``Prediction.exact_span`` true (the
  span model's start and end tokens are exactly turn ``k``'s utterance). Pairwise baselines
  always pick whole turns, so for them it equals label accuracy.
- **Label accuracy.** The share of examples with predicted label == gold label (ignores
  ``exact_span``).

:func:`tune_threshold` picks the decision threshold of a score-based detector that maximises
pair F1 on dev; :func:`evaluate_detectors` runs every detector on every test set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.table import Table

from offline.detector.examples import NO_REPHRASE, DetectorExample, ExampleDetector, Prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionMetrics:
    """Rephrase-detection measures over one test set (definitions in the module docstring).

    Attributes:
        n: examples scored.
        gold_pairs: examples with a gold rephrase (label != -1).
        predicted_pairs: examples predicted as a rephrase (label != -1).
        correct_pairs: predicted pairs whose label equals the gold label.
        precision / recall / f1: of rephrase pairs, in [0, 1].
        exact_span_accuracy: share of examples whose decision is fully right, in [0, 1].
        label_accuracy: share of examples with predicted label == gold label, in [0, 1].
    """

    n: int
    gold_pairs: int
    predicted_pairs: int
    correct_pairs: int
    precision: float
    recall: float
    f1: float
    exact_span_accuracy: float
    label_accuracy: float

    def to_dict(self) -> dict[str, int | float]:
        """JSON-able form (floats rounded to 6 digits)."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _f1(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f


def _check(examples: Sequence[DetectorExample], predictions: Sequence[Prediction]) -> None:
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    for ex, p in zip(examples, predictions, strict=True):
        if not NO_REPHRASE <= p.label < len(ex.context):
            raise ValueError(
                f"example {ex.example_id}: predicted label {p.label} outside "
                f"[-1, {len(ex.context) - 1}]"
            )


def detection_metrics(
    examples: Sequence[DetectorExample], predictions: Sequence[Prediction]
) -> DetectionMetrics:
    """Precision, recall, F1 of rephrase pairs, exact-span and label accuracy.

    Args:
        examples: gold examples (``label`` = context index of the rephrased turn, or -1).
        predictions: one per example, same order.

    Returns:
        :class:`DetectionMetrics` (all rates 0.0 on an empty set).

    Raises:
        ValueError: lengths differ, or a predicted label is not -1 or a valid context index.
    """
    _check(examples, predictions)
    gold = predicted = correct = exact = same = 0
    for ex, p in zip(examples, predictions, strict=True):
        gold += ex.label != NO_REPHRASE
        predicted += p.label != NO_REPHRASE
        if p.label == ex.label:
            same += 1
            if p.label == NO_REPHRASE:
                exact += 1
            else:
                correct += 1
                exact += p.exact_span
    n = len(examples)
    prec, rec, f1 = _f1(correct, predicted, gold)
    return DetectionMetrics(
        n=n,
        gold_pairs=gold,
        predicted_pairs=predicted,
        correct_pairs=correct,
        precision=prec,
        recall=rec,
        f1=f1,
        exact_span_accuracy=exact / n if n else 0.0,
        label_accuracy=same / n if n else 0.0,
    )


def tune_threshold(scores: Sequence[Prediction], examples: Sequence[DetectorExample]) -> float:
    """The decision threshold that maximises rephrase-pair F1 on (dev) examples.

    A score-based pairwise detector proposes, per example, its best context turn with a score;
    at threshold ``t`` it predicts that turn when ``score >= t`` and -1 otherwise. This sweeps
    every distinct score as a cut (O(n log n)).

    Args:
        scores: per example its *candidate*: ``label`` = the best-scoring context turn (or -1
            when the example offers none), ``score`` = that turn's score (any real scale).
        examples: the gold examples, same order.

    Returns:
        The threshold half-way between the optimal cut's score and the next lower distinct score
        (the lowest score itself when the optimum keeps every candidate), so small score shifts
        do not flip dev decisions. Ties in F1 go to the higher threshold (fewer predictions).
        When no cut gives F1 > 0 (e.g. dev has no gold pairs), a threshold just above the
        highest score, so nothing is predicted.

    Raises:
        ValueError: empty input, lengths differ, or a candidate label is out of range.
    """
    _check(examples, scores)
    cands = [
        (float(s.score), s.label == ex.label)
        for s, ex in zip(scores, examples, strict=True)
        if s.label != NO_REPHRASE
    ]
    if not cands:
        raise ValueError("tune_threshold needs at least one example with a candidate turn")
    gold = sum(ex.label != NO_REPHRASE for ex in examples)
    cands.sort(key=lambda c: -c[0])
    best_f1, best_i = 0.0, -1
    correct = 0
    for i, (score, ok) in enumerate(cands):
        correct += ok
        if i + 1 < len(cands) and cands[i + 1][0] == score:
            continue  # cut only between distinct scores
        f1 = _f1(correct, i + 1, gold)[2]
        if f1 > best_f1:
            best_f1, best_i = f1, i
    if best_i < 0:
        return math.nextafter(cands[0][0], math.inf)
    cut = cands[best_i][0]
    below = cands[best_i + 1][0] if best_i + 1 < len(cands) else None
    threshold = cut if below is None else (cut + below) / 2.0
    log.info(
        "tuned threshold %.4f: dev pair F1 %.4f (%d candidates, %d gold pairs)",
        threshold,
        best_f1,
        len(cands),
        gold,
    )
    return threshold


def evaluate_detectors(
    detectors: Mapping[str, ExampleDetector],
    test_sets: Mapping[str, Sequence[DetectorExample]],
) -> dict[str, dict[str, DetectionMetrics]]:
    """Run every detector on every test set (same examples for all) and score them.

    Args:
        detectors: display name → detector.
        test_sets: test-set name → gold examples.

    Returns:
        ``{detector name: {test-set name: DetectionMetrics}}`` in the input orders.

    Raises:
        ValueError: a detector returns the wrong number of predictions or an invalid label.
    """
    out: dict[str, dict[str, DetectionMetrics]] = {}
    for name, det in detectors.items():
        out[name] = {}
        for set_name, examples in test_sets.items():
            t0 = time.perf_counter()
            preds = det.predict(examples)
            m = detection_metrics(examples, preds)
            out[name][set_name] = m
            log.info(
                "%s on %s: P %.3f R %.3f F1 %.3f exact %.3f (%d examples, %.1fs)",
                name,
                set_name,
                m.precision,
                m.recall,
                m.f1,
                m.exact_span_accuracy,
                m.n,
                time.perf_counter() - t0,
            )
    return out


def metrics_to_json(
    rows: Mapping[str, Mapping[str, DetectionMetrics]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{detector: {test set: DetectionMetrics.to_dict()}}`` (JSON-able)."""
    return {d: {s: m.to_dict() for s, m in sets.items()} for d, sets in rows.items()}


def format_table(
    rows: Mapping[str, Mapping[str, DetectionMetrics]], title: str = "Rephrase detection"
) -> Table:
    """A rich table: one section per test set, one row per detector; best F1 per set in bold.

    Args:
        rows: ``{detector: {test set: DetectionMetrics}}`` as from :func:`evaluate_detectors`.
        title: table title.
    """
    table = Table(title=title)
    table.add_column("test set", no_wrap=True)
    table.add_column("detector", no_wrap=True)
    for col in ("n", "gold pairs", "pred pairs"):
        table.add_column(col, justify="right")
    for col in ("P", "R", "F1", "exact span", "label acc"):
        table.add_column(col, justify="right")
    set_names: list[str] = []
    for sets in rows.values():
        set_names.extend(s for s in sets if s not in set_names)
    for k, set_name in enumerate(set_names):
        if k:
            table.add_section()
        present = {d: sets[set_name] for d, sets in rows.items() if set_name in sets}
        best = max((m.f1 for m in present.values()), default=0.0)
        for det, m in present.items():
            f1 = f"{m.f1:.3f}"
            table.add_row(
                set_name,
                det,
                str(m.n),
                str(m.gold_pairs),
                str(m.predicted_pairs),
                f"{m.precision:.3f}",
                f"{m.recall:.3f}",
                f"[bold]{f1}[/bold]" if m.f1 == best and best > 0 else f1,
                f"{m.exact_span_accuracy:.3f}",
                f"{m.label_accuracy:.3f}",
            )
    return table


def format_markdown(rows: Mapping[str, Mapping[str, DetectionMetrics]]) -> str:
    """The same comparison as a GitHub-markdown table (for the README).

    Args:
        rows: ``{detector: {test set: DetectionMetrics}}`` as from :func:`evaluate_detectors`.
    """
    lines = [
        "| test set | detector | n | gold pairs | P | R | F1 | exact span |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    set_names: list[str] = []
    for sets in rows.values():
        set_names.extend(s for s in sets if s not in set_names)
    for set_name in set_names:
        for det, sets in rows.items():
            if set_name in sets:
                m = sets[set_name]
                lines.append(
                    f"| {set_name} | {det} | {m.n} | {m.gold_pairs} | {m.precision:.3f} | "
                    f"{m.recall:.3f} | {m.f1:.3f} | {m.exact_span_accuracy:.3f} |"
                )
    return "\n".join(lines) + "\n"
