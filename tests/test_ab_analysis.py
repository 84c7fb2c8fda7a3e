"""A/B statistics (offline.ab.analysis) and the report (offline.ab.report) on tables with a
known truth: hand-computed small tables and synthetic experiments (tests/ab_synth.py)."""

from __future__ import annotations

import json
import logging
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ab_synth import T0, make_table, synthetic, user_turns
from rich.console import Console

from offline.ab.analysis import (
    Z_95,
    ABReport,
    analyze,
    bootstrap_relative_reduction,
    ratio_delta_var,
    relative_reduction_delta,
    srm_check,
)
from offline.ab.report import (
    format_ci,
    format_count,
    format_p,
    format_rate,
    format_ratio,
    format_significant,
    render_report,
    report_command,
)
from offline.ab.schema import OUTCOME_SCHEMA, empty_outcomes
from offline.ab.store import OutcomeStore

TRUE_RR = 1.0 - 0.21 / 0.30  # synthetic truth: control 30%, treatment 21% defects


def hand_table() -> pa.Table:
    """control: a 1/4, b 3/6 defects (R = 0.4); treatment: c 1/5, d 1/5 (R = 0.2)."""
    rows = (
        user_turns("control", "a", 4, 1)
        + user_turns("control", "b", 6, 3)
        + user_turns("treatment", "c", 5, 1)
        + user_turns("treatment", "d", 5, 1)
    )
    return make_table(rows)


# ---------------------------------------------------------------------------------------------
# exact numbers
# ---------------------------------------------------------------------------------------------
def test_rates_and_delta_ci_equal_hand_computed() -> None:
    report = analyze(hand_table(), experiment="exp")
    control, treatment = report.arms
    assert (control.arm, control.users, control.turns, control.defects) == ("control", 2, 10, 4)
    assert control.defect_rate == 0.4
    # Y = [1, 3], N = [4, 6], R = 0.4: var(Y) = 2, cov(Y, N) = 2, var(N) = 2 (ddof 1)
    # var(R) = (2 - 2*0.4*2 + 0.16*2) / (2 * 5**2) = 0.72 / 50 = 0.0144 -> se 0.12
    assert control.ci_low == pytest.approx(0.4 - Z_95 * 0.12, abs=1e-12)
    assert control.ci_high == pytest.approx(0.4 + Z_95 * 0.12, abs=1e-12)
    assert treatment.defect_rate == 0.2
    assert treatment.ci_low == treatment.ci_high == 0.2  # both users at 1/5: zero variance
    # rr = 1 - 0.2/0.4 = 0.5; var(q) = q^2 (var_t/R_t^2 + var_b/R_b^2) = 0.25 * 0.0144/0.16
    (cmp,) = report.comparisons
    assert (cmp.treatment, cmp.baseline) == ("treatment", "control")
    assert cmp.relative_reduction == pytest.approx(0.5, abs=1e-15)
    se = math.sqrt(0.25 * 0.0144 / 0.16)
    assert se == pytest.approx(0.15)
    assert cmp.ci_low == pytest.approx(0.5 - Z_95 * se, abs=1e-12)
    assert cmp.ci_high == pytest.approx(0.5 + Z_95 * se, abs=1e-12)
    assert cmp.p_value == pytest.approx(2 * 0.00042906, rel=1e-3)  # 2 * (1 - Phi(10/3))
    assert cmp.significant
    assert report.comparison("treatment", "control") == cmp
    assert report.comparison("control", "treatment") is None


def test_ratio_delta_var_matches_textbook_formula() -> None:
    rng = np.random.default_rng(3)
    n = rng.integers(1, 20, size=50).astype(np.float64)
    y = rng.binomial(n.astype(int), 0.3).astype(np.float64)
    rate, var = ratio_delta_var(y, n)
    r = y.sum() / n.sum()
    textbook = (
        np.var(y, ddof=1) - 2 * r * np.cov(y, n, ddof=1)[0, 1] + r * r * np.var(n, ddof=1)
    ) / (len(n) * n.mean() ** 2)
    assert rate == r
    assert var == pytest.approx(textbook, rel=1e-10)
    with pytest.raises(ValueError):
        ratio_delta_var(np.zeros(0), np.zeros(0))


def test_relative_reduction_delta_handles_zero_treatment_rate() -> None:
    rr, se = relative_reduction_delta(0.0, 0.0001, 0.3, 0.0004)
    assert rr == 1.0
    assert se == pytest.approx(math.sqrt(0.0001) / 0.3)
    with pytest.raises(ValueError, match="baseline"):
        relative_reduction_delta(0.1, 0.0, 0.0, 0.0)


