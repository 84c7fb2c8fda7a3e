"""Human-readable A/B reports: rich tables for the CLI and the number formatters shared with the
dashboard (``offline/ab/dashboard.py``), so both show the same strings as the JSON report's
``display`` fields.

All number -> string formatting for humans lives here: :func:`format_rate`, :func:`format_ci`,
:func:`format_ratio`, :func:`format_p`, :func:`format_count`, :func:`format_significant`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from offline.ab.analysis import ABReport, ArmStats, Comparison, analyze
from offline.ab.store import OutcomeStore

log = logging.getLogger(__name__)

NOT_AVAILABLE = "n/a"


# ---------------------------------------------------------------------------------------------
# formatters
# ---------------------------------------------------------------------------------------------
def _missing(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def format_rate(x: float | None) -> str:
    """A fraction as a percentage with two decimals: 0.1234 -> "12.34%", -0.05 -> "-5.00%";
    None/NaN/inf -> "n/a"."""
    if x is None or _missing(x):
        return NOT_AVAILABLE
    return f"{100.0 * x:.2f}%"


def format_ci(lo: float | None, hi: float | None) -> str:
    """A CI of fractions as percentages: (0.1102, 0.137) -> "[11.02%, 13.70%]"."""
    return f"[{format_rate(lo)}, {format_rate(hi)}]"


def format_ratio(wins: int, losses: int) -> str:
    """Win:loss ratio: (25, 2) -> "12.5:1", (7, 0) -> "7:0", (1, 8) -> "0.12:1".

    One decimal when wins >= losses, two below (so small ratios do not round to 0)."""
    if losses == 0:
        return f"{wins}:0"
    r = wins / losses
    return f"{r:.1f}:1" if r >= 1 else f"{r:.2f}:1"


def format_p(p: float | None) -> str:
    """A p-value: below 0.001 -> "<0.001", else three decimals ("0.034"); None/NaN -> "n/a"."""
    if p is None or _missing(p):
        return NOT_AVAILABLE
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_count(n: int) -> str:
    """An integer count with thousands separators: 12345 -> "12,345"."""
    return f"{n:,}"


def format_significant(significant: bool) -> str:
    """ "yes" / "no"."""
    return "yes" if significant else "no"


def arm_display(arm: ArmStats) -> dict[str, str]:
    """The strings shown for one arm: users, turns, defect_rate, ci, trigger_rate, win_loss."""
    return {
        "users": format_count(arm.users),
        "turns": format_count(arm.turns),
        "defect_rate": format_rate(arm.defect_rate),
        "ci": format_ci(arm.ci_low, arm.ci_high),
        "trigger_rate": format_rate(arm.trigger_rate),
        "win_loss": format_ratio(arm.wins, arm.losses),
    }


def comparison_display(cmp: Comparison) -> dict[str, str]:
    """The strings shown for one comparison: relative_reduction, ci, p_value, significant."""
    return {
        "relative_reduction": format_rate(cmp.relative_reduction),
        "ci": format_ci(cmp.ci_low, cmp.ci_high),
        "p_value": format_p(cmp.p_value),
        "significant": format_significant(cmp.significant),
    }


# ---------------------------------------------------------------------------------------------
# rich rendering
# ---------------------------------------------------------------------------------------------
def render_report(report: ABReport, console: Console) -> None:
    """Print ``report`` as rich tables: per-arm overall metrics, comparisons, per-day defect
    rates, the SRM line and the top rewrites per arm."""
    domains = ", ".join(report.domains) if report.domains else "all"
    console.print(
        f"[bold]A/B report[/bold] {report.experiment}: days {report.day_range[0]}-"
        f"{report.day_range[1]}, domains: {domains}, control: {report.control}"
    )
    if not report.arms:
        console.print("[yellow]no outcomes for this experiment and filter[/yellow]")
        return

    arms = Table(title="Arms (defect rate CI: users as clusters, delta method)")
    for col in ("arm", "users", "turns", "defect rate", "95% CI", "trigger rate", "win:loss"):
        arms.add_column(col, justify="left" if col == "arm" else "right")
    for a in report.arms:
        d = arm_display(a)
        arms.add_row(
            a.arm,
            d["users"],
            d["turns"],
            d["defect_rate"],
            d["ci"],
            d["trigger_rate"],
            f"{d['win_loss']} ({a.wins}/{a.losses})",
        )
    console.print(arms)

    if report.comparisons:
        cmps = Table(title="Relative defect reduction (1 - rate_t / rate_b)")
        for col in ("treatment", "baseline", "relative reduction", "95% CI", "p", "significant"):
            cmps.add_column(col, justify="left" if col in ("treatment", "baseline") else "right")
        for c in report.comparisons:
            d = comparison_display(c)
            cmps.add_row(
                c.treatment,
                c.baseline,
                d["relative_reduction"],
                d["ci"],
                d["p_value"],
                d["significant"],
            )
        console.print(cmps)
    else:
        console.print("[yellow]no comparisons (control missing or its defect rate is 0)[/yellow]")

    if report.per_day:
        arm_names = [a.arm for a in report.arms]
        days = Table(title="Defect rate per day")
        days.add_column("day", justify="right")
        for name in arm_names:
            days.add_column(name, justify="right")
        cells: dict[int, dict[str, str]] = {}
        for ds in report.per_day:
            cells.setdefault(ds.day, {})[ds.stats.arm] = format_rate(ds.stats.defect_rate)
        for day, row in cells.items():
            days.add_row(str(day), *(row.get(name, NOT_AVAILABLE) for name in arm_names))
        console.print(days)

    if report.srm is None:
        console.print("SRM check: skipped (traffic shares unknown)")
    else:
        s = report.srm
        observed = ", ".join(
            f"{arm} {format_count(n)} ({format_rate(s.expected_shares.get(arm, 0.0))} expected)"
            for arm, n in s.observed_users.items()
        )
        verdict = "[bold red]MISMATCH[/bold red]" if s.mismatch else "ok"
        console.print(
            f"SRM check: {verdict} (chi2 = {s.chi2:.2f}, p = {format_p(s.p_value)}); "
            f"users: {observed}"
        )

    if report.top_rewrites:
        top = Table(title="Top rewrites per arm")
        for col in ("arm", "utterance", "rewrite", "source", "count", "wins", "losses", "example"):
            top.add_column(col, justify="right" if col in ("count", "wins", "losses") else "left")
        for r in report.top_rewrites:
            top.add_row(
                r.arm,
                r.utterance,
                r.rewrite,
                r.source,
                format_count(r.count),
                format_count(r.wins),
                format_count(r.losses),
                r.example_turn_id,
            )
        console.print(top)


def write_report_json(report: ABReport, path: Path) -> Path:
    """Write ``report.to_dict()`` as indented JSON, atomically (tmp file + ``os.replace``).
    Creates the parent folder. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def report_command(
    store_root: Path,
    experiment: str,
    json_out: Path | None,
    day_range: tuple[int, int] | None,
    domains: Sequence[str],
    shares: Mapping[str, float] | None,
    console: Console,
) -> ABReport:
    """``qrw ab report``: read the experiment's outcomes from the store, analyze, render to
    ``console`` and (when ``json_out``) write the JSON report.

    Args:
        store_root: root of the :class:`~offline.ab.store.OutcomeStore`.
        experiment: experiment name.
        json_out: JSON file to write (atomically), or None.
        day_range: inclusive (first, last) day filter, or None for all days.
        domains: domain filter; empty = all domains.
        shares: configured traffic share per arm (arm order and SRM check), or None.
        console: where the tables go.

    Returns:
        The :class:`~offline.ab.analysis.ABReport` (an unknown experiment gives an empty one).

    Raises:
        ValueError: invalid experiment name, ``day_range`` or ``shares``.
    """
    store = OutcomeStore(store_root)
    dom = list(domains) or None
    table = store.read(experiment, day_range, dom)
    report = analyze(table, experiment=experiment, shares=shares, day_range=day_range, domains=dom)
    render_report(report, console)
    if json_out is not None:
        write_report_json(report, json_out)
        log.info("wrote A/B report JSON to %s", json_out)
    return report
