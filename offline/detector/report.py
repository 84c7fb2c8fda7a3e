"""``qrw evaluate detector``: every rephrase detector on the same held-out examples.

Detectors: (a) the heuristic baseline of the nightly job, (b) zero-shot MiniLM cosine with a
threshold tuned on dev, (c) the pairwise cross-encoder fine-tuned on (previous, current)
pairs without context or signals, and the contextual BERT span model (the artifact that
``artifacts/detector/LATEST`` names). Test sets are files of
:class:`~offline.detector.examples.DetectorExample` written by ``qrw train detector``
(``test.jsonl``: held-out simulated users).
"""

from __future__ import annotations

import logging
from pathlib import Path

from offline.detector.examples import ExampleDetector, read_examples
from offline.detector.metrics import DetectionMetrics, evaluate_detectors
from rewrite.config import Settings

log = logging.getLogger(__name__)


def run_detector_evaluation(
    settings: Settings,
    data_dir: Path,
    include_pairwise: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, DetectionMetrics]]:
    """Fit/tune the baselines on ``data_dir``'s train/dev and score all detectors on its tests.

    Args:
        settings: loaded settings (heuristic thresholds, detector artifact location).
        data_dir: folder with ``train.jsonl``, ``dev.jsonl`` and ``test*.jsonl``.
        include_pairwise: also fine-tune (or reuse) the pairwise cross-encoder (~5 min).

    Returns:
        ``{detector: {test set: DetectionMetrics}}``.

    Raises:
        FileNotFoundError: missing example files or detector artifact.
    """
    from offline.detector.baselines import (
        CosineExampleDetector,
        HeuristicExampleDetector,
        PairwiseCrossEncoder,
    )
    from offline.detector.gate import GatedDetector, RephraseGate
    from offline.detector.inference import SpanDetector
    from offline.rephrase import resolve_detector_artifact

    train = read_examples(data_dir / "train.jsonl")
    dev = read_examples(data_dir / "dev.jsonl")
    tests = {p.stem: read_examples(p) for p in sorted(data_dir.glob("test*.jsonl"))}
    if not tests:
        raise FileNotFoundError(f"no test*.jsonl in {data_dir}; run `qrw train detector`")
    detectors: dict[str, ExampleDetector] = {
        "heuristic baseline": HeuristicExampleDetector(settings.rephrase, settings.defects)
    }
    cosine = CosineExampleDetector()
    cosine.fit(dev)
    detectors["zero-shot MiniLM cosine"] = cosine
    if include_pairwise:
        detectors["pairwise cross-encoder"] = PairwiseCrossEncoder.train(
            train, dev, progress=progress
        )
    artifact = resolve_detector_artifact(settings.rephrase)
    span = SpanDetector.load(artifact, backend=settings.rephrase.detector_backend)
    detectors["contextual BERT span (ours)"] = span
    gate = RephraseGate.load(artifact)
    if gate is not None:
        detectors["BERT span behind its gate (job)"] = GatedDetector(span, gate)
    return evaluate_detectors(detectors, tests)
