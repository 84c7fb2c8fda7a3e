"""The local engine: the stage functions of :mod:`offline.engine.stages` in this process, on
the whole run at once (sessionization vectorised over Arrow/numpy; connected components by
``scipy.sparse.csgraph`` inside :func:`offline.markov.mine_pairs`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from offline.engine import CoreResult, collect_result, prepare_detector, timed
from offline.engine.stages import (
    chains_of,
    examples_table,
    gate_examples,
    label_users,
    score_examples,
    sessionize_table,
    span_gate,
    span_model,
    turns_to_table,
)
from offline.markov import mine_pairs
from offline.sessionize import Turn
from rewrite.config import Settings

log = logging.getLogger(__name__)


def run_local(turns: Sequence[Turn], settings: Settings) -> CoreResult:
    """Sessionize, detect rephrases, label defects, build chains and mine pairs in-process.

    Args:
        turns: validated turns (``turns[i].idx == i``).
        settings: ``session``, ``rephrase``, ``defects``, ``markov``, ``privacy``.

    Raises:
        DetectorModelMissingError: span detector without an artifact (see
            :func:`offline.engine.prepare_detector`).
    """
    timings: dict[str, float] = {}
    with timed(timings, "rephrase_warm_up"):
        detector = prepare_detector(settings)
        _, artifact = detector
        if artifact is not None:
            span_model(artifact, settings.rephrase)
            span_gate(artifact, settings.rephrase)
    with timed(timings, "sessionize"):
        table = sessionize_table(turns_to_table(turns), settings.session.gap_s)
    with timed(timings, "rephrase"):
        predictions = None
        if artifact is not None:
            examples = examples_table(table, settings.rephrase)
            predictions = score_examples(
                gate_examples(examples, settings.rephrase, artifact), settings.rephrase, artifact
            )
        labelled = label_users(table, settings.rephrase, settings.defects, predictions)
    with timed(timings, "chains"):
        chains = chains_of(labelled)
    with timed(timings, "markov"):
        pairs, stats = mine_pairs(chains, settings.markov, settings.privacy.min_users_global)
    log.info("local engine: %d turns, %d chains, %d pairs", len(turns), len(chains), len(pairs))
    return collect_result(labelled, detector, len(chains), pairs, stats, timings)
