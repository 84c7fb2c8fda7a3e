"""The nightly job end to end on hand-written logs, then published and served in-process."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from logrows import turn_line

from offline.job import read_pairs, run_nightly
from rewrite.config import Settings
from rewrite.rewriter import Rewriter
from rewrite.types import RewriteRequest

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
FAIL = "Sorry, I didn't understand that."


def _turn(tid: str, user: str, sec: float, utt: str, response: str = "OK.", **kw: object) -> str:
    return turn_line(tid, user, sec, utt, response, t0=T0, **kw)


def _logs(tmp_path: Path) -> Path:
    lines = []
    for k in range(4):  # four users hit the same misrecognition and rephrase
        u, base = f"user{k}", k * 1000
        lines += [
            _turn(f"{u}-1", u, base, "whats the whether in boston", FAIL, barge_in=True),
            _turn(f"{u}-2", u, base + 4, "what's the weather in boston", "It is sunny."),
        ]
        lines.append(_turn(f"{u}-3", u, base + 600, "turn on the lights"))  # new session
    lines.append(_turn("other-1", "user9", 0, "play jazz"))
    lines.append('{"turn_id": "bad", ')  # quarantined, not fatal
    p = tmp_path / "logs" / "day-01.jsonl"
    p.parent.mkdir()
    p.write_text("\n".join(lines) + "\n")
    return p


def test_nightly_mines_the_recurring_fix(tmp_path: Path, settings: Settings) -> None:
    logs = _logs(tmp_path)
    run = tmp_path / "run"
    report = run_nightly([logs], run, settings)
    assert report.counts["rows_in"] == 14
    assert report.counts["turns_valid"] == 13 and report.counts["rows_quarantined"] == 1
    assert report.counts["sessions"] == 9 and report.counts["rephrase_links"] == 4
    assert report.counts["defects"]["barge_in"] == 4
    pairs = read_pairs(run / "pairs.parquet")
    assert [(p.source, p.rewrite, p.support, p.n_users) for p in pairs] == [
        ("whats the whether in boston", "what's the weather in boston", 4, 4)
    ]
    assert pairs[0].absorption_probability == pytest.approx(1.0)
    assert pq.read_table(run / "pairs.parquet").schema.names == [
        "source",
        "rewrite",
        "absorption_probability",
        "support",
        "n_users",
    ]
    saved = json.loads((run / "report.json").read_text())
    assert saved["quarantined"]["rows"] == 1 and "total" in saved["timings_s"]
    q = [json.loads(x) for x in (run / "quarantine.jsonl").read_text().splitlines()]
    assert q[0]["line"] == 14 and q[0]["reason"].startswith("invalid JSON")


@pytest.mark.integration
def test_publish_then_rewrite(
    tmp_path: Path, settings: Settings, redis_url: str, clean_redis: None
) -> None:
    report = run_nightly([_logs(tmp_path)], tmp_path / "run", settings, publish=True)
    assert report.publish is not None and report.publish["n_pairs"] == 1
    rewriter = Rewriter(settings)
    rewriter.warm_up()
    res = rewriter.rewrite(RewriteRequest("Whats the WHETHER in Boston?", user_id="new-user"))
    assert res.rewritten and res.rewrite == "what's the weather in boston"
    assert res.source == "precomputed" and res.model_version == report.publish["version"]
    same = rewriter.rewrite(RewriteRequest("turn on the lights", user_id="u"))
    assert not same.rewritten and same.rewrite == "turn on the lights"
    assert same.reason == "succeeds_globally"  # a catalog entry: the online layer keeps it
    rewriter.close()


def test_bert_detector_without_artifact_refuses_clearly(tmp_path: Path, settings: Settings) -> None:
    from offline.rephrase import DetectorModelMissingError

    s = settings.model_copy(deep=True)
    s.rephrase.detector = "bert_span"
    s.rephrase.artifacts_dir = tmp_path / "no-models"
    s.rephrase.on_missing_model = "refuse"
    with pytest.raises(DetectorModelMissingError, match="qrw train detector"):
        run_nightly([_logs(tmp_path)], tmp_path / "run", s)
