"""A/B statistics over per-turn outcomes: defect rates with user-clustered CIs, relative
reductions, sample-ratio-mismatch check, per-day series and top rewrites.

Method. The defect rate of an arm, R = Σ_u Y_u / Σ_u N_u (Y_u defects and N_u turns of user u),
is a ratio metric whose unit of randomisation is the user: turns of one user are correlated, so
a turn-level binomial variance is too small. Its variance comes from the delta method for ratio
metrics with users as clusters (Deng, Knoblich & Lu 2018, "Applying the Delta Method in Metric
Analytics: A Practical Guide with Novel Ideas", KDD):

    var(R) ≈ (var(Y) − 2·R·cov(Y, N) + R²·var(N)) / (n · mean(N)²)

with sample (co)variances over the arm's n users. The relative reduction of a treatment vs a
baseline is rr = 1 − R_t / R_b; with independent arms the delta method gives
var(R_t / R_b) ≈ (R_t/R_b)² · (var_t / R_t² + var_b / R_b²) (computed as
(var_t + (R_t/R_b)²·var_b) / R_b², which stays finite when R_t = 0). 95% CIs are estimate ±
1.959964·se; p-values are two-sided normal tests of rr = 0. The SRM check is a chi-square
goodness-of-fit test of users per arm against the configured traffic shares.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from offline.ab.schema import validate_outcomes

log = logging.getLogger(__name__)

Z_95 = 1.959964
"""Two-sided 95% normal quantile."""
SRM_ALPHA = 0.001
"""SRM is flagged when the chi-square p-value is below this."""
PERSONAL_PAIR = ("global_personal", "global")
"""(treatment, baseline) compared in addition to every arm vs control, when both exist."""

FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# result types
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmStats:
    """Overall metrics of one arm (or one arm on one day).

    ``defect_rate`` = defects / turns; ``ci_low``/``ci_high`` its 95% CI with users as clusters
    (delta method), clipped to [0, 1]; ``rewrites`` turns with ``rewritten``; ``trigger_rate`` =
    rewrites / turns; ``wins``/``losses`` rewritten turns whose ``rewrite_outcome`` is
    ``win``/``loss``; ``win_loss_ratio`` = wins / losses, None when losses == 0.
    """

    arm: str
    users: int
    turns: int
    defects: int
    defect_rate: float
    ci_low: float
    ci_high: float
    rewrites: int
    trigger_rate: float
    wins: int
    losses: int
    win_loss_ratio: float | None


@dataclass(frozen=True)
class Comparison:
    """Treatment vs baseline (control, or ``global`` for ``global_personal``).

    ``relative_reduction`` = 1 − rate_t / rate_b (positive = fewer defects) with its 95% CI
    (delta method on the ratio of two cluster-ratio means); ``p_value`` two-sided z test of
    rr = 0; ``significant`` when the CI excludes 0.
    """

    treatment: str
    baseline: str
    relative_reduction: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool


@dataclass(frozen=True)
class DayArmStats:
    """:class:`ArmStats` of one arm restricted to one day."""

    day: int
    stats: ArmStats


@dataclass(frozen=True)
class TopRewrite:
    """A frequent (utterance → rewrite) pair of an arm, with its counts.

    ``source`` is ``rewrite_source`` ('' when null); ``example_turn_id`` the earliest such turn
    (by timestamp, then turn_id).
    """

    arm: str
    utterance: str
    rewrite: str
    source: str
    count: int
    wins: int
    losses: int
    example_turn_id: str


@dataclass(frozen=True)
class SrmCheck:
    """Sample-ratio-mismatch check: chi-square of users per arm vs configured shares.

    ``expected_shares`` normalised to sum 1; ``observed_users`` users per arm (arms with users
    but no configured share are included and force ``mismatch``); ``mismatch`` when
    p < :data:`SRM_ALPHA`.
    """

    expected_shares: dict[str, float]
    observed_users: dict[str, int]
    chi2: float
    p_value: float
    mismatch: bool


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


@dataclass(frozen=True)
class ABReport:
    """Everything the CLI report and the dashboard show for one experiment (and filter).

    ``day_range`` is the requested inclusive range, or the (min, max) day present when none was
    requested ((0, 0) for no data); ``domains`` the domain filter (() = all). ``arms`` are in
    arm order (control first, then the order of ``shares``, then unconfigured arms
    alphabetically); arms without turns are left out. ``comparisons``: each arm vs control, plus
    ``global_personal`` vs ``global`` when both exist. ``per_day`` is ordered by day, then arm
    order. ``top_rewrites``: top ``top_n`` per arm by count (ties: utterance). ``srm`` is None
    when shares are unknown.
    """

    experiment: str
    control: str
    day_range: tuple[int, int]
    domains: tuple[str, ...]
    arms: tuple[ArmStats, ...]
    comparisons: tuple[Comparison, ...]
    per_day: tuple[DayArmStats, ...]
    top_rewrites: tuple[TopRewrite, ...]
    srm: SrmCheck | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the dataclass fields (tuples as lists, floats rounded to 6 decimals,
        non-finite floats as null), plus a ``display`` dict on every arm, per-day arm and
        comparison holding the human strings of :mod:`offline.ab.report` (the exact strings the
        CLI and the dashboard show, so tests can compare them without re-rounding)."""
        from offline.ab import report as fmt  # lazy: report imports this module

        out: dict[str, Any] = _json_ready(dataclasses.asdict(self))
        for arm_d, arm in zip(out["arms"], self.arms, strict=True):
            arm_d["display"] = fmt.arm_display(arm)
        for day_d, day in zip(out["per_day"], self.per_day, strict=True):
            day_d["stats"]["display"] = fmt.arm_display(day.stats)
        for cmp_d, cmp in zip(out["comparisons"], self.comparisons, strict=True):
            cmp_d["display"] = fmt.comparison_display(cmp)
        return out

    def comparison(self, treatment: str, baseline: str) -> Comparison | None:
        """The comparison of ``treatment`` vs ``baseline``, or None when not computed."""
        for c in self.comparisons:
            if c.treatment == treatment and c.baseline == baseline:
                return c
        return None

    def arm(self, name: str) -> ArmStats | None:
        """Overall stats of arm ``name``, or None when it has no turns."""
        for a in self.arms:
            if a.arm == name:
                return a
        return None


