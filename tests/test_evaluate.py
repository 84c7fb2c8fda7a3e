"""Replay evaluation on a tiny hand-written log + truth with a dict-lookup rewrite function."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from offline.evaluate import load_truth, replay_evaluate, win_loss
from rewrite.normalize import normalize_utterance
from rewrite.types import RewriteRequest, RewriteResult

T0 = datetime(2024, 1, 1, tzinfo=UTC)

# (turn_id, user, seconds after T0, utterance, intended text or None, response, barge_in)
TURNS: list[tuple[str, str, float, str, str | None, str, bool | None]] = [
    ("b2", "B", 30, "wheather today", "weather today", "", None),
    ("a1", "A", 0, "play the beatles", "play the beatles", "Playing.", False),
    ("a2", "A", 20, "play let it bee", "play let it be", "Sorry, I don't know that.", True),
    ("a3", "A", 40, "set a timer", "set a timer", "", None),
    ("a4", "A", 1000, "turn on lights", None, "Which lights?", None),
    ("a5", "A", 1010, "turn on the lights", "turn on the lights", "", None),
    ("b1", "B", 10, "call mum", "call mom", "", None),
    ("b3", "B", 50, "weather tomorrow", "weather tomorrow", "", None),
]

# utterance -> (rewrite, source); anything else passes through
REWRITES = {
    "play let it bee": ("play let it be", "precomputed"),  # win
    "call mum": ("call mom", "precomputed"),  # win
    "wheather today": ("weather today", "global"),  # win
    "set a timer": ("set an alarm", "global"),  # loss
    "turn on the lights": ("Turn on the lights!", "global"),  # tie (same after normalizing)
}


class DictRewriter:
    """Records every request; rewrites by exact utterance lookup."""

    def __init__(self) -> None:
        self.requests: dict[str, RewriteRequest] = {}

    def __call__(self, req: RewriteRequest) -> RewriteResult:
        self.requests[req.request_id] = req
        norm = normalize_utterance(req.utterance)
        if req.utterance in REWRITES:
            text, source = REWRITES[req.utterance]
            return RewriteResult(text, True, source, 0.9, "test", norm)
        return RewriteResult(req.utterance, False, "none", 0.0, "test", norm, reason="no_pair")


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    logs: list[Any] = []
    truth: list[Any] = []
    for tid, user, sec, utt, intended, response, barge_in in TURNS:
        row: dict[str, Any] = {
            "turn_id": tid,
            "user_id": user,
            "timestamp": (T0 + timedelta(seconds=sec)).isoformat(),
            "utterance": utt,
            "response": response or None,
            "barge_in": barge_in,
        }
        logs.append(row)
        if intended is not None:
            truth.append({"turn_id": tid, "intended_text": intended, "call_id": "c"})
    logs.append({"turn_id": "bad", "user_id": "A", "timestamp": "2024-01-01T00:00:00"})  # naive
    truth.append({"turn_id": "not-in-logs", "intended_text": "whatever"})
    truth.append({"turn_id": "no-text"})  # malformed truth row: skipped
    return _write(tmp_path / "turns.jsonl", logs), _write(tmp_path / "truth.jsonl", truth)


def test_counts_and_ratios(files: tuple[Path, Path]) -> None:
    logs, truth = files
    rep = replay_evaluate([logs], truth, DictRewriter())
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    assert (d["turns"], d["turns_in"], d["missing_truth"], d["quarantined"]) == (7, 8, 1, 1)
    assert (d["rewritten"], d["wins"], d["losses"], d["ties"], d["errors"]) == (5, 3, 1, 1, 0)
    assert d["win_loss_ratio"] == 3.0
    assert d["win_loss_ratio_str"] == "3:1"
    assert d["coverage"] == pytest.approx(5 / 7)
    # 20 reference words; before: bee, mum, wheather = 3 edits; after: alarm swap = 2 edits
    assert d["wer_before"] == pytest.approx(3 / 20)
    assert d["wer_after"] == pytest.approx(2 / 20)
    assert d["by_source"] == {"global": 3, "none": 2, "precomputed": 2}
    assert d["outcomes_by_source"] == {
        "global": {"win": 1, "loss": 1, "tie": 1},
        "precomputed": {"win": 2, "loss": 0, "tie": 0},
    }
    # replay order is by time: b1 (10 s), a2 (20 s), b2 (30 s), a3 (40 s), a5 (1010 s)
    assert [e["turn_id"] for e in d["examples"]] == ["b1", "a2", "b2", "a3", "a5"]
    assert [e["outcome"] for e in d["examples"]] == ["win", "win", "win", "loss", "tie"]
    a3 = d["examples"][3]
    assert (a3["utterance"], a3["rewrite"], a3["intended"]) == (
        "set a timer",
        "set an alarm",
        "set a timer",
    )
    assert (a3["source"], a3["confidence"], a3["wer_after"]) == (
        "global",
        0.9,
        pytest.approx(2 / 3),
    )


def test_examples_first_wins_and_losses(files: tuple[Path, Path]) -> None:
    logs, truth = files
    rep = replay_evaluate([logs], truth, DictRewriter(), examples=2)
    assert [(e["turn_id"], e["outcome"]) for e in rep.examples] == [("b1", "win"), ("a3", "loss")]
    assert replay_evaluate([logs], truth, DictRewriter(), examples=0).examples == []


def test_context_is_per_user_within_window(files: tuple[Path, Path]) -> None:
    logs, truth = files
    fn = DictRewriter()
    replay_evaluate([logs], truth, fn)
    assert "a4" not in fn.requests  # no truth: not sent
    ctx = {tid: [(c.utterance, c.seconds_ago) for c in r.context] for tid, r in fn.requests.items()}
    assert ctx["a1"] == [] and ctx["b1"] == []
    assert ctx["b2"] == [("call mum", 20.0)]  # A's turns at 0 s and 20 s are not B's context
    assert ctx["a3"] == [("play the beatles", 40.0), ("play let it bee", 20.0)]
    assert ctx["a5"] == [("turn on lights", 10.0)]  # a1-a3 are > 300 s old; a4 has no truth
    a2_ctx = fn.requests["a3"].context[1]
    assert (a2_ctx.response, a2_ctx.barge_in) == ("Sorry, I don't know that.", True)
    assert fn.requests["a3"].user_id == "A"


def test_context_capped_at_five(tmp_path: Path) -> None:
    rows = [
        {
            "turn_id": f"c{i}",
            "user_id": "C",
            "timestamp": (T0 + timedelta(seconds=i)).isoformat(),
            "utterance": f"turn number {i}",
        }
        for i in range(8)
    ]
    logs = _write(tmp_path / "t.jsonl", rows)
    truth = _write(tmp_path / "truth.jsonl", [{"turn_id": "c7", "intended_text": "x"}])
    fn = DictRewriter()
    rep = replay_evaluate([logs], truth, fn)
    assert (rep.turns, rep.missing_truth, rep.rewritten) == (1, 7, 0)
    assert [c.utterance for c in fn.requests["c7"].context] == [
        f"turn number {i}" for i in range(2, 7)
    ]


def test_rewrite_fn_errors_are_counted(files: tuple[Path, Path]) -> None:
    logs, truth = files

    def broken(req: RewriteRequest) -> RewriteResult:
        raise RuntimeError("service down")

    rep = replay_evaluate([logs], truth, broken)
    assert (rep.turns, rep.errors, rep.rewritten, rep.by_source) == (7, 7, 0, {"error": 7})
    assert rep.wer_after == rep.wer_before == pytest.approx(3 / 20)
    assert (rep.win_loss_ratio, rep.win_loss_ratio_str, rep.coverage) == (0.0, "0:0", 0.0)


def test_win_loss_formatting() -> None:
    assert win_loss(7, 0) == (7.0, "7:0")
    assert win_loss(0, 0) == (0.0, "0:0")
    assert win_loss(12, 1) == (12.0, "12:1")
    assert win_loss(17, 2) == (8.5, "8.5:1")
    assert win_loss(0, 3) == (0.0, "0:1")


def test_load_truth_and_missing_paths(files: tuple[Path, Path], tmp_path: Path) -> None:
    _, truth = files
    t = load_truth(truth)
    assert len(t) == 8 and t["b1"] == "call mom" and "no-text" not in t
    with pytest.raises(FileNotFoundError, match="truth file not found"):
        load_truth(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):
        replay_evaluate([tmp_path / "missing.jsonl"], truth, DictRewriter())


def test_task_success_win_loss(files: tuple[Path, Path]) -> None:
    logs, truth = files

    # a toy NLU that understands only exact intended texts, plus "set an alarm" as a timer
    def success(text: str, intended: str) -> bool:
        t, i = normalize_utterance(text), normalize_utterance(intended)
        return t == i or (t, i) == ("set an alarm", "set a timer")

    rep = replay_evaluate([logs], truth, DictRewriter(), success_fn=success)
    # wins: bee, mum, wheather fixed; "set an alarm" still succeeds (no loss); tie stays ok
    assert (rep.task_wins, rep.task_losses, rep.task_win_loss_ratio_str) == (3, 0, "3:0")
    assert (rep.wins, rep.losses) == (3, 1)  # the WER view still counts the alarm as a loss
    plain = replay_evaluate([logs], truth, DictRewriter())
    assert plain.task_wins is None and plain.task_win_loss_ratio is None