def test_cluster_variance_wider_than_naive_binomial() -> None:
    # Strong between-user heterogeneity (kappa = 1): turns of a user are correlated, so the
    # user-clustered se must be clearly larger than the iid-turn binomial se.
    table = synthetic(5, {"control": 0.3}, kappa=1.0, mean_turns=20)
    (arm,) = analyze(table, experiment="exp").arms
    cluster_se = (arm.ci_high - arm.ci_low) / (2 * Z_95)
    naive_se = math.sqrt(arm.defect_rate * (1 - arm.defect_rate) / arm.turns)
    assert cluster_se > 2.0 * naive_se


# ---------------------------------------------------------------------------------------------
# synthetic experiments with a known truth
# ---------------------------------------------------------------------------------------------
def test_delta_ci_agrees_with_bootstrap_and_covers_truth() -> None:
    table = synthetic(1, {"control": 0.30, "treatment": 0.21})
    report = analyze(table, experiment="exp")
    cmp = report.comparison("treatment", "control")
    assert cmp is not None
    boot_lo, boot_hi = bootstrap_relative_reduction(table, "treatment", "control", 1000, seed=0)
    assert cmp.ci_low == pytest.approx(boot_lo, abs=0.02)
    assert cmp.ci_high == pytest.approx(boot_hi, abs=0.02)
    assert (cmp.ci_high - cmp.ci_low) == pytest.approx(boot_hi - boot_lo, rel=0.15)
    assert cmp.ci_low < TRUE_RR < cmp.ci_high
    assert cmp.significant and cmp.p_value < 1e-6
    control = report.arm("control")
    assert control is not None and control.ci_low < 0.30 < control.ci_high
    # the bootstrap is reproducible for a seed
    assert bootstrap_relative_reduction(table, "treatment", "control", 200, seed=7) == (
        bootstrap_relative_reduction(table, "treatment", "control", 200, seed=7)
    )


def test_ci_coverage_over_seeds() -> None:
    covered_rr = covered_rate = 0
    for seed in range(20):
        report = analyze(
            synthetic(100 + seed, {"control": 0.30, "treatment": 0.21}), experiment="exp"
        )
        cmp = report.comparison("treatment", "control")
        control = report.arm("control")
        assert cmp is not None and control is not None
        covered_rr += cmp.ci_low < TRUE_RR < cmp.ci_high
        covered_rate += control.ci_low < 0.30 < control.ci_high
    assert covered_rr >= 17
    assert covered_rate >= 17


def test_aa_comparison_mostly_not_significant() -> None:
    significant = 0
    p_values = []
    for seed in range(20):
        table = synthetic(200 + seed, {"control": 0.30, "treatment": 0.30})
        (cmp,) = analyze(table, experiment="exp").comparisons
        significant += cmp.significant
        p_values.append(cmp.p_value)
        assert cmp.significant == (cmp.p_value < 0.05)  # CI excludes 0 <=> two-sided p < 0.05
    assert significant <= 3
    assert np.median(p_values) > 0.2  # roughly uniform under the null


# ---------------------------------------------------------------------------------------------
# SRM
# ---------------------------------------------------------------------------------------------
def test_srm_flags_60_40_split_configured_as_50_50() -> None:
    table = synthetic(
        9, {"control": 0.3, "treatment": 0.3}, users={"control": 600, "treatment": 400}
    )
    srm = analyze(table, experiment="exp", shares={"control": 0.5, "treatment": 0.5}).srm
    assert srm is not None
    assert srm.observed_users == {"control": 600, "treatment": 400}
    assert srm.chi2 == pytest.approx(40.0)
    assert srm.p_value < 1e-6 and srm.mismatch


def test_srm_not_flagged_when_balanced_and_shares_normalised() -> None:
    table = synthetic(
        9, {"control": 0.3, "treatment": 0.3}, users={"control": 510, "treatment": 490}
    )
    srm = analyze(table, experiment="exp", shares={"control": 1, "treatment": 1}).srm
    assert srm is not None
    assert srm.expected_shares == {"control": 0.5, "treatment": 0.5}
    assert not srm.mismatch and srm.p_value > 0.1
    assert analyze(table, experiment="exp").srm is None  # shares unknown


