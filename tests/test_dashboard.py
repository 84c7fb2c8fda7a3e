"""The A/B defect dashboard (offline/ab/dashboard.py).

Two levels:

- fast unit tests (no browser): ``create_app`` lays out every element id the page promises, and
  the callback returns, for a filter, exactly the strings ``qrw ab report`` writes to its JSON
  (``display``, from report.py's formatters) and prints;
- a real browser test (``integration``, ``slow``): the dashboard runs as a subprocess
  (``python -m offline.ab.dashboard``) on a free 127.0.0.1 port, headless Debian Chromium loads
  it through /usr/bin/chromedriver (never Selenium Manager), the numbers in the summary and
  comparison tables are compared with the analysis of the same store, a domain is picked in the
  dropdown and the day range is moved, and the tables must follow. Screenshots go to
  ``$QRW_TEST_ARTIFACTS`` (default ``runs/test-artifacts/dashboard/``, git-ignored).

The browser fixture installs Debian's ``chromium`` and ``chromium-driver`` with apt-get when
they are missing (root only; skipped where there is no apt-get).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from procs import stop_process
from rich.console import Console

from offline.ab.report import report_command
from offline.ab.schema import OUTCOME_SCHEMA
from offline.ab.store import OutcomeStore

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "exp-dash"
ARMS = ("control", "precomputed", "global", "global_personal")
SHARES = {arm: 0.25 for arm in ARMS}
DAYS = (1, 2, 3, 4, 5)
DOMAINS = ("iot", "music", "weather")
BASE_DEFECT = {"control": 0.30, "precomputed": 0.26, "global": 0.20, "global_personal": 0.15}
TRIGGER = {"control": 0.0, "precomputed": 0.12, "global": 0.22, "global_personal": 0.28}
PAIRS = {
    "iot": [("turn of the lights", "turn off the lights"), ("switch on the fan", "turn on fan")],
    "music": [("play some dell", "play songs by adele"), ("play the beetles", "play the beatles")],
    "weather": [("whats the whether", "what's the weather"), ("is it gonna rein", "will it rain")],
}
SUMMARY_HEADER = ["arm", "users", "turns", "defect rate", "95% CI", "trigger rate", "win:loss"]
COMPARISON_HEADER = [
    "treatment",
    "baseline",
    "relative reduction",
    "95% CI",
    "p-value",
    "significant",
]


# --------------------------------------------------------------------------- synthetic store


def _day_table(day: int, rng: np.random.Generator, users_per_arm: int = 24) -> pa.Table:
    """One day of per-turn outcomes: 4 arms, 3 domains, rewrites with wins/losses/ties."""
    cols: dict[str, list[Any]] = {f.name: [] for f in OUTCOME_SCHEMA}
    start = datetime(2026, 3, 1, 9, tzinfo=UTC) + timedelta(days=day - 1)
    for arm in ARMS:
        for u in range(users_per_arm):
            user = f"user-{arm}-{u:02d}"
            for t in range(int(rng.integers(1, 5))):
                domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
                p_defect = BASE_DEFECT[arm] + (0.06 if domain == "weather" else 0.0)
                rewritten = bool(rng.random() < TRIGGER[arm])
                utterance, rewrite = PAIRS[domain][int(rng.integers(2))]
                outcome: str | None = None
                if rewritten:
                    outcome = str(rng.choice(["win", "loss", "tie"], p=[0.6, 0.12, 0.28]))
                    defect = outcome == "loss" or (outcome == "tie" and rng.random() < p_defect)
                else:
                    defect = bool(rng.random() < p_defect)
                source = None
                if rewritten:
                    source = {"precomputed": "precomputed", "global": "global"}.get(
                        arm, "personal" if rng.random() < 0.5 else "global"
                    )
                row = {
                    "experiment": EXPERIMENT,
                    "day": day,
                    "arm": arm,
                    "user": user,
                    "session_id": f"{user}-d{day}",
                    "turn_id": f"{user}-d{day}-t{t}",
                    "timestamp": start + timedelta(minutes=u, seconds=10 * t),
                    "utterance": utterance,
                    "rewrite": rewrite if rewritten else None,
                    "rewrite_source": source,
                    "model_version": None if arm == "control" else "v1",
                    "domain": domain,
                    "defect": bool(defect),
                    "defect_reasons": "rephrase" if defect else "",
                    "true_defect": bool(defect),
                    "rewritten": rewritten,
                    "rewrite_outcome": outcome,
                }
                for name, value in row.items():
                    cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=OUTCOME_SCHEMA)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root directory of the synthetic outcome store."""
    return tmp_path_factory.mktemp("ab-store")


