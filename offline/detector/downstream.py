"""Downstream effect of the rephrase detector: mine pairs with each detector, replay held-out
logs against them, compare win/loss ratios (issue 3, part 5).

For each source, the nightly job runs on the mining logs with ``rephrase.detector`` set to each
detector name; the pairs of that run are replayed (in-process, nothing published) over the
held-out logs and scored with :func:`offline.evaluate.replay_evaluate`.
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
        ``{source: {detector: {"pairs", "rephrase_links", "turns", "rewritten", "coverage",
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