def test_srm_unconfigured_arm_is_a_mismatch_and_bad_shares_raise() -> None:
    srm = srm_check({"control": 100, "treatment": 100, "rogue": 3}, {"control": 1, "treatment": 1})
    assert srm.observed_users["rogue"] == 3
    assert srm.p_value == 1.0 and srm.mismatch
    with pytest.raises(ValueError):
        srm_check({"control": 1}, {"control": -1.0, "treatment": 2.0})
    with pytest.raises(ValueError):
        srm_check({"control": 1}, {"control": 0.0})
    assert not srm_check({}, {"control": 1.0}).mismatch


# ---------------------------------------------------------------------------------------------
# arms, comparisons, per day, rewrites
# ---------------------------------------------------------------------------------------------
def four_arm_table() -> pa.Table:
    rows = []
    for arm, defects in (("control", 4), ("precomputed", 3), ("global", 3), ("global_personal", 2)):
        for u in range(3):
            rows += user_turns(arm, f"{arm}-{u}", 10, defects + u % 2, day=1 + u % 2)
    return make_table(rows)


def test_arm_order_and_comparisons() -> None:
    table = four_arm_table()
    shares = {"control": 0.25, "precomputed": 0.25, "global": 0.25, "global_personal": 0.25}
    report = analyze(table, experiment="exp", shares=shares)
    assert [a.arm for a in report.arms] == list(shares)
    pairs = [(c.treatment, c.baseline) for c in report.comparisons]
    assert pairs == [
        ("precomputed", "control"),
        ("global", "control"),
        ("global_personal", "control"),
        ("global_personal", "global"),
    ]
    # without shares: control first, then alphabetical
    report = analyze(table, experiment="exp")
    assert [a.arm for a in report.arms] == ["control", "global", "global_personal", "precomputed"]
    # shares order wins over alphabetical; control first even if listed later
    report = analyze(table, experiment="exp", shares={"precomputed": 1, "global": 1, "control": 1})
    assert [a.arm for a in report.arms] == ["control", "precomputed", "global", "global_personal"]
    assert report.srm is not None and report.srm.mismatch  # global_personal unconfigured


def test_per_day_ordered_by_day_then_arm() -> None:
    report = analyze(four_arm_table(), experiment="exp", shares={"control": 1, "precomputed": 1})
    keys = [(d.day, d.stats.arm) for d in report.per_day]
    arm_rank = {a.arm: i for i, a in enumerate(report.arms)}
    assert keys == sorted(keys, key=lambda k: (k[0], arm_rank[k[1]]))
    assert {k[0] for k in keys} == {1, 2}
    day1_control = report.per_day[0].stats
    # control users 0 and 2 are on day 1: 4/10 and 4/10 defects
    assert (day1_control.arm, day1_control.users, day1_control.defect_rate) == ("control", 2, 0.4)
    assert report.day_range == (1, 2)
    assert sum(d.stats.turns for d in report.per_day) == sum(a.turns for a in report.arms)


def test_win_loss_trigger_rate_and_top_rewrites() -> None:
    rows = [
        # control: no rewrites
        *user_turns("control", "c1", 4, 2),
        # treatment: "wether" -> "weather" 3x (2 wins, 1 loss), "lites on" -> "lights on" 2x
        {"arm": "t", "user": "u1", "utterance": "wether", "rewrite": "weather",
         "rewrite_outcome": "win", "timestamp": T0 + timedelta(hours=2)},
        {"arm": "t", "user": "u1", "utterance": "wether", "rewrite": "weather",
         "rewrite_outcome": "win", "timestamp": T0 + timedelta(hours=1)},
        {"arm": "t", "user": "u2", "utterance": "wether", "rewrite": "weather",
         "rewrite_outcome": "loss", "defect": True, "timestamp": T0 + timedelta(hours=3)},
        {"arm": "t", "user": "u2", "utterance": "lites on", "rewrite": "lights on",
         "rewrite_outcome": "tie"},
        {"arm": "t", "user": "u2", "utterance": "lites on", "rewrite": "lights on",
         "rewrite_outcome": None, "rewrite_source": "personal"},
        # same pair from another source is a separate row
        {"arm": "t", "user": "u3", "utterance": "wether", "rewrite": "weather",
         "rewrite_source": "precomputed", "rewrite_outcome": "win"},
        # not rewritten: outcome ignored even if (wrongly) set
        {"arm": "t", "user": "u3", "utterance": "play jazz", "rewrite_outcome": "win"},
    ]  # fmt: skip
    table = make_table(rows)
    report = analyze(table, experiment="exp", top_n=2)
    t = report.arm("t")
    assert t is not None
    assert (t.turns, t.rewrites, t.wins, t.losses) == (7, 6, 3, 1)
    assert t.trigger_rate == 6 / 7
    assert t.win_loss_ratio == 3.0
    control = report.arm("control")
    assert control is not None and control.win_loss_ratio is None and control.trigger_rate == 0
    top = report.top_rewrites
    assert [(r.arm, r.utterance, r.rewrite, r.source, r.count, r.wins, r.losses) for r in top] == [
        ("t", "wether", "weather", "global", 3, 2, 1),
        ("t", "lites on", "lights on", "global", 1, 0, 0),  # tie on count 1: utterance order
    ]
    # earliest by timestamp (turn t00005 at +1h), not the smallest turn_id (t00004 at +2h)
    assert top[0].example_turn_id == "t00005"
    assert len(analyze(table, experiment="exp", top_n=10).top_rewrites) == 4


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------
def test_empty_table_gives_empty_report() -> None:
    report = analyze(empty_outcomes(), experiment="exp", shares={"control": 1, "t": 1})
    assert report.arms == () and report.comparisons == () and report.per_day == ()
    assert report.day_range == (0, 0)
    assert report.srm is not None and not report.srm.mismatch
    json.dumps(report.to_dict())


