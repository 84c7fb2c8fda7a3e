"""Defect dashboard for an A/B experiment: a Dash (plotly) app over the outcome store.

The page shows, for one experiment in an :class:`~offline.ab.store.OutcomeStore`:

- filters: a day-range slider (``day-range``) and a multi-select of domains
  (``domain-filter``; empty = all domains, like ``qrw ab report`` without ``--domain``);
- ``summary-table``: per arm turns, users, defect rate, its 95% CI, trigger rate, win/loss;
- ``comparison-table``: each treatment vs its baseline, relative reduction, 95% CI, p-value,
  significance;
- ``defect-rate-graph``: defect rate per arm and day with 95% CI bands;
- ``reduction-graph``: relative reduction per comparison with 95% CI error bars, significant
  bars coloured (green = fewer defects, red = more) and starred;
- ``top-rewrites-table``: most frequent rewrites per arm with wins/losses and an example turn id;
- ``srm-status``: the sample-ratio-mismatch check when arm shares are known.

Every filter change runs one callback that recomputes everything with
``analysis.analyze(store.read(experiment, day_range, domains), ...)`` — the same code path as the
CLI — and renders every number with :mod:`offline.ab.report`'s formatters, so the strings in the
browser equal those of ``qrw ab report``.

Run: ``python -m offline.ab.dashboard --store DIR --experiment NAME --port 8050`` (serves on
127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dash
import plotly.graph_objects as go  # type: ignore[import-untyped]
from dash import Input, Output, dcc, html

from offline.ab.analysis import ABReport, analyze
from offline.ab.report import (
    arm_display,
    comparison_display,
    format_ci,
    format_count,
    format_p,
    format_rate,
)
from offline.ab.store import OutcomeStore

log = logging.getLogger(__name__)

__all__ = [
    "COMPARISON_COLUMNS",
    "ELEMENT_IDS",
    "SUMMARY_COLUMNS",
    "TOP_REWRITE_COLUMNS",
    "DashboardView",
    "comparison_rows",
    "compute_view",
    "create_app",
    "defect_rate_figure",
    "main",
    "make_update",
    "reduction_figure",
    "serve",
    "summary_rows",
    "top_rewrite_rows",
]

#: Ids of the page elements (the browser test and any automation rely on them).
ELEMENT_IDS: tuple[str, ...] = (
    "title",
    "day-range",
    "domain-filter",
    "defect-rate-graph",
    "reduction-graph",
    "summary-table",
    "comparison-table",
    "top-rewrites-table",
    "srm-status",
    "status",
)

#: Column headers of the tables, in display order (row dicts use the same keys).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "arm",
    "users",
    "turns",
    "defect rate",
    "95% CI",
    "trigger rate",
    "win:loss",
)
COMPARISON_COLUMNS: tuple[str, ...] = (
    "treatment",
    "baseline",
    "relative reduction",
    "95% CI",
    "p-value",
    "significant",
)
TOP_REWRITE_COLUMNS: tuple[str, ...] = (
    "arm",
    "utterance",
    "rewrite",
    "source",
    "count",
    "wins",
    "losses",
    "example turn",
)

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692")
_SIG_BETTER, _SIG_WORSE, _NOT_SIG = "#2ca02c", "#d62728", "#9e9e9e"
_RATE_TITLE = "Defect rate per day (95% CI bands)"
_REDUCTION_TITLE = "Relative reduction vs baseline (95% CI)"

Row = dict[str, str]


@dataclass(frozen=True)
class DashboardView:
    """Everything the page shows for one filter setting (strings already formatted).

    When the filter selects no turns the rows are empty and ``status`` says so.
    """

    report: ABReport
    summary: list[Row]
    comparisons: list[Row]
    top_rewrites: list[Row]
    defect_rate_figure: go.Figure
    reduction_figure: go.Figure
    srm_text: str
    status: str


# --------------------------------------------------------------------------- rows


def summary_rows(report: ABReport) -> list[Row]:
    """Per-arm rows of ``summary-table`` (keys: :data:`SUMMARY_COLUMNS`): the strings of
    :func:`offline.ab.report.arm_display` (= the JSON report's ``display``), the win:loss cell
    as the CLI prints it, ``"12.5:1 (25/2)"``."""
    rows = []
    for a in report.arms:
        d = arm_display(a)
        rows.append(
            {
                "arm": a.arm,
                "users": d["users"],
                "turns": d["turns"],
                "defect rate": d["defect_rate"],
                "95% CI": d["ci"],
                "trigger rate": d["trigger_rate"],
                "win:loss": f"{d['win_loss']} ({a.wins}/{a.losses})",
            }
        )
    return rows


def comparison_rows(report: ABReport) -> list[Row]:
    """Rows of ``comparison-table`` (keys: :data:`COMPARISON_COLUMNS`): the strings of
    :func:`offline.ab.report.comparison_display`; relative reduction is 1 − rate_t / rate_b."""
    rows = []
    for c in report.comparisons:
        d = comparison_display(c)
        rows.append(
            {
                "treatment": c.treatment,
                "baseline": c.baseline,
                "relative reduction": d["relative_reduction"],
                "95% CI": d["ci"],
                "p-value": d["p_value"],
                "significant": d["significant"],
            }
        )
    return rows


def top_rewrite_rows(report: ABReport) -> list[Row]:
    """Rows of ``top-rewrites-table`` (keys: :data:`TOP_REWRITE_COLUMNS`), in report order."""
    return [
        {
            "arm": t.arm,
            "utterance": t.utterance,
            "rewrite": t.rewrite,
            "source": t.source,
            "count": format_count(t.count),
            "wins": format_count(t.wins),
            "losses": format_count(t.losses),
            "example turn": t.example_turn_id,
        }
        for t in report.top_rewrites
    ]


# --------------------------------------------------------------------------- figures


def _arm_colours(arms: Sequence[str]) -> dict[str, str]:
    return {arm: _PALETTE[i % len(_PALETTE)] for i, arm in enumerate(arms)}


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _empty_figure(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        template="plotly_white",
        xaxis={"visible": False},
        yaxis={"visible": False},
        annotations=[
            {"text": message, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5}
        ],
    )
    return fig


def defect_rate_figure(report: ABReport) -> go.Figure:
    """Defect rate per arm over days (lines) with shaded 95% CI bands (users as clusters)."""
    title = _RATE_TITLE
    arms = [a.arm for a in report.arms]
    colours = _arm_colours(arms)
    fig = go.Figure()
    for arm in arms:
        points = sorted((d.day, d.stats) for d in report.per_day if d.stats.arm == arm)
        if not points:
            continue
        days = [day for day, _ in points]
        rates = [s.defect_rate for _, s in points]
        lows = [s.ci_low for _, s in points]
        highs = [s.ci_high for _, s in points]
        colour = colours[arm]
        fig.add_trace(  # CI band: upper edge forward, lower edge back, filled polygon
            go.Scatter(
                x=days + days[::-1],
                y=highs + lows[::-1],
                fill="toself",
                fillcolor=_rgba(colour, 0.12),
                mode="lines",
                line={"width": 0, "color": colour},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=arm,
                name=f"{arm} 95% CI",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=days,
                y=rates,
                mode="lines+markers",
                line={"color": colour, "width": 2},
                name=arm,
                legendgroup=arm,
                customdata=[
                    [format_rate(s.defect_rate), format_ci(s.ci_low, s.ci_high)] for _, s in points
                ],
                hovertemplate=(
                    f"{arm}<br>day %{{x}}<br>defect rate %{{customdata[0]}}"
                    "<br>95% CI %{customdata[1]}<extra></extra>"
                ),
            )
        )
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        xaxis={"title": "day", "dtick": 1},
        yaxis={"title": "defect rate", "tickformat": ".0%", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 50, "l": 60, "r": 20, "b": 40},
        hovermode="closest",
    )
    return fig


def reduction_figure(report: ABReport) -> go.Figure:
    """Relative defect reduction of each comparison as bars with 95% CI error bars.

    Significant comparisons (CI excludes 0) are green (fewer defects) or red (more defects) and
    starred in the label; the others are grey and marked "n.s.".
    """
    title = _REDUCTION_TITLE
    if not report.comparisons:
        return _empty_figure(title, "no comparisons (need a baseline arm and a treatment arm)")
    labels, values, plus, minus, colours, hover = [], [], [], [], [], []
    for c in report.comparisons:
        star = " *" if c.significant else " (n.s.)"
        labels.append(
            f"{c.treatment}<br>vs {c.baseline}<br><b>{format_rate(c.relative_reduction)}{star}</b>"
        )
        values.append(c.relative_reduction)
        plus.append(max(c.ci_high - c.relative_reduction, 0.0))
        minus.append(max(c.relative_reduction - c.ci_low, 0.0))
        if not c.significant:
            colours.append(_NOT_SIG)
        else:
            colours.append(_SIG_BETTER if c.relative_reduction > 0 else _SIG_WORSE)
        sig = "significant" if c.significant else "not significant"
        hover.append(
            f"{c.treatment} vs {c.baseline}<br>relative reduction "
            f"{format_rate(c.relative_reduction)}<br>95% CI {format_ci(c.ci_low, c.ci_high)}"
            f"<br>p {format_p(c.p_value)} ({sig})"
        )
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=values,
            marker_color=colours,
            error_y={"type": "data", "array": plus, "arrayminus": minus, "visible": True},
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        yaxis={"title": "1 − rate_t / rate_b", "tickformat": ".0%", "zeroline": True},
        xaxis={"tickangle": 0},
        margin={"t": 60, "l": 60, "r": 20, "b": 90},
        showlegend=False,
        annotations=[
            {
                "text": "green/red: significant (95% CI excludes 0), fewer/more defects; "
                "grey: n.s.",
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 0,
                "y": -0.32,
                "xanchor": "left",
                "font": {"size": 11, "color": "#555"},
            }
        ],
    )
    return fig


# --------------------------------------------------------------------------- view


def _normalise_filters(
    all_days: Sequence[int], day_value: Sequence[int] | None, domain_value: Sequence[str] | None
) -> tuple[tuple[int, int] | None, list[str] | None]:
    """Slider/dropdown values -> ``store.read`` filters; the full range / no domain -> None."""
    day_range: tuple[int, int] | None = None
    if day_value is not None and len(day_value) == 2 and all_days:
        lo, hi = sorted((int(day_value[0]), int(day_value[1])))
        if (lo, hi) != (min(all_days), max(all_days)):
            day_range = (lo, hi)
    domains = sorted(set(domain_value)) if domain_value else None
    return day_range, domains


def compute_view(
    store: OutcomeStore,
    experiment: str,
    shares: Mapping[str, float] | None,
    day_value: Sequence[int] | None,
    domain_value: Sequence[str] | None,
) -> DashboardView:
    """Recompute the whole page for a filter setting.

    ``day_value`` is the slider's ``[first, last]`` (inclusive; the full range or None means no
    day filter), ``domain_value`` the selected domains (empty/None = all). Runs
    ``analyze(store.read(experiment, day_range, domains), experiment=..., shares=...,
    day_range=..., domains=...)`` and formats the result. When the filter selects no turns
    the tables are empty and ``status`` says so.

    Raises:
        ValueError: from ``analyze`` (invalid outcomes or ``shares``).
    """
    day_range, domains = _normalise_filters(store.days(experiment), day_value, domain_value)
    table = store.read(experiment, day_range, domains)
    report = analyze(
        table, experiment=experiment, shares=shares, day_range=day_range, domains=domains
    )
    days = f"days {report.day_range[0]}–{report.day_range[1]}" if table.num_rows else "no days"
    scope = f"{days}, {'domains: ' + ', '.join(domains) if domains else 'all domains'}"
    if not report.arms:
        status = f"No turns for {scope}."
        return DashboardView(
            report=report,
            summary=[],
            comparisons=[],
            top_rewrites=[],
            defect_rate_figure=_empty_figure(_RATE_TITLE, status),
            reduction_figure=_empty_figure(_REDUCTION_TITLE, status),
            srm_text="",
            status=status,
        )
    log.debug("dashboard: %d turns analysed for %s", table.num_rows, scope)
    return DashboardView(
        report=report,
        summary=summary_rows(report),
        comparisons=comparison_rows(report),
        top_rewrites=top_rewrite_rows(report),
        defect_rate_figure=defect_rate_figure(report),
        reduction_figure=reduction_figure(report),
        srm_text=_srm_text(report),
        status=f"{format_count(table.num_rows)} turns, {scope}.",
    )


def _srm_text(report: ABReport) -> str:
    """The CLI's SRM line (without rich markup)."""
    srm = report.srm
    if srm is None:
        return "SRM check: skipped (traffic shares unknown)"
    observed = ", ".join(
        f"{arm} {format_count(n)} ({format_rate(srm.expected_shares.get(arm, 0.0))} expected)"
        for arm, n in srm.observed_users.items()
    )
    verdict = "MISMATCH" if srm.mismatch else "ok"
    return (
        f"SRM check: {verdict} (chi2 = {srm.chi2:.2f}, p = {format_p(srm.p_value)}); "
        f"users: {observed}"
    )


