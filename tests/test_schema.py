"""Turn-log validation and quarantine: the job never stops on a bad row and loses none."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from offline.schema import TurnValidator, read_turn_logs, write_quarantine

GOOD = {"turn_id": "t1", "user_id": "u1", "timestamp": "2026-01-05T10:00:00Z", "utterance": "hi"}


def _row(**kw: object) -> dict[str, object]:
    return {**GOOD, **kw}


def test_malformed_rows_are_quarantined_with_reason_and_line(tmp_path: Path) -> None:
    lines = [
        json.dumps(_row(turn_id="ok1", extra_field={"kept": True})),
        '{"turn_id": "broken", "user_id": ',  # bad JSON
        json.dumps({k: v for k, v in _row(turn_id="m").items() if k != "user_id"}),
        json.dumps(_row(turn_id="wt", utterance=42)),  # wrong type
        json.dumps(_row(turn_id="e", utterance="   ")),  # empty utterance
        json.dumps(_row(turn_id="h", utterance="a" * 100_000)),  # huge text
        json.dumps(_row(turn_id="naive", timestamp="2026-01-05T10:00:00")),
        json.dumps(_row(turn_id="fut", timestamp="2099-01-01T00:00:00Z")),
        json.dumps(_row(turn_id="ok1")),  # duplicate turn_id
        json.dumps(_row(turn_id="conf", asr_confidence=1.5)),
        json.dumps(_row(turn_id="fb", feedback=3)),
        "[1, 2, 3]",
        "",
        json.dumps(_row(turn_id="ok2", barge_in=True, feedback=-1)),
    ]
    p = tmp_path / "day.jsonl"
    p.write_text("\n".join(lines) + "\n")
    res = read_turn_logs([p], TurnValidator(now=datetime(2026, 2, 1, tzinfo=UTC)))
    assert [t.turn_id for t in res.turns] == ["ok1", "ok2"]
    assert res.turns[0].model_extra == {"extra_field": {"kept": True}}
    assert res.rows_in == len(res.turns) + len(res.quarantined) == 13  # blank line skipped
    by_line = {q.line: q.reason for q in res.quarantined}
    assert by_line[2].startswith("invalid JSON")
    assert "user_id" in by_line[3]
    assert "utterance" in by_line[4]
    assert by_line[5].startswith("utterance") and "empty" in by_line[5]
    assert "too long" in by_line[6]
    assert "time zone" in by_line[7]
    assert "future" in by_line[8]
    assert "duplicate" in by_line[9]
    assert "asr_confidence" in by_line[10]
    assert "feedback" in by_line[11]
    assert "not a JSON object" in by_line[12]
    out = tmp_path / "q.jsonl"
    assert write_quarantine(res.quarantined, out) == 11
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"source", "line", "reason", "raw"} and first["line"] == 2


def test_parquet_reader_validates_the_same_way(tmp_path: Path) -> None:
    rows = [_row(turn_id="a"), _row(turn_id="b", utterance=""), _row(turn_id="c")]
    p = tmp_path / "day.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    res = read_turn_logs([p])
    assert [t.turn_id for t in res.turns] == ["a", "c"]
    assert len(res.quarantined) == 1 and res.quarantined[0].line == 2


def test_truncated_parquet_is_quarantined_not_fatal(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    bad = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([_row(turn_id="z")]), bad)
    bad.write_bytes(bad.read_bytes()[:20])
    res = read_turn_logs([tmp_path])
    assert [t.turn_id for t in res.turns] == ["t1"]
    assert len(res.quarantined) == 1 and "unreadable" in res.quarantined[0].reason


def test_device_type_is_normalized_and_a_free_text_value_is_quarantined(tmp_path: Path) -> None:
    lines = [
        json.dumps(_row(turn_id="a", device_type=" Smart Display ")),
        json.dumps(_row(turn_id="b", device_type="")),
        json.dumps(_row(turn_id="c")),
        json.dumps(_row(turn_id="d", device_type="speaker; drop table")),
        json.dumps(_row(turn_id="e", device_type="x" * 65)),
        json.dumps(_row(turn_id="f", device_type=7)),
    ]
    p = tmp_path / "day.jsonl"
    p.write_text("\n".join(lines) + "\n")
    res = read_turn_logs([p], TurnValidator(now=datetime(2026, 2, 1, tzinfo=UTC)))
    assert [(t.turn_id, t.device_type) for t in res.turns] == [
        ("a", "smart_display"),
        ("b", None),
        ("c", None),
    ]
    reasons = {q.line: q.reason for q in res.quarantined}
    assert set(reasons) == {4, 5, 6} and all("device_type" in r for r in reasons.values())
    assert "[a-z0-9_.-]" in reasons[4] and "longer than 64" in reasons[5]