# ---------------------------------------------------------------------------------------------
# per-user aggregation and the delta method
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _UserAgg:
    """Per-user sums of one arm (one entry per user, sorted by user key)."""

    defects: FloatArray
    turns: FloatArray
    rewrites: int
    wins: int
    losses: int


def _with_indicators(table: pa.Table) -> pa.Table:
    outcome = table.column("rewrite_outcome")
    rewritten = table.column("rewritten")
    win = pc.and_kleene(rewritten, pc.fill_null(pc.equal(outcome, "win"), False))
    loss = pc.and_kleene(rewritten, pc.fill_null(pc.equal(outcome, "loss"), False))
    return pa.Table.from_arrays(
        [
            *table.columns,
            pc.cast(table.column("defect"), pa.int64()),
            pc.cast(rewritten, pa.int64()),
            pc.cast(win, pa.int64()),
            pc.cast(loss, pa.int64()),
        ],
        names=[*table.column_names, "_defect", "_rewritten", "_win", "_loss"],
    )


def _user_aggregates(table: pa.Table, keys: Sequence[str]) -> dict[tuple[Any, ...], _UserAgg]:
    """Group ``table`` (with indicator columns) by ``keys`` + user; returns per-group arrays."""
    if table.num_rows == 0:
        return {}
    grouped = table.group_by([*keys, "user"]).aggregate(
        [
            ("_defect", "sum"),
            ("_defect", "count"),
            ("_rewritten", "sum"),
            ("_win", "sum"),
            ("_loss", "sum"),
        ]
    )
    grouped = grouped.sort_by([(k, "ascending") for k in [*keys, "user"]])
    key_cols = [grouped.column(k).to_pylist() for k in keys]
    defects = grouped.column("_defect_sum").to_numpy().astype(np.float64)
    turns = grouped.column("_defect_count").to_numpy().astype(np.float64)
    rewrites = grouped.column("_rewritten_sum").to_numpy()
    wins = grouped.column("_win_sum").to_numpy()
    losses = grouped.column("_loss_sum").to_numpy()
    group_ids: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(zip(*key_cols, strict=True)):
        group_ids.setdefault(tuple(key), []).append(i)
    out: dict[tuple[Any, ...], _UserAgg] = {}
    for key, ids in group_ids.items():
        idx = np.asarray(ids)
        out[key] = _UserAgg(
            defects=defects[idx],
            turns=turns[idx],
            rewrites=int(rewrites[idx].sum()),
            wins=int(wins[idx].sum()),
            losses=int(losses[idx].sum()),
        )
    return out


