"""DSTC2 importer on real calls (Henderson, Thomson & Williams, SIGDIAL 2014)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from offline.importers import import_dstc2
from rewrite.normalize import normalize_utterance

DSTC2_DIR = Path(__file__).resolve().parents[2] / "shared/data/dstc2"
TRAIN = DSTC2_DIR / "train.jsonl"
SPACING_S = 7.5

pytestmark = pytest.mark.skipif(
    not TRAIN.is_file(), reason=f"DSTC2 data not found at {TRAIN} (see shared/data/README.md)"
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _sample_lines() -> list[str]:
    """The first 5 calls of train.jsonl plus the first raw-log call with a barge-in."""
    lines: list[str] = []
    raw_line: str | None = None
    with TRAIN.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < 5:
                lines.append(line.rstrip("\n"))
                continue
            call = json.loads(line)
            if call["has_raw_log"] and any(t["system_aborted"] for t in call["turns"][1:]):
                raw_line = line.rstrip("\n")
                break
    assert raw_line is not None, "no raw-log call with a barge-in in train.jsonl"
    return [*lines, raw_line]


@pytest.fixture(scope="module")
def sample() -> list[dict[str, Any]]:
    return [json.loads(line) for line in _sample_lines()]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tmp = tmp_path_factory.mktemp("dstc2")
    src = tmp / "calls.jsonl"
    src.write_text("\n".join(_sample_lines()) + "\n", encoding="utf-8")
    summary = import_dstc2(src, tmp / "out", fixed_spacing_s=SPACING_S)
    return summary, tmp / "out"


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def test_counts_and_files(sample: list[dict[str, Any]], imported: tuple[Any, Path]) -> None:
    summary, out = imported
    all_turns = [t for c in sample for t in c["turns"]]
    empty = [t for t in all_turns if not t["asr_1best"].strip()]
    assert empty, "sample should contain empty-ASR turns"
    assert summary.calls == 6
    assert summary.user_turns == len(all_turns)
    assert summary.empty_asr == len(empty)
    assert summary.turns_written == len(all_turns) - len(empty)
    assert summary.quarantined == 0
    assert summary.callers == len({c["caller_id"] for c in sample})
    assert summary.calls_with_timing == 1
    rows = _read_jsonl(out / "turns.jsonl")
    assert len(rows) == summary.turns_written
    assert len(_read_jsonl(out / "truth.jsonl")) == summary.turns_written
    skipped = _read_jsonl(out / "skipped.jsonl")
    assert len(skipped) == len(empty)
    assert all(s["reason"].startswith("empty ASR") for s in skipped)
    assert (out / "quarantine.jsonl").read_text() == ""
    kept = [t for t in all_turns if t["asr_1best"].strip()]
    differs = sum(
        normalize_utterance(t["asr_1best"]) != normalize_utterance(t["transcription"]) for t in kept
    )
    assert summary.asr_differs_share == pytest.approx(differs / len(kept))


def test_rows_match_calls(sample: list[dict[str, Any]], imported: tuple[Any, Path]) -> None:
    _, out = imported
    rows = {r["turn_id"]: r for r in _read_jsonl(out / "turns.jsonl")}
    truth = {r["turn_id"]: r for r in _read_jsonl(out / "truth.jsonl")}
    barge_ins = 0
    for call in sample:
        start = datetime.fromisoformat(call["session_start"]).replace(tzinfo=UTC)
        turns = call["turns"]
        prev_ts: datetime | None = None
        for i, t in enumerate(turns):
            tid = f"{call['call_id']}:{t['turn_index']}"
            if not t["asr_1best"].strip():
                assert tid not in rows and tid not in truth
                continue
            r = rows[tid]
            assert r["user_id"] == call["caller_id"]
            assert r["call_id"] == call["call_id"]
            assert r["domain"] == "restaurant"
            assert r["utterance"] == t["asr_1best"]
            nxt = turns[i + 1] if i + 1 < len(turns) else None
            assert r.get("response") == (nxt["system"] if nxt else None)
            assert r.get("barge_in") == (nxt["system_aborted"] if nxt else None)
            barge_ins += r.get("barge_in") is True
            nb = t["asr_nbest"]
            expected_conf = nb[0][1] if nb and nb[0][0] == t["asr_1best"] else None
            assert r.get("asr_confidence") == expected_conf
            ts = _ts(r["timestamp"])
            if call["has_raw_log"]:
                assert ts == start + timedelta(seconds=t["start_time"])
            else:
                assert ts == start + timedelta(seconds=t["turn_index"] * SPACING_S)
            if prev_ts is not None:
                assert ts > prev_ts
            prev_ts = ts
            assert truth[tid]["intended_text"] == t["transcription"]
            assert truth[tid]["semantics"] == t["semantics"]
            assert truth[tid]["call_id"] == call["call_id"]
    assert barge_ins >= 1


def test_first_call_exact_values(imported: tuple[Any, Path]) -> None:
    _, out = imported
    rows = {r["turn_id"]: r for r in _read_jsonl(out / "turns.jsonl")}
    r = rows["voip-b772dbf437-20130402_143019:1"]
    assert r["utterance"] == "moderately priced swedish food"
    assert r["asr_confidence"] == 0.9891
    assert r["timestamp"] == "2013-04-02T14:30:26.500000Z"  # 14:30:19 + 1 * 7.5 s
    assert r["response"] == "Sorry there is no swedish restaurant in the moderate price range"
    assert "barge_in" not in r  # no raw log: unknown


def test_malformed_lines_quarantined(tmp_path: Path, imported: tuple[Any, Path]) -> None:
    clean, _ = imported
    lines = _sample_lines()
    missing_caller = json.loads(lines[0])
    del missing_caller["caller_id"]
    missing_caller["call_id"] = "broken-call"
    src = tmp_path / "calls.jsonl"
    bad = [
        *lines[:2],
        '{"call_id": "truncated", "turns": [',
        json.dumps(missing_caller),
        *lines[2:],
    ]
    src.write_text("\n".join(bad) + "\n", encoding="utf-8")
    summary = import_dstc2(src, tmp_path / "out", fixed_spacing_s=SPACING_S)
    q = _read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [(r["line"], r["reason"].split(":")[0]) for r in q] == [
        (3, "invalid JSON"),
        (4, "malformed call"),
    ]
    assert "caller_id" in q[1]["reason"]
    assert summary.quarantined == summary.quarantined_calls == 2
    assert summary.calls == clean.calls
    assert summary.turns_written == clean.turns_written
    assert summary.empty_asr == clean.empty_asr


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="DSTC2 input file not found"):
        import_dstc2(tmp_path / "nope.jsonl", tmp_path / "out")