@pytest.fixture(scope="module")
def store(store_root: Path) -> OutcomeStore:
    """An outcome store with 5 days of the synthetic experiment."""
    outcomes = OutcomeStore(store_root)
    rng = np.random.default_rng(20260301)
    for day in DAYS:
        outcomes.write_day(EXPERIMENT, day, _day_table(day, rng))
    return outcomes


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expected:
    """What ``qrw ab report`` shows for a filter: table rows built from the JSON it writes
    (the ``display`` strings of report.py's formatters) and its console text."""

    report: dict[str, Any]
    summary: list[list[str]]
    comparisons: list[list[str]]
    console: str


def _cli_report(
    store_root: Path, out_dir: Path, day_range: tuple[int, int] | None, domains: Sequence[str]
) -> Expected:
    """Run the ``qrw ab report`` code path (report_command) with ``--json`` for the filter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_out = out_dir / f"report-{day_range}-{'-'.join(domains) or 'all'}.json"
    buf = io.StringIO()
    report_command(
        store_root,
        EXPERIMENT,
        json_out,
        day_range,
        list(domains),
        SHARES,
        Console(file=buf, width=220),
    )
    js = json.loads(json_out.read_text())
    summary = [
        [a["arm"], a["display"]["users"], a["display"]["turns"], a["display"]["defect_rate"],
         a["display"]["ci"], a["display"]["trigger_rate"],
         f"{a['display']['win_loss']} ({a['wins']}/{a['losses']})"]
        for a in js["arms"]
    ]  # fmt: skip
    comparisons = [
        [c["treatment"], c["baseline"], c["display"]["relative_reduction"], c["display"]["ci"],
         c["display"]["p_value"], c["display"]["significant"]]
        for c in js["comparisons"]
    ]  # fmt: skip
    expected = Expected(js, summary, comparisons, buf.getvalue())
    # the same strings are what the CLI printed
    for row in summary:
        assert f"{row[0]} " in expected.console and row[3] in expected.console
        assert row[4] in expected.console
    return expected


# --------------------------------------------------------------------------- unit tests


def _ids(component: Any) -> set[str]:
    """Every ``id`` in a Dash component tree."""
    found: set[str] = set()
    stack = [component]
    while stack:
        node = stack.pop()
        if isinstance(node, list | tuple):
            stack.extend(node)
            continue
        if not hasattr(node, "to_plotly_json"):
            continue
        if getattr(node, "id", None):
            found.add(node.id)
        stack.append(getattr(node, "children", None))
    return found


def _table_text(children: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) of the html.Table children the callback returns."""
    head, body = children
    header = [th.children for th in head.children.children]
    rows = [[td.children for td in tr.children] for tr in body.children]
    return header, rows


def test_layout_has_every_element_id(store: OutcomeStore) -> None:
    from offline.ab.dashboard import ELEMENT_IDS, create_app

    app = create_app(store, EXPERIMENT, shares=SHARES)
    ids = _ids(app.layout)
    required = {
        "day-range",
        "domain-filter",
        "defect-rate-graph",
        "reduction-graph",
        "summary-table",
        "comparison-table",
        "top-rewrites-table",
    }
    assert required <= ids
    assert set(ELEMENT_IDS) <= ids
    assert EXPERIMENT in str(app.layout)  # title names the experiment
    outputs = " ".join(app.callback_map)
    for element in ("summary-table", "comparison-table", "defect-rate-graph", "reduction-graph"):
        assert element in outputs


def test_create_app_rejects_unknown_experiment(store: OutcomeStore) -> None:
    from offline.ab.dashboard import create_app

    with pytest.raises(ValueError, match="no outcomes"):
        create_app(store, "no-such-experiment")


def test_serve_refuses_non_loopback_and_parses_shares(store: OutcomeStore) -> None:
    from offline.ab.dashboard import _parse_shares, create_app, serve

    app = create_app(store, EXPERIMENT)
    with pytest.raises(ValueError, match="loopback only"):
        serve(app, host="0.0.0.0", port=_free_port())
    assert _parse_shares("control=0.5, global=0.5") == {"control": 0.5, "global": 0.5}
    assert _parse_shares(None) is None