def ratio_delta_var(defects: FloatArray, turns: FloatArray) -> tuple[float, float]:
    """Ratio metric R = ΣY/ΣN over clusters and its delta-method variance.

    Args:
        defects: Y_u per cluster (user), shape (n,).
        turns: N_u per cluster, shape (n,), ΣN > 0.

    Returns:
        ``(R, var(R))`` with var(R) = (var(Y) − 2R·cov(Y,N) + R²·var(N)) / (n·mean(N)²), sample
        (co)variances with ddof=1 (Deng, Knoblich & Lu 2018). With a single cluster the variance
        is not estimable and is returned as 0 (the CI collapses to the point estimate).

    Raises:
        ValueError: empty input or ΣN == 0.
    """
    n = len(turns)
    total = float(turns.sum())
    if n == 0 or total <= 0:
        raise ValueError("ratio metric needs at least one cluster with turns")
    rate = float(defects.sum()) / total
    if n < 2:
        return rate, 0.0
    # var(Y) − 2R cov(Y,N) + R² var(N) == var(Y − R·N); computing it that way is stabler.
    resid_var = float(np.var(defects - rate * turns, ddof=1))
    mean_n = total / n
    return rate, max(resid_var, 0.0) / (n * mean_n * mean_n)


def _arm_stats(arm: str, agg: _UserAgg) -> ArmStats:
    rate, var = ratio_delta_var(agg.defects, agg.turns)
    se = math.sqrt(var)
    turns = int(agg.turns.sum())
    return ArmStats(
        arm=arm,
        users=len(agg.turns),
        turns=turns,
        defects=int(agg.defects.sum()),
        defect_rate=rate,
        ci_low=max(0.0, rate - Z_95 * se),
        ci_high=min(1.0, rate + Z_95 * se),
        rewrites=agg.rewrites,
        trigger_rate=agg.rewrites / turns,
        wins=agg.wins,
        losses=agg.losses,
        win_loss_ratio=agg.wins / agg.losses if agg.losses else None,
    )


def relative_reduction_delta(
    rate_t: float, var_t: float, rate_b: float, var_b: float
) -> tuple[float, float]:
    """Relative reduction rr = 1 − rate_t/rate_b of independent arms and its delta-method se.

    var(rate_t/rate_b) ≈ (rate_t/rate_b)²·(var_t/rate_t² + var_b/rate_b²), evaluated as
    (var_t + (rate_t/rate_b)²·var_b) / rate_b² so that rate_t = 0 is fine.

    Returns:
        ``(rr, se)``.

    Raises:
        ValueError: ``rate_b`` <= 0 (rr undefined).
    """
    if rate_b <= 0:
        raise ValueError("relative reduction is undefined for a baseline rate of 0")
    q = rate_t / rate_b
    var_q = (var_t + q * q * var_b) / (rate_b * rate_b)
    return 1.0 - q, math.sqrt(max(var_q, 0.0))


def _compare(treatment: str, t: _UserAgg, baseline: str, b: _UserAgg) -> Comparison | None:
    rate_t, var_t = ratio_delta_var(t.defects, t.turns)
    rate_b, var_b = ratio_delta_var(b.defects, b.turns)
    if rate_b <= 0:
        log.warning(
            "%s vs %s: baseline defect rate is 0, relative reduction undefined; comparison omitted",
            treatment,
            baseline,
        )
        return None
    rr, se = relative_reduction_delta(rate_t, var_t, rate_b, var_b)
    # se == 0 (single-user arms): a point mass; p is 1 for no difference, else 0.
    p = float(2.0 * stats.norm.sf(abs(rr / se))) if se > 0 else float(rr == 0.0)
    lo, hi = rr - Z_95 * se, rr + Z_95 * se
    return Comparison(
        treatment=treatment,
        baseline=baseline,
        relative_reduction=rr,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        significant=lo > 0 or hi < 0,
    )


