"""``qrw train detector``: build labelled training data without human labels, train the span
detector, point ``<artifacts_dir>/LATEST`` at it.

Training data (v1): simulated sessions from SLURP under a training seed distinct from the
demo's, labelled from the simulator's truth (``rephrase_of``), split by user (80/10/10 by a
stable hash of the user id — a user never appears in two splits). The DSTC2 weak-labelling
rule is the next step (see README, "Rephrase detector").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from offline.detector.examples import DetectorExample, build_examples, write_examples
from offline.detector.train import SpanTrainConfig, TrainResult, train_span_detector
from offline.schema import read_turn_logs
from offline.sessionize import sessionize, to_turns
from rewrite.config import Settings

log = logging.getLogger(__name__)


def label_from_truth(
    examples: Sequence[DetectorExample], rephrase_of: dict[str, str | None]
) -> list[DetectorExample]:
    """Set each example's label to the context index of ``rephrase_of[example_id]``.

    Examples whose rephrased turn is not in the context (too far back) keep -1.
    """
    out = []
    for ex in examples:
        target = rephrase_of.get(ex.example_id)
        label = next((i for i, c in enumerate(ex.context) if c.turn_id == target), -1)
        out.append(replace(ex, label=label))
    return out


def user_split(user_id: str) -> str:
    """Stable split of a user: ``train`` (80 %), ``dev`` (10 %), ``test`` (10 %)."""
    bucket = int(hashlib.sha256(user_id.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def simulated_examples(sim_dir: Path, settings: Settings) -> dict[str, list[DetectorExample]]:
    """Labelled examples from a simulator output folder, split by user.

    Raises:
        FileNotFoundError: no ``truth.jsonl`` / day files in ``sim_dir``.
    """
    truth_path = sim_dir / "truth.jsonl"
    if not truth_path.exists():
        raise FileNotFoundError(f"simulator truth not found: {truth_path}")
    rephrase_of: dict[str, str | None] = {}
    with truth_path.open() as fh:
        for line in fh:
            row = json.loads(line)
            rephrase_of[row["turn_id"]] = row.get("rephrase_of")
    read = read_turn_logs(sorted(sim_dir.glob("day-*.jsonl")))
    turns = to_turns(read.turns)
    sessions = sessionize(turns, settings.session.gap_s)
    r = settings.rephrase
    examples = label_from_truth(
        build_examples(turns, sessions, r.lookback_turns, r.max_gap_s, source="sim"), rephrase_of
    )
    splits: dict[str, list[DetectorExample]] = {"train": [], "dev": [], "test": []}
    for ex in examples:
        splits[user_split(ex.user_id)].append(ex)
    return splits


@dataclass
class PipelineResult:
    """The trained artifact and the data it was trained on."""

    artifact: Path
    reused: bool
    data_dir: Path
    counts: dict[str, int]


def train_detector_pipeline(
    settings: Settings,
    data_root: Path | None = None,
    work_dir: Path = Path("data/detector"),
    config: SpanTrainConfig | None = None,
    sim_users: int = 1200,
    sim_days: int = 3,
    sim_seed: int = 1001,
    progress: bool = True,
) -> PipelineResult:
    """Simulate training traffic, label it, train, and mark the artifact as LATEST.

    Args:
        settings: loaded settings (``rephrase`` context size and artifacts folder).
        data_root: folder with ``slurp/utterances.jsonl`` (default ``settings.data_root``).
        work_dir: where simulated logs and example files go (git-ignored).
        config: training config (default :class:`SpanTrainConfig`).
        sim_users, sim_days, sim_seed: the training simulation (seed distinct from the demo's).

    Raises:
        FileNotFoundError: the SLURP corpus is missing.
    """
    from offline.simulate import SimulatorConfig, simulate

    corpus = Path(data_root or settings.data_root) / "slurp" / "utterances.jsonl"
    if not corpus.exists():
        raise FileNotFoundError(f"SLURP corpus not found: {corpus}")
    sim_dir = work_dir / f"sim-s{sim_seed}-u{sim_users}-d{sim_days}"
    if not (sim_dir / "truth.jsonl").exists():
        sim_config = SimulatorConfig.from_settings(settings.simulator)
        simulate(corpus, sim_users, sim_days, sim_seed, sim_dir, config=sim_config,
                 progress=progress)  # fmt: skip
    splits = simulated_examples(sim_dir, settings)
    for name, rows in splits.items():
        write_examples(rows, work_dir / f"{name}.jsonl")
    counts = {f"{k}_examples": len(v) for k, v in splits.items()}
    counts.update({f"{k}_positives": sum(ex.label >= 0 for ex in v) for k, v in splits.items()})
    res: TrainResult = train_span_detector(
        splits["train"], splits["dev"], config, out_root=settings.rephrase.artifacts_dir,
        progress=progress,
    )  # fmt: skip
    (Path(settings.rephrase.artifacts_dir) / "LATEST").write_text(res.artifact.name + "\n")
    return PipelineResult(res.artifact, res.reused, work_dir, counts)