def test_callback_rows_match_report_formatting(
    store: OutcomeStore, store_root: Path, tmp_path: Path
) -> None:
    from offline.ab.dashboard import compute_view, make_update

    update = make_update(store, EXPERIMENT, SHARES)
    # unfiltered: the full slider range and no domain = no filter at all
    summary, comparisons, top, rate_fig, red_fig, srm, status = update([1, 5], [])
    expected = _cli_report(store_root, tmp_path, None, [])
    header, rows = _table_text(summary)
    assert header == SUMMARY_HEADER
    assert rows == expected.summary and len(rows) == len(ARMS)
    cmp_header, cmp_rows = _table_text(comparisons)
    assert cmp_header == COMPARISON_HEADER
    assert cmp_rows == expected.comparisons
    assert [(r[0], r[1]) for r in cmp_rows] == [
        ("precomputed", "control"),
        ("global", "control"),
        ("global_personal", "control"),
        ("global_personal", "global"),
    ]
    assert srm.startswith("SRM check: ok") and srm in expected.console
    assert status.endswith("days 1–5, all domains.")

    # filtered: days 2-4, one domain
    summary, comparisons, top, rate_fig, red_fig, srm, status = update([2, 4], ["iot"])
    expected = _cli_report(store_root, tmp_path, (2, 4), ["iot"])
    assert _table_text(summary)[1] == expected.summary
    assert _table_text(comparisons)[1] == expected.comparisons
    top_header, top_rows = _table_text(top)
    assert top_header[-1] == "example turn"
    assert top_rows and all(r[1] in {p[0] for p in PAIRS["iot"]} for r in top_rows)
    assert [r[4] for r in top_rows] == [str(t["count"]) for t in expected.report["top_rewrites"]]
    assert all(r[-1].split("-d")[1][0] in "234" for r in top_rows)  # example turn of days 2..4
    assert "days 2–4" in status and "iot" in status
    # one line + one CI band per arm, over days 2..4 only
    lines = [tr for tr in rate_fig.data if tr.mode == "lines+markers"]
    assert sorted(tr.name for tr in lines) == sorted(ARMS)
    assert all(list(tr.x) == [2, 3, 4] for tr in lines)
    assert len([tr for tr in rate_fig.data if tr.fill == "toself"]) == len(ARMS)
    assert len(red_fig.data[0].x) == len(expected.comparisons)

    view = compute_view(store, EXPERIMENT, SHARES, [2, 4], ["iot"])
    assert view.report.domains == ("iot",) and view.report.day_range == (2, 4)

    # a filter with no turns renders empty tables and says so
    summary, comparisons, *_rest, status = update([1, 5], ["no-such-domain"])
    assert _table_text(summary)[1] == [] and "No turns" in status


# --------------------------------------------------------------------------- browser test


@dataclass(frozen=True)
class Browser:
    chromium: str
    chromedriver: str


