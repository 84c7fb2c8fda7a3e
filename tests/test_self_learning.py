"""Self-contamination (issue 6): the service's own rewrites in the next night's logs are
feedback on their pair, never evidence for it (offline.self_learning; Ponnusamy et al. 2022)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from logrows import turn_row

from offline.catalog import read_catalog, read_personal
from offline.defects import DefectLabel
from offline.job import NightlyReport, read_pairs, run_nightly
from offline.markov import RewritePair
from offline.self_learning import demote_pairs, read_feedback, served_pair_feedback
from offline.sessionize import Turn
from rewrite.config import SelfLearningSettings, Settings

log = logging.getLogger(__name__)

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
FAIL = "Sorry, I didn't understand that."
OK = "It is sunny in Boston."
SAID = "whats the whether in boston"  # what users say (an ASR error)
FIX = "what's the weather in boston"  # what the service rewrites it to
CORPUS = Path(__file__).parents[2] / "shared/data/slurp/utterances.jsonl"


def _row(tid: str, user: str, sec: float, utt: str, response: str, **kw: Any) -> dict[str, Any]:
    return turn_row(tid, user, sec, utt, response, t0=T0, **kw)


def _honest(n: int) -> list[dict[str, Any]]:
    """``n`` users fail with SAID and rephrase to FIX themselves (no service rewrite)."""
    rows = []
    for k in range(n):
        u, base = f"honest{k}", 1000.0 * k
        rows.append(_row(f"{u}-1", u, base, SAID, FAIL, barge_in=True))
        rows.append(_row(f"{u}-2", u, base + 4, FIX, OK))
    return rows


def _self_success(n: int) -> list[dict[str, Any]]:
    """``n`` users fail with SAID; their repeat is rewritten to FIX by the service and works."""
    rows = []
    for k in range(n):
        u, base = f"selfsucc{k}", 50_000.0 + 1000.0 * k
        rows.append(_row(f"{u}-1", u, base, SAID, FAIL, barge_in=True))
        rows.append(_row(f"{u}-2", u, base + 4, SAID, OK, rewrite=FIX, rewrite_source="global"))
    return rows


def _served(n_users: int, turns_each: int, barge_in: bool, tag: str) -> list[dict[str, Any]]:
    """Single-turn sessions where the precomputed pair SAID → FIX was applied."""
    rows = []
    for k in range(n_users):
        u = f"{tag}{k}"
        for j in range(turns_each):
            sec = 100_000.0 + 1000.0 * (k * turns_each + j)  # > session gap apart
            rows.append(
                _row(
                    f"{u}-{j}",
                    u,
                    sec,
                    SAID,
                    OK,
                    barge_in=barge_in,
                    rewrite=FIX,
                    rewrite_source="precomputed",
                )
            )
    return rows


def _write(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _job_settings(settings: Settings, **self_learning: Any) -> Settings:
    s = settings.model_copy(deep=True)
    s.dpr.build_index = False
    for k, v in self_learning.items():
        setattr(s.self_learning, k, v)
    return s


def _night(tmp_path: Path, name: str, rows: Sequence[dict[str, Any]], s: Settings) -> Path:
    run = tmp_path / name
    run_nightly([_write(tmp_path / f"{name}.jsonl", rows)], run, s)
    return run


def _pair_rows(run: Path) -> list[tuple[str, str, float, int, int]]:
    return [
        (p.source, p.rewrite, p.absorption_probability, p.support, p.n_users)
        for p in read_pairs(run / "pairs.parquet")
    ]


# --------------------------------------------------------------------------- (1) no self-credit


def test_rewritten_successes_do_not_inflate_the_pair(tmp_path: Path, settings: Settings) -> None:
    """8 users fix SAID → FIX themselves; 4 more fail with SAID and succeed only because the
    service rewrote their repeat; 6 more are served the precomputed pair and succeed. The
    pair and the catalog must be what the un-rewritten turns alone give: support 8, absorption
    8/12 (the 4 self-rewritten users' own SAID failed) — crediting the rewrites would give
    support 12 and absorption 1.0, and FIX a catalog frequency of 18."""
    s = _job_settings(settings)
    rows = _honest(8) + _self_success(4) + _served(6, 1, barge_in=False, tag="served")
    full = _night(tmp_path, "full", rows, s)
    own_only = _night(tmp_path, "own", [r for r in rows if "rewrite" not in r], s)

    assert _pair_rows(full) == _pair_rows(own_only)
    [(src, dst, prob, support, n_users)] = _pair_rows(full)
    assert (src, dst, support, n_users) == (SAID, FIX, 8, 8)
    assert prob == pytest.approx(8 / 12, abs=1e-6)
    assert read_catalog(full / "catalog.parquet") == read_catalog(own_only / "catalog.parquet")
    fix = {e.text: e for e in read_catalog(full / "catalog.parquet")}[FIX]
    assert (fix.frequency, fix.n_users, fix.success_rate) == (8, 8, 1.0)
    assert read_personal(full / "personal.parquet") == read_personal(own_only / "personal.parquet")
    report = json.loads((full / "report.json").read_text())
    assert report["self_learning"]["rewritten_turns"] == 10
    assert report["self_learning"]["rewritten_by_source"] == {"global": 4, "precomputed": 6}
    # the successful precomputed rewrites are judged and kept (0 defects)
    [fb] = read_feedback(full / "feedback.parquet")
    assert (fb.rewritten_turns, fb.defects, fb.demoted) == (6, 0, False)


# --------------------------------------------------------------------------- (2) demotion


@pytest.mark.parametrize(("bad_users", "demoted"), [(3, True), (2, False)])
def test_defective_rewritten_traffic_demotes_the_pair(
    tmp_path: Path, settings: Settings, bad_users: int, demoted: bool
) -> None:
    """The pair is mined from 8 honest users; its served traffic is all barge-ins. With 3
    rewritten turns (= min_rewritten_turns) it is demoted and withdrawn; with 2 it stays."""
    s = _job_settings(settings, min_rewritten_turns=3, max_defect_rate=0.5)
    run = _night(tmp_path, "night", _honest(8) + _served(bad_users, 1, True, "bad"), s)
    [fb] = read_feedback(run / "feedback.parquet")
    assert (fb.source, fb.rewrite, fb.rewritten_turns, fb.n_users, fb.defects) == (
        SAID,
        FIX,
        bad_users,
        bad_users,
        bad_users,
    )
    assert fb.defect_rate == 1.0 and fb.demoted is demoted
    demoted_rows = pq.read_table(run / "demoted.parquet").to_pylist()
    report = json.loads((run / "report.json").read_text())["self_learning"]
    if demoted:
        assert read_pairs(run / "pairs.parquet") == []
        assert demoted_rows == [
            {"source": SAID, "rewrite": FIX, "rewritten_turns": 3, "defects": 3, "defect_rate": 1.0}
        ]
        assert report["dropped_pairs"] == 1 and report["demoted_pairs"] == 1
        assert report["demoted"][0]["source"] == SAID
    else:
        assert [(p.source, p.rewrite) for p in read_pairs(run / "pairs.parquet")] == [(SAID, FIX)]
        assert demoted_rows == [] and report["dropped_pairs"] == 0


def test_one_user_cannot_demote_and_demote_off_only_reports(
    tmp_path: Path, settings: Settings
) -> None:
    honest = _honest(8)
    one_user = _night(tmp_path, "one", honest + _served(1, 4, True, "bad"), _job_settings(settings))
    [fb] = read_feedback(one_user / "feedback.parquet")
    assert (fb.rewritten_turns, fb.n_users, fb.defects, fb.demoted) == (4, 1, 4, False)
    assert len(read_pairs(one_user / "pairs.parquet")) == 1

    off = _night(
        tmp_path, "off", honest + _served(3, 1, True, "bad"), _job_settings(settings, demote=False)
    )
    assert len(read_pairs(off / "pairs.parquet")) == 1  # published anyway ...
    assert pq.read_table(off / "demoted.parquet").num_rows == 1  # ... but reported
    assert json.loads((off / "report.json").read_text())["self_learning"]["dropped_pairs"] == 0


def _turn(i: int, user: str, source: str = "precomputed", rewrite: str = FIX) -> Turn:
    return Turn(i, f"t{i}", user, float(i), SAID, SAID, OK, False, 0, source, rewrite=rewrite)


def test_feedback_threshold_is_strict_and_sources_are_filtered() -> None:
    cfg = SelfLearningSettings(min_rewritten_turns=4, min_users=2, max_defect_rate=0.5)
    turns = [_turn(i, f"u{i % 2}") for i in range(4)]
    turns += [_turn(4, "u0", source="global"), _turn(5, "u1", rewrite="")]  # not judged
    half = [DefectLabel(i < 2, ("barge_in",) if i < 2 else ()) for i in range(6)]
    [fb] = served_pair_feedback(turns, half, cfg)
    assert (fb.rewritten_turns, fb.defects, fb.defect_rate, fb.demoted) == (4, 2, 0.5, False)
    three = [DefectLabel(i < 3, ()) for i in range(6)]
    [fb] = served_pair_feedback(turns, three, cfg)
    assert fb.demoted and fb.defect_rate == 0.75
    other = RewritePair(SAID, "another rewrite", 0.9, 5, 5)
    kept, dropped = demote_pairs([RewritePair(SAID, FIX, 0.9, 5, 5), other], [fb])
    assert kept == [other] and [(p.source, p.rewrite) for p in dropped] == [(SAID, FIX)]
    with pytest.raises(ValueError, match="labels"):
        served_pair_feedback(turns, three[:2], cfg)


# --------------------------------------------------------------------------- (3) closed loop


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.is_file(), reason=f"SLURP corpus not found at {CORPUS}")
def test_closed_loop_withdraws_a_bad_pair_within_two_nights(
    tmp_path: Path, settings: Settings
) -> None:
    """Simulated users (real simulator) → nightly job (real) → in-process Rewriter serving the
    night's pairs → next day's logs → next night, for three days.

    Day 1 is unrewritten traffic plus a poisoning: fake users who "rephrase" a frequent,
    correct utterance A into a lexically close utterance B of another intent, enough of them
    that night 1 mines and publishes A → B. Day 2 serves it: the real users saying A get the
    wrong action. Night 2 must withdraw it while the poisoned chains are still in the window
    (without demotion the same logs keep it), night 3 must keep it withdrawn (its defective
    traffic is still in the window, though nobody was served it on day 3), and the honest
    pairs of night 1 must survive, undemoted.
    """
    from offline.rephrase import similarity
    from offline.schema import write_turn_logs
    from offline.simulate import FAILURE_RESPONSE, Simulator
    from rewrite.rewriter import Rewriter
    from rewrite.store import StaticPairStore

    s = _job_settings(settings)
    s.service.pipeline = ["normalize", "precomputed"]
    sim = Simulator(CORPUS, users=600, seed=5)
    logs: list[Path] = []

    def night(n: int, **self_learning: Any) -> tuple[NightlyReport, set[tuple[str, str]], Path]:
        run = tmp_path / (f"night-{n:02d}" + ("-ablation" if self_learning else ""))
        rep = run_nightly(logs, run, _job_settings(s, **self_learning))
        return rep, {(p.source, p.rewrite) for p in read_pairs(run / "pairs.parquet")}, run

    day1 = sim.simulate_day(1).turns
    logs.append(tmp_path / "day-01.jsonl")
    write_turn_logs(day1, logs[0])
    _, clean_pairs, probe = night(1)  # the clean day-1 catalog gives A and B
    catalog = read_catalog(probe / "catalog.parquet")
    sources = {src for src, _ in clean_pairs}
    a, b = max(
        (
            (a, b)
            for a in catalog
            if a.frequency >= 6
            and a.success_rate >= 0.9
            and a.n_users >= 3
            and a.text not in sources
            for b in catalog
            if b.intent != a.intent
        ),
        key=lambda ab: similarity(ab[0].text, ab[1].text, 0.5),
    )
    bad = (a.text, b.text)
    poison = []
    for i in range(3 * a.frequency + 5):
        u, t = f"poison{i:03d}", sim.start + timedelta(hours=23, seconds=20 * i)
        stamp = [(t + timedelta(seconds=d)).strftime("%Y-%m-%dT%H:%M:%S.000Z") for d in (0, 4)]
        poison.append(
            {
                "turn_id": f"{u}-1",
                "user_id": u,
                "timestamp": stamp[0],
                "utterance": a.text,
                "response": FAILURE_RESPONSE,
                "barge_in": True,
            }
        )
        poison.append(
            {
                "turn_id": f"{u}-2",
                "user_id": u,
                "timestamp": stamp[1],
                "utterance": b.text,
                "response": "Okay.",
            }
        )
    write_turn_logs(day1 + poison, logs[0])

    history: list[dict[str, Any]] = []
    _, pairs, _ = night(1)
    assert bad in pairs, f"poisoning did not get {bad} mined on night 1 (precondition)"
    good = pairs - {bad}
    assert good, "night 1 mined no honest pair to watch"
    served_counts = []
    for day in (2, 3):
        store = StaticPairStore(
            {src: (dst, 0.9, 3, 3) for src, dst in pairs}, version=f"night-{day - 1:02d}"
        )
        rewriter = Rewriter(s, pair_store=store)
        rewriter.warm_up()
        turns = sim.simulate_day(day, rewrite_fn=rewriter.rewrite).turns
        rewriter.close()
        served_counts.append(sum(1 for r in turns if (r["utterance"], r.get("rewrite")) == bad))
        logs.append(tmp_path / f"day-{day:02d}.jsonl")
        write_turn_logs(turns, logs[-1])
        rep, pairs, run = night(day)
        fb = {(f.source, f.rewrite): f for f in read_feedback(run / "feedback.parquet")}
        _, ablation, _ = night(day, demote=False)
        f = fb.get(bad)
        history.append(
            {
                "night": day,
                "served_on_day": served_counts[-1],
                "rewritten_turns": f.rewritten_turns if f else 0,
                "defects": f.defects if f else 0,
                "defect_rate": f.defect_rate if f else None,
                "demoted": bool(f and f.demoted),
                "published": bad in pairs,
                "published_without_demotion": bad in ablation,
                "good_kept": len(good & pairs),
                "good_demoted": sorted(k for k, v in fb.items() if v.demoted and k in good),
                "dropped_pairs": rep.self_learning["dropped_pairs"],
            }
        )
        log.info("bad pair %s after night %d: %s", bad, day, history[-1])
    msg = f"bad pair {bad}; per night: {history}"
    n2, n3 = history
    assert n2["served_on_day"] >= 3 and n2["rewritten_turns"] == n2["served_on_day"], msg
    assert n2["defect_rate"] > 0.5 and n2["demoted"], msg
    assert not n2["published"] and n2["published_without_demotion"], msg  # withdrawn by demotion
    assert n3["served_on_day"] == 0, msg  # day 3 did not serve it
    assert n3["demoted"] and not n3["published"], msg  # still withdrawn, evidence still stands
    assert n3["published_without_demotion"], msg  # the old poisoned chains would bring it back
    assert n2["good_kept"] == len(good) and not n2["good_demoted"] and not n3["good_demoted"], msg