def test_configured_arm_without_data_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="offline.ab.analysis"):
        report = analyze(
            hand_table(), experiment="exp", shares={"control": 1, "treatment": 1, "x": 1}
        )
    assert [a.arm for a in report.arms] == ["control", "treatment"]
    assert "'x' has no users/turns" in caplog.text
    assert report.srm is not None and report.srm.observed_users["x"] == 0


def test_zero_baseline_rate_omits_comparison(caplog: pytest.LogCaptureFixture) -> None:
    rows = user_turns("control", "a", 5, 0) + user_turns("t", "b", 5, 2)
    with caplog.at_level(logging.WARNING, logger="offline.ab.analysis"):
        report = analyze(make_table(rows), experiment="exp")
    assert report.comparisons == ()
    assert "baseline defect rate is 0" in caplog.text
    assert [a.defect_rate for a in report.arms] == [0.0, 0.4]
    with pytest.raises(ValueError):
        bootstrap_relative_reduction(make_table(rows), "t", "control", n_boot=50)


def test_missing_control_means_no_control_comparisons() -> None:
    rows = user_turns("global", "a", 5, 2) + user_turns("global_personal", "b", 5, 1)
    report = analyze(make_table(rows), experiment="exp")
    assert [(c.treatment, c.baseline) for c in report.comparisons] == [
        ("global_personal", "global")
    ]


def test_single_user_arm_has_zero_width_ci() -> None:
    rows = user_turns("control", "a", 10, 3) + user_turns("t", "b", 10, 1)
    report = analyze(make_table(rows), experiment="exp")
    for arm in report.arms:
        assert arm.users == 1 and arm.ci_low == arm.ci_high == arm.defect_rate
    (cmp,) = report.comparisons
    assert cmp.ci_low == cmp.ci_high == pytest.approx(1 - 0.1 / 0.3)


def test_invalid_table_raises_value_error_naming_column() -> None:
    table = hand_table().drop_columns(["rewritten"])
    with pytest.raises(ValueError, match="rewritten"):
        analyze(table, experiment="exp")
    nulls = hand_table().set_column(3, "user", pa.array([None] * 20, pa.string()))
    with pytest.raises(ValueError, match="user"):
        analyze(nulls, experiment="exp")


def test_rows_of_other_experiments_are_dropped() -> None:
    table = pa.concat_tables([hand_table(), make_table(user_turns("t", "z", 5, 5), "other")])
    assert analyze(table, experiment="exp").arms == analyze(hand_table(), experiment="exp").arms


def test_analyze_filters_days_and_domains() -> None:
    table = synthetic(4, {"control": 0.3, "treatment": 0.25}, users=60, days=3)
    filtered = analyze(table, experiment="exp", day_range=(2, 3), domains=["iot"])
    assert filtered.day_range == (2, 3) and filtered.domains == ("iot",)
    mask = [d in (2, 3) and dom == "iot" for d, dom in zip(
        table.column("day").to_pylist(), table.column("domain").to_pylist(), strict=True
    )]  # fmt: skip
    by_hand = analyze(table.filter(pa.array(mask)), experiment="exp")
    assert filtered.arms == by_hand.arms and filtered.comparisons == by_hand.comparisons
    assert sum(a.turns for a in filtered.arms) == sum(mask)
    with pytest.raises(ValueError):
        analyze(table, experiment="exp", day_range=(3, 2))


