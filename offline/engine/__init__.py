"""Engines of the nightly job: where sessionize → rephrase detection → defect labels → chains →
Markov pairs run (``engine: local | spark`` in config; README "Engines: local and Spark").

The stage logic lives once in :mod:`offline.engine.stages` (pure functions over Arrow tables);
:mod:`offline.engine.local` calls it in-process on the whole run, :mod:`offline.engine.spark`
through PySpark (window functions, ``applyInArrow``, ``mapInArrow``, group-bys, a distributed
connected-components step). Both return a :class:`CoreResult`, from which
:func:`offline.job.run_nightly` writes ``rephrases.parquet``, ``defects.parquet`` and
``pairs.parquet`` and runs everything after the pairs (self-learning, catalog, index,
guardrails, publish) on the driver. Validation and the forget list run before the engine, on
the driver, for both.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from offline.chains import defect_reason_counts
from offline.defects import DefectLabel
from offline.markov import MarkovStats, RewritePair
from offline.rephrase import (
    BertSpanRephraseDetector,
    DetectorModelMissingError,
    RephraseLink,
    build_detector,
    resolve_detector_artifact,
)
from offline.sessionize import Turn
from rewrite.config import Settings

ENGINES = ("local", "spark")


@dataclass
class CoreResult:
    """What an engine hands back to the job (all turn indices are the run's global ones).

    Attributes:
        sessions: number of sessions.
        links: rephrase links (heuristic: in session order; span detector: by later turn).
        candidates_scored: candidate (earlier, later) pairs the detector scored.
        candidates_gated: candidate pairs of examples the span detector's gate ruled out
            before the model (:mod:`offline.detector.gate`; 0 without a gate).
        labels: one defect label per turn, in turn order.
        defect_reasons: reason counts plus ``defect`` / ``success`` totals.
        chains: number of rephrase chains.
        pairs: mined pairs sorted by source.
        markov: the Markov stage's stats.
        detector_name / detector_artifact: the rephrase detector used ('' for no artifact).
        timings_s: stage wall times, seconds.
    """

    sessions: int
    links: list[RephraseLink]
    candidates_scored: int
    candidates_gated: int
    labels: list[DefectLabel]
    defect_reasons: Counter[str]
    chains: int
    pairs: list[RewritePair]
    markov: MarkovStats
    detector_name: str
    detector_artifact: str
    timings_s: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time in ``timings[name]`` (seconds, 4 decimals)."""
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 4)


def prepare_detector(settings: Settings) -> tuple[str, Path | None]:
    """The detector's name and, for the span detector, its artifact directory (trained first
    when missing and ``rephrase.on_missing_model: train``).

    Raises:
        ValueError: a detector neither engine knows.
        DetectorModelMissingError: span detector without artifact and ``on_missing_model:
            refuse``.
    """
    detector = build_detector(settings.rephrase, settings.defects)
    if detector.name == "heuristic_baseline":
        return detector.name, None
    if not isinstance(detector, BertSpanRephraseDetector):
        raise ValueError(f"rephrase detector {detector.name!r} is not supported by the engines")
    try:
        return detector.name, resolve_detector_artifact(settings.rephrase)
    except DetectorModelMissingError:
        if settings.rephrase.on_missing_model != "train":
            raise
        detector.warm_up()  # trains (and loads) one
        return detector.name, detector.artifact


def collect_result(
    labelled: pa.Table,
    detector: tuple[str, Path | None],
    chains: int,
    pairs: list[RewritePair],
    markov: MarkovStats,
    timings: dict[str, float],
) -> CoreResult:
    """Assemble a :class:`CoreResult` from the per-turn table of
    :func:`offline.engine.stages.label_users` (all groups concatenated, any order).

    Args:
        labelled: :data:`~offline.engine.stages.LABELLED_SCHEMA` rows, one per turn of the run
            (``chain`` may be dropped).
        detector: :func:`prepare_detector`'s answer.
        chains, pairs, markov, timings: from the engine's Markov stage.
    """
    t = labelled.take(pc.sort_indices(labelled, sort_keys=[("idx", "ascending")]))
    names = ["idx", "user_id", "session_no", "pos", "rephrases", "rephrase_score", "candidates"]
    cols = t.select([*names, "gated"]).to_pydict()
    labels = [
        DefectLabel(bool(d), tuple(r.split(",")) if r else ())
        for d, r in zip(t["defect"].to_pylist(), t["reasons"].to_pylist(), strict=True)
    ]
    linked = [
        (user, no, pos, RephraseLink(earlier, idx, score))
        for idx, user, no, pos, earlier, score in zip(
            cols["idx"],
            cols["user_id"],
            cols["session_no"],
            cols["pos"],
            cols["rephrases"],
            cols["rephrase_score"],
            strict=True,
        )
        if earlier >= 0
    ]
    name, artifact = detector
    if name == "heuristic_baseline":  # the baseline emits links session by session
        linked.sort(key=lambda x: (x[0], x[1], x[2]))
    return CoreResult(
        sessions=sum(1 for p in cols["pos"] if p == 0),
        links=[lk for *_, lk in linked],
        candidates_scored=int(sum(cols["candidates"])),
        candidates_gated=int(sum(cols["gated"])),
        labels=labels,
        defect_reasons=defect_reason_counts(labels),
        chains=chains,
        pairs=pairs,
        markov=markov,
        detector_name=name,
        detector_artifact=str(artifact or ""),
        timings_s=timings,
    )


def run_engine(turns: Sequence[Turn], settings: Settings, engine: str | None = None) -> CoreResult:
    """Run the job's core stages on ``turns`` with ``engine`` (default ``settings.engine``).

    Args:
        turns: validated turns, ``turns[i].idx == i``.
        settings: the run's settings.
        engine: ``"local"`` or ``"spark"``.

    Raises:
        ValueError: unknown engine.
        ImportError: ``spark`` without pyspark installed (``pip install -e '.[spark]'``).
    """
    engine = engine or settings.engine
    if engine == "local":
        from offline.engine.local import run_local

        return run_local(turns, settings)
    if engine == "spark":
        from offline.engine.spark import run_spark

        return run_spark(turns, settings)
    raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