# --------------------------------------------------------------------------- layout

_TH = {"textAlign": "left", "padding": "4px 10px", "borderBottom": "2px solid #444"}
_TD = {"padding": "3px 10px", "borderBottom": "1px solid #ddd", "fontFamily": "monospace"}
_TABLE = {"borderCollapse": "collapse", "fontSize": "14px", "marginBottom": "18px"}
_SECTION = {"marginTop": "6px", "marginBottom": "4px"}
_GRAPH_CONFIG: dcc.Graph.Config = {"displaylogo": False, "displayModeBar": "hover"}


def _table_children(columns: Sequence[str], rows: Sequence[Row]) -> list[Any]:
    head = html.Thead(html.Tr([html.Th(c, style=_TH) for c in columns]))
    body = html.Tbody(
        [html.Tr([html.Td(row.get(c, ""), style=_TD) for c in columns]) for row in rows]
    )
    return [head, body]


def _layout(experiment: str, days: Sequence[int], domains: Sequence[str]) -> html.Div:
    first, last = (min(days), max(days)) if days else (1, 1)
    marks: dict[int, str] = {d: str(d) for d in days}
    return html.Div(
        style={"fontFamily": "sans-serif", "margin": "16px 24px", "maxWidth": "1300px"},
        children=[
            html.H2(f"qrw A/B experiment: {experiment}", id="title"),
            html.Div(
                style={"display": "flex", "gap": "40px", "alignItems": "flex-start"},
                children=[
                    html.Div(
                        style={"flex": "1 1 55%"},
                        children=[
                            html.Label("Days", htmlFor="day-range"),
                            dcc.RangeSlider(
                                id="day-range",
                                min=first,
                                max=last,
                                step=1,
                                marks=marks,
                                value=[first, last],
                                allowCross=False,
                            ),
                        ],
                    ),
                    html.Div(
                        style={"flex": "1 1 45%"},
                        children=[
                            html.Label("Domains", htmlFor="domain-filter"),
                            dcc.Dropdown(
                                id="domain-filter",
                                options=[{"label": d, "value": d} for d in domains],
                                value=[],
                                multi=True,
                                placeholder="All domains",
                            ),
                        ],
                    ),
                ],
            ),
            html.Div(id="status", style={"color": "#555", "margin": "8px 0"}),
            html.Div(id="srm-status", style={"margin": "4px 0 10px 0", "fontWeight": "bold"}),
            html.H4("Arms", style=_SECTION),
            html.Table(id="summary-table", style=_TABLE),
            html.H4("Comparisons", style=_SECTION),
            html.Table(id="comparison-table", style=_TABLE),
            html.Div(
                style={"display": "flex", "flexWrap": "wrap"},
                children=[
                    dcc.Graph(
                        id="defect-rate-graph",
                        style={"flex": "1 1 640px", "height": "440px"},
                        config=_GRAPH_CONFIG,
                    ),
                    dcc.Graph(
                        id="reduction-graph",
                        style={"flex": "1 1 520px", "height": "440px"},
                        config=_GRAPH_CONFIG,
                    ),
                ],
            ),
            html.H4("Top rewrites per arm", style=_SECTION),
            html.Table(id="top-rewrites-table", style=_TABLE),
        ],
    )