# ---------------------------------------------------------------------------------------------
# filters, arm order, SRM, top rewrites
# ---------------------------------------------------------------------------------------------
def filter_outcomes(
    table: pa.Table,
    day_range: tuple[int, int] | None = None,
    domains: Sequence[str] | None = None,
) -> pa.Table:
    """Rows with ``day`` in the inclusive ``day_range`` and ``domain`` in ``domains`` — the same
    semantics as :meth:`offline.ab.store.OutcomeStore.read` (None/empty = no filter; a domain
    filter drops null domains).

    Raises:
        ValueError: ``day_range`` with first > last.
    """
    mask: pa.ChunkedArray | None = None
    if day_range is not None:
        lo, hi = day_range
        if lo > hi:
            raise ValueError(f"day_range first > last: {day_range}")
        day = table.column("day")
        mask = pc.and_(pc.greater_equal(day, lo), pc.less_equal(day, hi))
    if domains:
        in_domains = pc.fill_null(
            pc.is_in(table.column("domain"), value_set=pa.array(list(domains), pa.string())),
            False,
        )
        mask = in_domains if mask is None else pc.and_(mask, in_domains)
    return table if mask is None else table.filter(mask)


def arm_order(
    observed: Sequence[str], control: str, shares: Mapping[str, float] | None
) -> list[str]:
    """Display/analysis order of arms: ``control`` first, then the keys of ``shares`` in their
    order (when given), then other observed arms alphabetically. Includes configured arms that
    have no data (callers skip those)."""
    order = [control]
    if shares:
        order += [a for a in shares if a != control]
    order += sorted(a for a in set(observed) if a not in order)
    return order


def srm_check(observed_users: Mapping[str, int], shares: Mapping[str, float]) -> SrmCheck:
    """Chi-square goodness of fit of users per arm against the configured ``shares``.

    Shares are normalised to sum 1; arms with share 0 are left out of the test. Users in arms
    without a (positive) configured share make it a mismatch whatever the p-value (the
    assignment is broken). No users at all: chi2 0, p 1, no mismatch.

    Raises:
        ValueError: a negative share, or no positive share.
    """
    if any(s < 0 for s in shares.values()):
        raise ValueError(f"negative traffic share in {dict(shares)}")
    total_share = float(sum(shares.values()))
    if total_share <= 0:
        raise ValueError("traffic shares must have a positive sum")
    expected = {a: float(s) / total_share for a, s in shares.items()}
    tested = [a for a, s in expected.items() if s > 0]
    observed = {a: int(observed_users.get(a, 0)) for a in expected}
    for a, n in observed_users.items():
        if a not in observed:
            observed[a] = int(n)
    unexpected = sorted(a for a, n in observed.items() if n > 0 and expected.get(a, 0.0) <= 0)
    n_tested = sum(observed[a] for a in tested)
    if n_tested == 0:
        chi2, p = 0.0, 1.0
    else:
        f_obs = np.array([observed[a] for a in tested], dtype=np.float64)
        f_exp = np.array([expected[a] for a in tested]) * n_tested
        res = stats.chisquare(f_obs, f_exp)
        chi2, p = float(res.statistic), float(res.pvalue)
    mismatch = p < SRM_ALPHA or bool(unexpected)
    if unexpected:
        log.warning("SRM: users in arms without a configured share: %s", ", ".join(unexpected))
    if mismatch:
        log.warning("sample ratio mismatch: chi2=%.3f p=%.3g users=%s", chi2, p, observed)
    return SrmCheck(
        expected_shares=expected, observed_users=observed, chi2=chi2, p_value=p, mismatch=mismatch
    )


