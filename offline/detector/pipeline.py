"""``qrw train detector``: build labelled training data without human labels, train the span
detector (the 6-layer model, then by default a 3-layer student started from it), point
``<artifacts_dir>/LATEST`` at it.

Training data (:func:`offline.detector.labels.build_datasets`): simulated sessions from SLURP
under a training seed distinct from the demo's, labelled from the simulator's truth
(``rephrase_of``), plus DSTC2 train calls labelled by the documented weak rule
(:func:`offline.detector.labels.dstc2_rephrase_of`). Split by user, never by turn: simulated
users 80/10/10 (train/dev/test_sim), DSTC2 train-file callers 90/10 (train/dev); the DSTC2
dev file is held out whole as ``test_dstc2``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from offline.detector.examples import read_examples
from offline.detector.gate import GateReport, copy_gate, train_gate
from offline.detector.labels import build_datasets
from offline.detector.train import SpanTrainConfig, TrainResult, train_span_detector
from rewrite.config import Settings

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """The trained artifact (``LATEST``: the student when there is one) and the data it was
    trained on; ``teacher``: the model the student started from, or None."""

    artifact: Path
    reused: bool
    data_dir: Path
    counts: dict[str, int]
    gate: GateReport | None = None
    teacher: Path | None = None


def train_detector_pipeline(
    settings: Settings,
    data_root: Path | None = None,
    work_dir: Path = Path("data/detector"),
    config: SpanTrainConfig | None = None,
    sim_users: int = 1200,
    sim_days: int = 3,
    sim_seed: int = 1001,
    dstc2_max_calls: int | None = None,
    progress: bool = True,
    student_layers: int | None = None,
) -> PipelineResult:
    """Build (or reuse) the labelled datasets, train the span model (and a student,
    ``student_layers``) and, with ``rephrase.gate``, its gate
    (:func:`offline.detector.gate.train_gate`, on the same training examples; copied into the
    student's folder), and mark the served artifact as LATEST.

    Args:
        settings: loaded settings (``rephrase`` context size and artifacts folder).
        data_root: folder with ``slurp/`` and ``dstc2/`` (default ``settings.data_root``).
        work_dir: where simulated logs and example files go (git-ignored); reused when its
            ``stats.json`` was written with the same simulation arguments.
        config: training config (default :class:`SpanTrainConfig`).
        sim_users, sim_days, sim_seed: the training simulation (seed distinct from the demo's).
        dstc2_max_calls: first N calls of each DSTC2 file only (fast runs); ``None``: all.
        student_layers: after training ``config``'s model, train a student of this many
            layers from it (:class:`~offline.detector.train.SpanTrainConfig` ``teacher``; same
            budget) and point ``LATEST`` at the student; ``None``: ``rephrase.distill_layers``;
            0: no student. Ignored when ``config`` already sets ``layers`` or ``teacher`` (a
            model asked for explicitly is the one trained).

    Raises:
        FileNotFoundError: the SLURP corpus or a DSTC2 file is missing.
    """
    root = Path(data_root or settings.data_root)
    stats_path = work_dir / "stats.json"
    wanted: dict[str, int | None] = {
        "sim_users": sim_users,
        "sim_days": sim_days,
        "sim_seed": sim_seed,
    }
    wanted["dstc2_max_calls"] = dstc2_max_calls
    fresh = False
    if stats_path.exists():
        cfg = json.loads(stats_path.read_text()).get("config", {})
        fresh = all(cfg.get(k) == v for k, v in wanted.items())
    if not fresh:
        build_datasets(work_dir, root, settings, sim_users, sim_days, sim_seed,
                       dstc2_max_calls=dstc2_max_calls, progress=progress)  # fmt: skip
    train = read_examples(work_dir / "train.jsonl")
    dev = read_examples(work_dir / "dev.jsonl")
    counts = {
        "train_examples": len(train),
        "dev_examples": len(dev),
        "train_positives": sum(ex.label >= 0 for ex in train),
        "dev_positives": sum(ex.label >= 0 for ex in dev),
    }
    config = config or SpanTrainConfig()
    student_layers = settings.rephrase.distill_layers if student_layers is None else student_layers
    distil = bool(student_layers) and config.layers is None and config.teacher is None
    out_root = Path(settings.rephrase.artifacts_dir)
    res: TrainResult = train_span_detector(train, dev, config, out_root, progress=progress)
    gate = None
    if settings.rephrase.gate:
        gate = train_gate(
            res.artifact,
            train,
            settings.defects.failure_response_patterns,
            settings.rephrase.gate_target_recall,
        )
    teacher = None
    if distil:
        teacher = res.artifact
        log.info("training a %d-layer student of %s", student_layers, teacher)
        student = replace(config, layers=student_layers, teacher=str(teacher))
        res = train_span_detector(train, dev, student, out_root, progress=progress)
        if gate is not None:  # the gate never reads the span model: the teacher's serves
            copy_gate(teacher, res.artifact)
    (out_root / "LATEST").write_text(res.artifact.name + "\n")
    return PipelineResult(res.artifact, res.reused, work_dir, counts, gate, teacher)