UpdateFn = Callable[[Sequence[int] | None, Sequence[str] | None], tuple[Any, ...]]


def make_update(
    store: OutcomeStore, experiment: str, shares: Mapping[str, float] | None
) -> UpdateFn:
    """The page callback: ``(day_value, domain_value) -> outputs`` in the order
    summary-table, comparison-table, top-rewrites-table children, defect-rate-graph and
    reduction-graph figures, srm-status and status text."""

    def update(
        day_value: Sequence[int] | None, domain_value: Sequence[str] | None
    ) -> tuple[Any, ...]:
        view = compute_view(store, experiment, shares, day_value, domain_value)
        return (
            _table_children(SUMMARY_COLUMNS, view.summary),
            _table_children(COMPARISON_COLUMNS, view.comparisons),
            _table_children(TOP_REWRITE_COLUMNS, view.top_rewrites),
            view.defect_rate_figure,
            view.reduction_figure,
            view.srm_text,
            view.status,
        )

    return update


def create_app(
    store: OutcomeStore, experiment: str, shares: Mapping[str, float] | None = None
) -> dash.Dash:
    """Build the dashboard for ``experiment`` in ``store`` (not started; see :func:`serve`).

    ``shares`` are the configured traffic shares per arm (enables the SRM check). The layout is
    built from ``store.days`` / ``store.domains``; the data are read on every filter change.
    Raises ValueError when the store has no days for ``experiment``.
    """
    days = store.days(experiment)
    if not days:
        raise ValueError(f"experiment {experiment!r} has no outcomes in the store")
    app = dash.Dash(__name__, title=f"qrw A/B: {experiment}", update_title="")
    app.layout = _layout(experiment, days, store.domains(experiment))
    update = make_update(store, experiment, shares)
    app.callback(
        Output("summary-table", "children"),
        Output("comparison-table", "children"),
        Output("top-rewrites-table", "children"),
        Output("defect-rate-graph", "figure"),
        Output("reduction-graph", "figure"),
        Output("srm-status", "children"),
        Output("status", "children"),
        Input("day-range", "value"),
        Input("domain-filter", "value"),
    )(update)
    return app


