"""The closed-loop experiment: simulated users through the real gRPC service, nightly job
between days, per-turn outcomes in the metrics store, and the analysis over them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import redis
from rich.console import Console

from offline.ab.analysis import analyze
from offline.ab.loop import ExperimentPlan, outcome_rows, run_experiment
from offline.ab.store import OutcomeStore
from rewrite.config import Settings
from rewrite.privacy import pseudonymize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = DATA / "slurp" / "utterances.jsonl"
KEY = b"test-key"


def _turn(tid: str, user: str, rewrite: str | None = None, arm: str = "global") -> dict:
    row = {"turn_id": tid, "user_id": user, "timestamp": "2026-03-02T08:00:00+00:00",
           "utterance": "play jaz", "arm": arm, "model_version": "v1"}  # fmt: skip
    if rewrite:
        row.update(rewrite=rewrite, rewrite_source="global")
    return row


def _truth(tid: str, outcome: str, original: str) -> dict:
    return {"turn_id": tid, "session_id": "s1", "domain": "music",
            "defective": outcome != "success", "outcome": outcome,
            "original_outcome": original}  # fmt: skip


def test_outcome_rows_judge_wins_losses_and_ties() -> None:
    turns = [_turn("t1", "alice", "play jazz"), _turn("t2", "alice", "play jams"),
             _turn("t3", "bob", "play jazz"), _turn("t4", "bob")]  # fmt: skip
    truth = [_truth("t1", "success", "not_understood"), _truth("t2", "wrong_action", "success"),
             _truth("t3", "success", "success"), _truth("t4", "success", "success")]  # fmt: skip
    defects = pa.table({"turn_id": ["t1", "t2", "t3", "t4", "other"],
                        "defect": [False, True, False, False, True],
                        "reasons": ["", "rephrased", "", "", "barge_in"]})  # fmt: skip
    tbl = outcome_rows("exp", 3, turns, truth, defects, KEY).to_pylist()
    assert [r["rewrite_outcome"] for r in tbl] == ["win", "loss", "tie", None]
    assert [r["rewritten"] for r in tbl] == [True, True, True, False]
    assert [r["defect"] for r in tbl] == [False, True, False, False]
    assert tbl[1]["defect_reasons"] == "rephrased" and tbl[1]["true_defect"] is True
    assert tbl[0]["user"] == pseudonymize("alice", KEY) != "alice"
    assert {r["day"] for r in tbl} == {3} and tbl[3]["rewrite"] is None
    with pytest.raises(ValueError, match="no defect label"):
        outcome_rows("exp", 1, turns, truth, defects.slice(1), KEY)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not CORPUS.exists(), reason=f"SLURP not found at {CORPUS}")
def test_closed_loop_through_grpc(
    settings: Settings, dpr_dir: Path, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    s = settings.model_copy(deep=True)
    s.dpr.artifacts_dir = dpr_dir
    s.dpr.index_root = tmp_path / "index"
    s.rerank.artifacts_dir = tmp_path / "no-ranker"
    plan = ExperimentPlan(name="loop-test", users=160, days=2, warmup_days=1, train_ranker=False)
    res = run_experiment(s, CORPUS, tmp_path / "exp", plan, console=Console(quiet=True))

    assert [d.rpc_errors for d in res.days] == [0, 0]
    store = OutcomeStore(res.store_root)
    assert store.days("loop-test") == [1, 2]
    tbl = store.read("loop-test")
    assert tbl.num_rows == sum(d.turns for d in res.days) > 1000
    rows = tbl.to_pylist()
    arms = {r["arm"] for r in rows}
    assert arms == {"control", "precomputed", "global", "global_personal"}
    # each user stays in one arm; control never rewrites; only the arm's layers rewrite
    by_user: dict[str, set[str]] = {}
    for r in rows:
        by_user.setdefault(r["user"], set()).add(r["arm"])
    assert all(len(a) == 1 for a in by_user.values())
    assert not any(r["rewritten"] for r in rows if r["arm"] == "control")
    assert all(r["rewrite_source"] == "precomputed" for r in rows
               if r["arm"] == "precomputed" and r["rewritten"])  # fmt: skip
    assert all(r["rewrite_source"] != "personal" for r in rows if r["arm"] == "global")
    assert any(r["rewritten"] for r in rows)
    assert all(r["rewrite_outcome"] in {"win", "loss", "tie"} for r in rows if r["rewritten"])
    assert all(r["true_defect"] is not None for r in rows)
    # the next day serves what the last night published
    assert res.days[1].served_version == res.days[0].published_version
    for d in res.days:
        versions = {r["model_version"] for r in rows if r["day"] == d.day and r["arm"] != "control"}
        assert versions == {d.served_version}
    # the defect rule labels agree with the simulator's truth far above chance
    agree = sum(r["defect"] == r["true_defect"] for r in rows) / len(rows)
    assert agree > 0.8
    report = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert report == analyze(tbl, experiment="loop-test", shares=res.report.srm and
                             res.report.srm.expected_shares).to_dict()  # fmt: skip
    assert report["srm"]["mismatch"] is False
