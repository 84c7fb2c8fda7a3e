"""Downstream effect of the rephrase detector: mine pairs with each detector, replay held-out
logs against them, compare win/loss ratios (issue 3, part 5; ``qrw evaluate downstream``).

For each source, the nightly job runs on the mining logs with ``rephrase.detector`` set to each
detector name; the pairs of that run are replayed (in-process, nothing published) over the
held-out logs and scored with :func:`offline.evaluate.replay_evaluate`.

:func:`standard_sources` builds the two sources of the README: DSTC2 (mine on the train file,
replay the dev file: other callers) and a simulation under the demo's seed (not the detector's
training seed), mining days 1..D-1 and replaying day D (held-out day).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline.evaluate import SuccessFn, replay_evaluate, rewriter_for_run
from offline.job import run_nightly
from rewrite.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownstreamSource:
    """Mining logs, held-out logs and their truth file for one data source."""

    name: str
    mine_logs: tuple[Path, ...]
    heldout_logs: tuple[Path, ...]
    truth: Path
    success_fn: SuccessFn | None = None


def _link_quality(rephrases: Path, src: DownstreamSource) -> dict[str, Any]:
    """Precision/recall of the job's rephrase links on the mining logs against the truth
    file's ``rephrase_of`` (simulated sources only; ``{}`` when the truth has none)."""
    import json

    import pyarrow.parquet as pq

    gold: set[tuple[str, str]] = set()
    has_truth = False
    mine_ids: set[str] = set()
    for path in src.mine_logs:
        with path.open() as fh:
            mine_ids.update(json.loads(line)["turn_id"] for line in fh if line.strip())
    with src.truth.open() as fh:
        for line in fh:
            row = json.loads(line)
            if "rephrase_of" in row:
                has_truth = True
                if row["rephrase_of"] and row["turn_id"] in mine_ids:
                    gold.add((row["rephrase_of"], row["turn_id"]))
    if not has_truth:
        return {}
    table = pq.read_table(rephrases, columns=["earlier_turn_id", "later_turn_id"]).to_pylist()
    links = {(r["earlier_turn_id"], r["later_turn_id"]) for r in table}
    correct = len(links & gold)
    p = correct / len(links) if links else 0.0
    r = correct / len(gold) if gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"link_precision": round(p, 4), "link_recall": round(r, 4), "link_f1": round(f1, 4)}


def standard_sources(
    settings: Settings,
    data_root: Path,
    work_dir: Path,
    sim_users: int = 1000,
    sim_days: int = 3,
    sim_seed: int = 7,
) -> list[DownstreamSource]:
    """Import DSTC2 train/dev and simulate ``sim_days`` days (reused when already there).

    Args:
        settings: loaded settings (session spacing, simulator config).
        data_root: folder with ``dstc2/{train,dev}.jsonl`` and ``slurp/utterances.jsonl``.
        work_dir: imported and simulated logs go to ``work_dir/data``.
        sim_users, sim_days, sim_seed: the simulation (keep the seed distinct from the
            detector's training seed 1001, so no simulated session is in its training data).

    Returns:
        ``[dstc2, sim]`` sources; the sim source judges task success with the simulator's NLU
        (:func:`offline.simulate.task_success_oracle`).

    Raises:
        FileNotFoundError: a data file is missing.
        ValueError: ``sim_days`` < 2.
    """
    from offline.importers.dstc2 import import_dstc2
    from offline.simulate import SimulatorConfig, simulate, task_success_oracle

    if sim_days < 2:
        raise ValueError("sim_days must be >= 2 (mine on the first days, replay the last)")
    corpus = data_root / "slurp" / "utterances.jsonl"
    files = [data_root / "dstc2" / "train.jsonl", data_root / "dstc2" / "dev.jsonl", corpus]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"downstream data missing: {f} (pass --data-root)")
    data = work_dir / "data"
    for split in ("train", "dev"):
        if not (data / "dstc2" / split / "truth.jsonl").exists():
            import_dstc2(data_root / "dstc2" / f"{split}.jsonl", data / "dstc2" / split,
                         settings.session.fixed_spacing_s)  # fmt: skip
    sim = data / f"sim-s{sim_seed}-u{sim_users}-d{sim_days}"
    if not (sim / "truth.jsonl").exists():
        simulate(corpus, sim_users, sim_days, sim_seed, sim,
                 config=SimulatorConfig.from_settings(settings.simulator))  # fmt: skip
    return [
        DownstreamSource(
            "dstc2",
            (data / "dstc2" / "train" / "turns.jsonl",),
            (data / "dstc2" / "dev" / "turns.jsonl",),
            data / "dstc2" / "dev" / "truth.jsonl",
        ),
        DownstreamSource(
            "sim",
            tuple(sim / f"day-{d:02d}.jsonl" for d in range(1, sim_days)),
            (sim / f"day-{sim_days:02d}.jsonl",),
            sim / "truth.jsonl",
            task_success_oracle(corpus),
        ),
    ]


def downstream_compare(
    sources: Sequence[DownstreamSource],
    settings: Settings,
    detectors: Sequence[str],
    work_dir: Path,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Replay results per source and detector.

    Args:
        sources: data sources to compare on.
        settings: base settings (copied; only ``rephrase.detector`` changes per run).
        detectors: registry names, e.g. ``["heuristic_baseline", "bert_span"]``.
        work_dir: run directories go to ``work_dir/<source>/<detector>``.

    Returns:
        ``{source: {detector: {"link_precision", "link_recall", "link_f1" (simulated sources:
        the job's links on the mining logs against the simulator's truth), "pairs",
        "rephrase_links", "turns", "rewritten", "coverage",
        "wins", "losses", "win_loss_ratio_str", "task_wins", "task_losses",
        "task_win_loss_ratio_str", "wer_before", "wer_after"}}}``.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for src in sources:
        out[src.name] = {}
        for name in detectors:
            s = settings.model_copy(deep=True)
            s.rephrase.detector = name
            run = work_dir / src.name / name
            report = run_nightly(list(src.mine_logs), run, s)
            rewriter = rewriter_for_run(run, s)
            rep = replay_evaluate(
                list(src.heldout_logs), src.truth, rewriter.rewrite, success_fn=src.success_fn
            )
            out[src.name][name] = {
                **_link_quality(run / "rephrases.parquet", src),
                "pairs": report.counts["pairs"],
                "rephrase_links": report.counts["rephrase_links"],
                "turns": rep.turns,
                "rewritten": rep.rewritten,
                "coverage": rep.coverage,
                "wins": rep.wins,
                "losses": rep.losses,
                "win_loss_ratio_str": rep.win_loss_ratio_str,
                "task_wins": rep.task_wins,
                "task_losses": rep.task_losses,
                "task_win_loss_ratio_str": rep.task_win_loss_ratio_str,
                "wer_before": rep.wer_before,
                "wer_after": rep.wer_after,
            }
            log.info("downstream %s/%s: %s", src.name, name, out[src.name][name])
    return out