def serve(app: dash.Dash, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve ``app`` with Dash's (Flask) server on ``host:port`` until interrupted (blocks).

    Only loopback hosts (127.0.0.1, localhost, ::1) are allowed: the development server is not
    meant to be exposed. Raises ValueError for any other host; OSError when the port is taken.
    """
    if host not in _LOOPBACK_HOSTS:
        raise ValueError(f"refusing to serve the dashboard on {host!r}: loopback only")
    log.info("dashboard on http://%s:%d/", host, port)
    app.run(host=host, port=port, debug=False)


# --------------------------------------------------------------------------- entry point


def _parse_shares(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    shares: dict[str, float] = {}
    for part in text.split(","):
        arm, sep, value = part.partition("=")
        if not sep or not arm.strip():
            raise argparse.ArgumentTypeError(f"bad share {part!r}; expected ARM=FRACTION")
        shares[arm.strip()] = float(value)
    return shares


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m offline.ab.dashboard --store DIR --experiment NAME [--port N]
    [--shares control=0.25,global=0.25,...]``: serve the dashboard on 127.0.0.1."""
    parser = argparse.ArgumentParser(
        prog="python -m offline.ab.dashboard",
        description="Serve the A/B defect dashboard on 127.0.0.1.",
    )
    parser.add_argument("--store", type=Path, required=True, help="outcome store root dir")
    parser.add_argument("--experiment", required=True, help="experiment name")
    parser.add_argument("--port", type=int, default=8050, help="port on 127.0.0.1")
    parser.add_argument(
        "--shares", type=_parse_shares, default=None, help="arm shares, e.g. control=0.5,global=0.5"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    store = OutcomeStore(args.store)
    try:
        app = create_app(store, args.experiment, shares=args.shares)
    except ValueError as exc:
        parser.error(str(exc))
    serve(app, host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