def top_rewrites(table: pa.Table, arms: Sequence[str], top_n: int = 10) -> list[TopRewrite]:
    """Most frequent (utterance, rewrite, rewrite_source) of the rewritten turns, per arm.

    Args:
        table: validated outcomes.
        arms: arms to report, in output order.
        top_n: rows per arm, ranked by count (descending), then utterance, rewrite, source.

    Returns:
        TopRewrite rows, grouped by arm in ``arms`` order. Null utterance/rewrite/source are
        reported as ''. ``example_turn_id`` is the earliest turn (timestamp, then turn_id).
    """
    rewritten = table.filter(pc.fill_null(table.column("rewritten"), False))
    if rewritten.num_rows == 0 or top_n <= 0:
        return []
    outcome = rewritten.column("rewrite_outcome")
    keyed = pa.table(
        {
            "arm": rewritten.column("arm"),
            "utterance": pc.fill_null(rewritten.column("utterance"), ""),
            "rewrite": pc.fill_null(rewritten.column("rewrite"), ""),
            "source": pc.fill_null(rewritten.column("rewrite_source"), ""),
            "timestamp": rewritten.column("timestamp"),
            "turn_id": rewritten.column("turn_id"),
            "win": pc.cast(pc.fill_null(pc.equal(outcome, "win"), False), pa.int64()),
            "loss": pc.cast(pc.fill_null(pc.equal(outcome, "loss"), False), pa.int64()),
        }
    )
    keyed = keyed.sort_by([("timestamp", "ascending"), ("turn_id", "ascending")])
    keys = ["arm", "utterance", "rewrite", "source"]
    grouped = keyed.group_by(keys, use_threads=False).aggregate(
        [("turn_id", "count"), ("win", "sum"), ("loss", "sum"), ("turn_id", "first")]
    )
    grouped = grouped.sort_by(
        [
            ("arm", "ascending"),
            ("turn_id_count", "descending"),
            ("utterance", "ascending"),
            ("rewrite", "ascending"),
            ("source", "ascending"),
        ]
    )
    by_arm: dict[str, list[TopRewrite]] = {}
    for row in grouped.to_pylist():
        rows = by_arm.setdefault(row["arm"], [])
        if len(rows) < top_n:
            rows.append(
                TopRewrite(
                    arm=row["arm"],
                    utterance=row["utterance"],
                    rewrite=row["rewrite"],
                    source=row["source"],
                    count=int(row["turn_id_count"]),
                    wins=int(row["win_sum"]),
                    losses=int(row["loss_sum"]),
                    example_turn_id=row["turn_id_first"],
                )
            )
    return [r for arm in arms for r in by_arm.get(arm, [])]


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def analyze(
    table: pa.Table,
    *,
    experiment: str,
    control: str = "control",
    shares: Mapping[str, float] | None = None,
    day_range: tuple[int, int] | None = None,
    domains: Sequence[str] | None = None,
    top_n: int = 10,
) -> ABReport:
    """Analyze the per-turn outcomes of one experiment.

    Args:
        table: outcome rows (:data:`~offline.ab.schema.OUTCOME_SCHEMA`; validated and cast).
            Rows of other experiments are dropped (logged).
        experiment: experiment name.
        control: the control arm.
        shares: configured traffic share per arm (any positive scale; normalised). Gives the
            arm order and enables the SRM check; None = unknown (``srm`` None).
        day_range: inclusive (first, last) day filter; None = all days.
        domains: domain filter (rows with a null domain are dropped by it); None/empty = all.
            Filtering here equals filtering in :meth:`~offline.ab.store.OutcomeStore.read`.
        top_n: top rewrites per arm.

    Returns:
        The :class:`ABReport`. Arms without turns are skipped (logged); a comparison whose
        baseline rate is 0 is omitted (logged); an arm with one user gets a zero-width CI
        (variance not estimable from one cluster).

    Raises:
        ValueError: invalid table (missing column, nulls in required columns), bad
            ``day_range`` or ``shares``.
    """
    valid = validate_outcomes(table)
    if valid.num_rows:
        same = pc.equal(valid.column("experiment"), experiment)
        kept = valid.filter(same)
        if kept.num_rows != valid.num_rows:
            log.warning(
                "analyze(%r): dropped %d rows of other experiments",
                experiment,
                valid.num_rows - kept.num_rows,
            )
        valid = kept
    data = _with_indicators(filter_outcomes(valid, day_range, domains))
    if day_range is None:
        if data.num_rows:
            mm = pc.min_max(data.column("day")).as_py()
            report_days = (int(mm["min"]), int(mm["max"]))
        else:
            report_days = (0, 0)
    else:
        report_days = (int(day_range[0]), int(day_range[1]))

    observed = sorted(set(data.column("arm").to_pylist())) if data.num_rows else []
    order = arm_order(observed, control, shares)
    per_arm = {k[0]: v for k, v in _user_aggregates(data, ["arm"]).items()}
    for arm in order:
        if arm not in per_arm:
            log.warning("experiment %r: arm %r has no users/turns; skipped", experiment, arm)
    arms = tuple(_arm_stats(a, per_arm[a]) for a in order if a in per_arm)
    _warn_cross_arm_users(data)

    comparisons: list[Comparison] = []
    pairs: list[tuple[str, str]] = []
    if control in per_arm:
        pairs += [(a, control) for a in order if a != control and a in per_arm]
    elif per_arm:
        log.warning(
            "experiment %r: no data for control arm %r; no comparisons", experiment, control
        )
    t_name, b_name = PERSONAL_PAIR
    if t_name in per_arm and b_name in per_arm and (t_name, b_name) not in pairs:
        pairs.append((t_name, b_name))
    for t, b in pairs:
        cmp = _compare(t, per_arm[t], b, per_arm[b])
        if cmp is not None:
            comparisons.append(cmp)

    per_day_aggs = _user_aggregates(data, ["day", "arm"])
    rank = {a: i for i, a in enumerate(order)}
    day_keys = sorted(per_day_aggs, key=lambda k: (k[0], rank[k[1]]))
    per_day = tuple(
        DayArmStats(day=int(day), stats=_arm_stats(arm, per_day_aggs[(day, arm)]))
        for day, arm in day_keys
    )

    srm = None
    if shares is not None:
        srm = srm_check({a.arm: a.users for a in arms}, shares)

    return ABReport(
        experiment=experiment,
        control=control,
        day_range=report_days,
        domains=tuple(domains or ()),
        arms=arms,
        comparisons=tuple(comparisons),
        per_day=per_day,
        top_rewrites=tuple(top_rewrites(data, [a.arm for a in arms], top_n)),
        srm=srm,
    )