# ---------------------------------------------------------------------------------------------
# JSON and the rich report
# ---------------------------------------------------------------------------------------------
def test_to_dict_is_json_ready_rounded_with_display_strings() -> None:
    report = analyze(hand_table(), experiment="exp", shares={"control": 1, "treatment": 1})
    d = json.loads(json.dumps(report.to_dict()))
    assert d["experiment"] == "exp" and d["day_range"] == [1, 1] and d["domains"] == []
    arm = d["arms"][0]
    assert arm["ci_low"] == round(0.4 - Z_95 * 0.12, 6)
    assert arm["display"] == {
        "users": "2",
        "turns": "10",
        "defect_rate": "40.00%",
        "ci": "[16.48%, 63.52%]",
        "trigger_rate": "0.00%",
        "win_loss": "0:0",
    }
    cmp = d["comparisons"][0]
    assert cmp["display"]["relative_reduction"] == "50.00%"
    assert cmp["display"]["p_value"] == "<0.001" and cmp["display"]["significant"] == "yes"
    assert d["per_day"][0]["stats"]["display"]["defect_rate"] == "40.00%"
    assert d["srm"]["observed_users"] == {"control": 2, "treatment": 2}


def test_formatters() -> None:
    assert format_rate(0.1234) == "12.34%"
    assert format_rate(-0.05) == "-5.00%"
    assert format_rate(None) == format_rate(float("nan")) == "n/a"
    assert format_ci(0.1102, 0.137) == "[11.02%, 13.70%]"
    assert format_ratio(25, 2) == "12.5:1"
    assert format_ratio(7, 0) == "7:0"
    assert format_ratio(1, 8) == "0.12:1"
    assert format_p(0.0004) == "<0.001"
    assert format_p(0.0341) == "0.034"
    assert format_p(1.0) == "1.000"
    assert format_count(12345) == "12,345"
    assert format_significant(True) == "yes" and format_significant(False) == "no"


def test_render_report_shows_tables() -> None:
    table = make_table(
        user_turns("control", "a", 4, 1)
        + user_turns("control", "b", 6, 3)
        + [{"arm": "treatment", "user": "c", "utterance": "wether", "rewrite": "weather",
            "rewrite_outcome": "win"}] * 3
        + user_turns("treatment", "d", 5, 1)
    )  # fmt: skip
    report = analyze(table, experiment="exp", shares={"control": 1, "treatment": 1})
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    for expected in ("40.00%", "[16.48%, 63.52%]", "3:0", "wether", "weather", "SRM check: ok"):
        assert expected in text
    cmp = report.comparison("treatment", "control")
    assert cmp is not None and format_rate(cmp.relative_reduction) in text
    empty = Console(record=True, width=120)
    render_report(analyze(empty_outcomes(), experiment="none"), empty)
    assert "no outcomes" in empty.export_text()


def test_report_command_reads_analyzes_renders_and_writes_json(tmp_path: Path) -> None:
    table = synthetic(2, {"control": 0.3, "treatment": 0.2}, users=50, days=2)
    store = OutcomeStore(tmp_path / "store")
    for day in (1, 2):
        store.write_day("exp", day, table.filter(pc.equal(table.column("day"), day)))
    console = Console(record=True, width=200)
    out = tmp_path / "reports" / "exp.json"
    report = report_command(
        tmp_path / "store", "exp", out, (2, 2), ["weather"], {"control": 1, "treatment": 1}, console
    )
    assert isinstance(report, ABReport)
    assert report.day_range == (2, 2) and report.domains == ("weather",)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report.to_dict()))
    assert "A/B report exp" in console.export_text()
    assert [p.name for p in out.parent.iterdir()] == ["exp.json"]  # no temp file left
    # unknown experiment: empty report, no exception
    empty = report_command(tmp_path / "store", "nope", None, None, [], None, Console(record=True))
    assert empty.arms == ()


def test_outcome_schema_is_the_spec() -> None:
    assert OUTCOME_SCHEMA.names == [
        "experiment", "day", "arm", "user", "session_id", "turn_id", "timestamp", "utterance",
        "rewrite", "rewrite_source", "model_version", "domain", "defect", "defect_reasons",
        "true_defect", "rewritten", "rewrite_outcome",
    ]  # fmt: skip
    assert OUTCOME_SCHEMA.field("day").type == pa.int32()
    assert OUTCOME_SCHEMA.field("timestamp").type == pa.timestamp("us", tz="UTC")
