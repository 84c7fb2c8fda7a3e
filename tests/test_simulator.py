"""Tests of the user-traffic simulator (offline.simulate) on the real SLURP corpus."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from offline.schema import TurnValidator
from offline.simulate import (
    FAILURE_RESPONSE,
    ChannelConfig,
    NoisyChannel,
    PhoneticNeighbours,
    SimulationSummary,
    Simulator,
    SimulatorConfig,
    SlurpCorpus,
    simulate,
)
from rewrite.config import DefectSettings
from rewrite.normalize import normalize_utterance
from rewrite.types import RewriteRequest, RewriteResult

CORPUS = Path(__file__).parents[2] / "shared/data/slurp/utterances.jsonl"
START = datetime(2026, 1, 5, tzinfo=UTC)

pytestmark = pytest.mark.skipif(
    not CORPUS.is_file(), reason=f"SLURP corpus not found at {CORPUS} (shared data missing)"
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


class Run:
    """A simulation run read back from disk."""

    def __init__(self, out: Path, summary: SimulationSummary, days: int) -> None:
        self.out = out
        self.summary = summary
        self.turns = [
            r for d in range(1, days + 1) for r in _read_jsonl(out / f"day-{d:02d}.jsonl")
        ]
        self.truth = _read_jsonl(out / "truth.jsonl")
        self.by_id = {r["turn_id"]: r for r in self.turns}
        self.truth_by_id = {r["turn_id"]: r for r in self.truth}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("sim")
    summary = simulate(CORPUS, users=300, days=2, seed=11, out=out)
    return Run(out, summary, days=2)


def test_files_and_summary(run: Run) -> None:
    names = sorted(p.name for p in run.out.iterdir())
    assert names == ["day-01.jsonl", "day-02.jsonl", "truth.jsonl"]
    s = run.summary
    assert s.files_written == 3
    assert (s.users, s.days) == (300, 2)
    assert s.turns == len(run.turns) == len(run.truth)
    assert s.defects == sum(t["defective"] for t in run.truth)
    assert s.rephrases == sum(t["rephrase_of"] is not None for t in run.truth)
    assert s.barge_ins == sum(bool(r["barge_in"]) for r in run.turns)
    assert s.abandons == sum(t["abandoned"] for t in run.truth)
    # "a day of 300 users produces a few thousand turns"
    assert 1500 <= s.turns / 2 <= 6000


def test_rows_validate_sorted_and_unique(run: Run) -> None:
    validator = TurnValidator(now=START + timedelta(days=3), max_future_skew_s=0)
    for day in (1, 2):
        rows = _read_jsonl(run.out / f"day-{day:02d}.jsonl")
        stamps = [_parse_ts(r["timestamp"]) for r in rows]
        assert stamps == sorted(stamps)
        assert all(
            START + timedelta(days=day - 1) <= t < START + timedelta(days=day) for t in stamps
        )
        for r in rows:
            out = validator.validate(r)
            assert not isinstance(out, str), (out, r)
            assert out.utterance == normalize_utterance(out.utterance)
            assert out.user_id.startswith("u") and out.device_id
            assert 0.0 <= (out.asr_confidence or 0.0) <= 1.0
    assert len({r["turn_id"] for r in run.turns}) == len(run.turns)
    assert re.fullmatch(r"sim-s11-d0[12]-u\d{5}-t\d{4}", run.turns[0]["turn_id"])


def test_truth_rows_and_rephrase_links(run: Run) -> None:
    assert [t["turn_id"] for t in run.truth] == [r["turn_id"] for r in run.turns]
    n_links = 0
    for t in run.truth:
        assert set(t) >= {"turn_id", "goal_id", "intended_text", "defective", "rephrase_of"}
        row = run.by_id[t["turn_id"]]
        assert t["user_id"] == row["user_id"]
        if t["rephrase_of"] is None:
            continue
        n_links += 1
        prev = run.by_id[t["rephrase_of"]]
        prev_truth = run.truth_by_id[t["rephrase_of"]]
        gap = (_parse_ts(row["timestamp"]) - _parse_ts(prev["timestamp"])).total_seconds()
        assert prev["user_id"] == row["user_id"]
        assert 1.0 <= gap <= 8.0, gap
        assert prev_truth["defective"] is True
        assert prev_truth["goal_id"] == t["goal_id"]
        if prev["barge_in"]:
            assert gap <= 4.0
    assert n_links > 100


def test_defect_rates_in_band(run: Run) -> None:
    n = len(run.truth)
    defect_rate = sum(t["defective"] for t in run.truth) / n
    assert 0.12 <= defect_rate <= 0.35, defect_rate
    assert 0.05 <= run.summary.rephrases / n <= 0.3
    assert 0.02 <= run.summary.barge_ins / n <= 0.2
    assert run.summary.abandons > 0
    # barge-ins concentrate on failed turns
    barge_fail = sum(
        r["barge_in"] for r, t in zip(run.turns, run.truth, strict=True) if t["defective"]
    )
    assert barge_fail > 0.5 * run.summary.barge_ins


def test_failed_turns_carry_failure_response(run: Run) -> None:
    patterns = [re.compile(p, re.IGNORECASE) for p in DefectSettings().failure_response_patterns]

    def is_failure(resp: str) -> bool:
        return any(p.search(resp) for p in patterns)

    outcomes = Counter(t["outcome"] for t in run.truth)
    assert outcomes["success"] > 0 and outcomes["not_understood"] > 0
    for r, t in zip(run.turns, run.truth, strict=True):
        if t["outcome"] == "not_understood":
            assert r["response"] == FAILURE_RESPONSE
            assert r["intent"] is None and r["domain"] is None
            assert is_failure(r["response"])
            assert t["defective"] and t["error_type"] != "none"
        else:
            assert not is_failure(r["response"])
            assert r["intent"] and r["domain"]
        if t["outcome"] == "success":
            assert r["intent"] == t["intent"] and not t["defective"]
        if t["outcome"] == "wrong_action":
            assert r["intent"] is not None and t["defective"]


def test_asr_corruption_recurs_across_users(run: Run) -> None:
    """The same sentence is mostly heard with the same corruption, by many users."""
    users_by_text: dict[str, set[str]] = defaultdict(set)
    heard_by_sentence: dict[str, Counter[str]] = defaultdict(Counter)
    for r, t in zip(run.turns, run.truth, strict=True):
        if t["rephrase_of"] is None:  # first attempts; careful repeats are heard better
            heard_by_sentence[t["intended_text"]][r["utterance"]] += 1
        if t["asr_mode"] == "canonical":
            users_by_text[r["utterance"]].add(r["user_id"])
    recurring = [u for u, users in users_by_text.items() if len(users) >= 3]
    assert len(recurring) >= 10
    # a sentence with a recurring error: its canonical corruption dominates its utterances
    checked = 0
    for sentence, heard in heard_by_sentence.items():
        corrupted = {h: n for h, n in heard.items() if h != sentence}
        if sum(heard.values()) < 10 or not corrupted:
            continue
        top, n_top = max(corrupted.items(), key=lambda kv: (kv[1], kv[0]))
        if top in users_by_text:
            checked += 1
            assert n_top / sum(heard.values()) >= 0.5, (sentence, heard)
    assert checked >= 5


def test_channel_pattern_is_consistent() -> None:
    neighbours = PhoneticNeighbours()
    cfg = ChannelConfig(hard_base=1.0, hard_max=1.0, reproduce_prob=0.8)
    a = NoisyChannel(cfg, seed=3, neighbours=neighbours)
    b = NoisyChannel(cfg, seed=3, neighbours=neighbours)
    text = "what's the weather like in boston tomorrow"
    pat = a.pattern(text, 0.3)
    assert pat.hard and pat.corrupted and pat.corrupted != text
    assert b.pattern(text, 0.3) == pat
    rng = np.random.default_rng(0)
    heard = Counter(a.transmit(text, 0.3, rng).text for _ in range(2000))
    assert 0.75 <= heard[pat.corrupted] / 2000 <= 0.85
    assert 0.1 <= heard[text] / 2000 <= 0.2
    careful = Counter(a.transmit(text, 0.3, rng, careful=True).text for _ in range(2000))
    assert 0.3 <= careful[pat.corrupted] / 2000 <= 0.4  # repeat_reproduce_prob = 0.35
    words, probs = neighbours.neighbours("weather")
    assert "whether" in words and abs(float(probs.sum()) - 1.0) < 1e-9


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"users": 25, "days": 2}
    simulate(CORPUS, seed=5, out=tmp_path / "a", **kw)
    simulate(CORPUS, seed=5, out=tmp_path / "b", **kw)
    simulate(CORPUS, seed=6, out=tmp_path / "c", **kw)
    for name in ("day-01.jsonl", "day-02.jsonl", "truth.jsonl"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a and a == (tmp_path / "b" / name).read_bytes()
        assert a != (tmp_path / "c" / name).read_bytes()


def test_identical_bytes_across_processes(tmp_path: Path) -> None:
    """No dependence on Python's per-process string hash randomization."""
    simulate(CORPUS, users=20, days=1, seed=9, out=tmp_path / "here")
    code = (
        "import sys; from pathlib import Path; from offline.simulate import simulate; "
        "simulate(Path(sys.argv[1]), users=20, days=1, seed=9, out=Path(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, "-c", code, str(CORPUS), str(tmp_path / "there")],
        check=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    for name in ("day-01.jsonl", "truth.jsonl"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()


def test_day_plan_independent_of_history() -> None:
    """Simulating day 2 alone gives the same day as simulating day 1 first (A/B day by day)."""
    corpus = SlurpCorpus.load(CORPUS)
    a = Simulator(corpus, users=15, seed=4)
    a.simulate_day(1)
    day2_a = a.simulate_day(2)
    day2_b = Simulator(corpus, users=15, seed=4).simulate_day(2)
    assert day2_a.turns == day2_b.turns and day2_a.truth == day2_b.truth
    assert day2_a.counts.turns == len(day2_a.turns) > 0


def test_rewrite_fn_fixes_known_corruption(run: Run, tmp_path: Path) -> None:
    # a recurring not-understood corruption from the baseline run
    fails = Counter(
        (r["utterance"], t["intended_text"])
        for r, t in zip(run.turns, run.truth, strict=True)
        if t["asr_mode"] == "canonical" and t["outcome"] == "not_understood"
    )
    (bad, good), n_bad = fails.most_common(1)[0]
    assert n_bad >= 3
    first = next(
        r["turn_id"]
        for r, t in zip(run.turns, run.truth, strict=True)
        if r["utterance"] == bad and t["intended_text"] == good
    )
    requests: list[RewriteRequest] = []

    def rewrite_fn(req: RewriteRequest) -> RewriteResult:
        requests.append(req)
        hit = req.utterance == bad
        return RewriteResult(
            rewrite=good if hit else req.utterance,
            rewritten=hit,
            source="precomputed" if hit else "none",
            confidence=0.9 if hit else 0.0,
            model_version="test-v1",
            normalized=normalize_utterance(req.utterance),
            arm="treatment",
        )

    out = tmp_path / "rw"
    summary = simulate(CORPUS, users=300, days=2, seed=11, out=out, rewrite_fn=rewrite_fn)
    rw = Run(out, summary, days=2)
    row, truth = rw.by_id[first], rw.truth_by_id[first]
    assert row["utterance"] == bad
    assert row["rewrite"] == good and row["rewrite_source"] == "precomputed"
    assert row["arm"] == "treatment" and row["model_version"] == "test-v1"
    assert row["response"] != FAILURE_RESPONSE and row["intent"] == truth["intent"]
    assert truth["defective"] is False and truth["rewritten"] is True
    # every other occurrence of the corrupted text is fixed too; pass-through is not logged
    for r, t in zip(rw.turns, rw.truth, strict=True):
        assert r["arm"] == "treatment"
        if r["utterance"] == bad:
            assert r["rewrite"] == good and t["outcome"] == "success"
            assert t["original_outcome"] == "not_understood"  # the win/loss judge's baseline
        else:
            assert t["original_outcome"] == t["outcome"]
            assert "rewrite" not in r and "rewrite_source" not in r
    assert summary.rewrites == sum("rewrite" in r for r in rw.turns) > 0
    assert summary.defects < run.summary.defects
    # the rewriter saw the session context: earlier turns, oldest first
    with_ctx = [q for q in requests if q.context]
    assert with_ctx
    for q in with_ctx:
        ages = [c.seconds_ago for c in q.context]
        assert ages == sorted(ages, reverse=True) and ages[-1] > 0


def test_nlu_understand() -> None:
    corpus = SlurpCorpus.load(CORPUS)
    sim = Simulator(corpus, users=1, seed=0)
    goal = next(g for g in corpus.goals if g.intent == "weather_query" and g.slots)
    other = next(g for g in corpus.goals if g.intent == "play_music" and g.slots)
    text = corpus.realizations(goal)[0].text
    assert sim.understand(text, goal) == ("success", goal.key)
    assert sim.understand(text.upper() + "?", goal)[0] == "success"
    outcome, key = sim.understand(corpus.realizations(other)[0].text, goal)
    assert outcome == "wrong_action" and key == other.key
    assert sim.understand("blorf the quaxle", goal) == ("not_understood", None)
    # every realization of a goal parses back to it
    for g in corpus.goals[:300]:
        for r in corpus.realizations(g, 4):
            assert g.key in corpus.grammar.parse(r.text), r.text


def test_config_from_settings_and_errors(tmp_path: Path) -> None:
    cfg = SimulatorConfig.from_settings({"habit_share": 0.3, "turns_per_user_day": 6.0})
    assert cfg.habit_share == 0.3
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        simulate(tmp_path / "nope.jsonl", users=1, days=1, seed=0, out=tmp_path / "o")
    with pytest.raises(ValueError):
        simulate(CORPUS, users=0, days=1, seed=0, out=tmp_path / "o")
    with pytest.raises(ValueError):
        Simulator(CORPUS, users=1, seed=0, start=datetime(2026, 1, 5))