def _warn_cross_arm_users(data: pa.Table) -> None:
    if data.num_rows == 0:
        return
    pairs = data.group_by(["user", "arm"]).aggregate([])
    n_users = pc.count_distinct(pairs.column("user")).as_py()
    if n_users != pairs.num_rows:
        log.warning(
            "%d user(s) appear in more than one arm; each (arm, user) is treated as a cluster",
            pairs.num_rows - n_users,
        )


# ---------------------------------------------------------------------------------------------
# bootstrap cross-check
# ---------------------------------------------------------------------------------------------
def _arm_user_arrays(table: pa.Table, arm: str) -> _UserAgg:
    data = _with_indicators(validate_outcomes(table))
    aggs = _user_aggregates(data.filter(pc.equal(data.column("arm"), arm)), ["arm"])
    if (arm,) not in aggs or aggs[(arm,)].turns.sum() <= 0:
        raise ValueError(f"arm {arm!r} has no turns")
    return aggs[(arm,)]


def _bootstrap_rates(agg: _UserAgg, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """Rates of ``n_boot`` resamples of the users (with replacement), chunked to bound memory."""
    n = len(agg.turns)
    chunk = max(1, 4_000_000 // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        y = agg.defects[idx].sum(axis=1)
        t = agg.turns[idx].sum(axis=1)
        out[start:stop] = y / t
    return out


def bootstrap_relative_reduction(
    table: pa.Table, treatment: str, baseline: str, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of rr = 1 − rate_t/rate_b (cross-check of the delta method).

    Users are resampled with replacement within each arm (``numpy.random.default_rng(seed)``);
    resamples whose baseline rate is 0 are ignored.

    Returns:
        ``(ci_low, ci_high)``: the 2.5th and 97.5th percentiles of the bootstrap rr.

    Raises:
        ValueError: an arm without turns, or every resampled baseline rate is 0.
    """
    t = _arm_user_arrays(table, treatment)
    b = _arm_user_arrays(table, baseline)
    rng = np.random.default_rng(seed)
    rates_t = _bootstrap_rates(t, n_boot, rng)
    rates_b = _bootstrap_rates(b, n_boot, rng)
    ok = rates_b > 0
    if not ok.any():
        raise ValueError(f"baseline {baseline!r} has a defect rate of 0 in every resample")
    rr = 1.0 - rates_t[ok] / rates_b[ok]
    lo, hi = np.percentile(rr, [2.5, 97.5])
    return float(lo), float(hi)