def _find_browser() -> Browser | None:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return Browser(chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser() -> Browser:
    """Debian's chromium + chromium-driver, apt-installed when missing (bounded by timeouts)."""
    found = _find_browser()
    if found is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium/chromedriver missing and cannot apt-get install them (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    for cmd, timeout in (
        (["apt-get", "update"], 300),
        (["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
         900),
    ):  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s")
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log.info("installed chromium + chromium-driver in %.1f s", time.monotonic() - started)
    found = _find_browser()
    if found is None:
        pytest.fail("apt-get installed chromium but chromium/chromedriver are not on PATH")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@pytest.fixture(scope="module")
def dashboard(
    store: OutcomeStore, store_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """``python -m offline.ab.dashboard`` on a free loopback port; stopped by its handle."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("dashboard") / "server.log"
    shares = ",".join(f"{arm}={share}" for arm, share in SHARES.items())
    cmd = [sys.executable, "-m", "offline.ab.dashboard", "--store", str(store_root),
           "--experiment", EXPERIMENT, "--port", str(port), "--shares", shares]  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard did not answer on {url} in 90 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield Served(url, proc, log_path)
    finally:
        stop_process(proc, timeout_s=10)


@pytest.fixture(scope="module")
def driver(browser: Browser) -> Iterator[Any]:
    """Headless Chromium driven through /usr/bin/chromedriver (Selenium Manager is skipped
    because the driver path is given explicitly)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser.chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    service = Service(executable_path=browser.chromedriver)
    drv = webdriver.Chrome(service=service, options=options)
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    """Where screenshots go ($QRW_TEST_ARTIFACTS or runs/test-artifacts/dashboard, ignored)."""
    path = Path(os.environ.get("QRW_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
    path = path / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


_READ_TABLE = """
const t = document.getElementById(arguments[0]);
if (!t) { return null; }
const cells = (tr, sel) => Array.from(tr.querySelectorAll(sel)).map(c => c.textContent.trim());
const head = t.querySelector('thead tr');
return {header: head ? cells(head, 'th') : [],
        rows: Array.from(t.querySelectorAll('tbody tr')).map(tr => cells(tr, 'td'))};
"""


def _read_table(drv: Any, element_id: str) -> dict[str, list[Any]] | None:
    result: dict[str, list[Any]] | None = drv.execute_script(_READ_TABLE, element_id)
    return result


def _wait_for_rows(
    drv: Any, element_id: str, expected: list[list[str]], timeout: float = 30
) -> dict[str, list[Any]]:
    """Wait (bounded) until the table shows ``expected``; assert with a diff otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    with contextlib.suppress(TimeoutException):
        WebDriverWait(drv, timeout, poll_frequency=0.2).until(
            lambda d: (_read_table(d, element_id) or {}).get("rows") == expected
        )
    shown = _read_table(drv, element_id)
    assert shown is not None, f"#{element_id} not on the page"
    assert shown["rows"] == expected, f"#{element_id} after {timeout} s"
    return shown


def _screenshot(drv: Any, path: Path, record_property: Any) -> None:
    """Full-page PNG through the DevTools protocol (content beyond the viewport included)."""
    metrics = drv.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = drv.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    record_property(path.stem, str(path))
    log.info("dashboard screenshot: %s", path)


def _graph_counts(drv: Any) -> dict[str, int]:
    counts: dict[str, int] = drv.execute_script(
        """
        const q = s => document.querySelectorAll(s).length;
        return {lines: q('#defect-rate-graph .scatterlayer .trace .js-line'),
                bands: q('#defect-rate-graph .scatterlayer .trace .js-fill'),
                bars: q('#reduction-graph .barlayer .point'),
                errorbars: q('#reduction-graph .errorbar')};
        """
    )
    return counts


def _pick_domain(drv: Any, domain: str) -> None:
    """Open the domain dropdown, type the domain and select it with Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(drv, 20)
    box = wait.until(ec.element_to_be_clickable((By.ID, "domain-filter")))
    box.click()
    search = wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#domain-filter input, input[type='search']")
    )
    search.send_keys(domain)
    search.send_keys(Keys.ENTER)
    search.send_keys(Keys.ESCAPE)


def _move_day_range(drv: Any, steps_first: int, steps_last: int) -> None:
    """Move the slider handles with the keyboard (ARROW_RIGHT / ARROW_LEFT per step)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    handles = WebDriverWait(drv, 20).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#day-range [role='slider']") or False
    )
    assert len(handles) == 2, f"expected 2 slider handles, got {len(handles)}"
    first, last = handles
    first.click()
    for _ in range(steps_first):
        first.send_keys(Keys.ARROW_RIGHT)
    last.click()
    for _ in range(steps_last):
        last.send_keys(Keys.ARROW_LEFT)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1200)  # includes a first-time apt-get install of chromium
def test_dashboard_in_headless_chromium(
    store_root: Path,
    tmp_path: Path,
    dashboard: Served,
    driver: Any,
    artifacts_dir: Path,
    record_property: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(dashboard.url)
    WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.ID, "summary-table")))
    assert EXPERIMENT in driver.find_element(By.ID, "title").text

    # 1. unfiltered page == `qrw ab report` on the whole store
    full = _cli_report(store_root, tmp_path, None, [])
    shown = _wait_for_rows(driver, "summary-table", full.summary)
    assert shown["header"] == SUMMARY_HEADER
    shown = _wait_for_rows(driver, "comparison-table", full.comparisons)
    assert shown["header"] == COMPARISON_HEADER
    top = _read_table(driver, "top-rewrites-table")
    assert top is not None and len(top["rows"]) == len(full.report["top_rewrites"]) >= 3
    WebDriverWait(driver, 30).until(lambda d: _graph_counts(d)["lines"] >= len(ARMS))
    counts = _graph_counts(driver)
    assert counts["bands"] >= len(ARMS), counts
    assert counts["bars"] == len(full.comparisons) and counts["errorbars"] >= 1, counts
    _screenshot(driver, artifacts_dir / "dashboard-all.png", record_property)

    # 2. one domain picked in the dropdown -> the tables follow the filtered report
    _pick_domain(driver, "weather")
    weather = _cli_report(store_root, tmp_path, None, ["weather"])
    assert weather.summary != full.summary
    _wait_for_rows(driver, "summary-table", weather.summary)
    _wait_for_rows(driver, "comparison-table", weather.comparisons)

    # 3. day range 2..4 (handles moved with the keyboard) on top of the domain filter
    _move_day_range(driver, steps_first=1, steps_last=1)
    narrowed = _cli_report(store_root, tmp_path, (2, 4), ["weather"])
    _wait_for_rows(driver, "summary-table", narrowed.summary)
    _wait_for_rows(driver, "comparison-table", narrowed.comparisons)
    status = driver.find_element(By.ID, "status").text
    assert "days 2–4" in status and "weather" in status
    _screenshot(driver, artifacts_dir / "dashboard-weather-days-2-4.png", record_property)

    assert dashboard.proc.poll() is None, dashboard.log_path.read_text()
