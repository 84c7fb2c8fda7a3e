"""The ``qrw`` CLI end to end: import → nightly --publish → rewrite over gRPC → rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offline.cli import app
from rewrite.server import RewriteServer

pytestmark = pytest.mark.integration

DSTC2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dstc2" / "train.jsonl"
FAIL = "Sorry, I didn't understand that."


def _logs(path: Path, wrong: str, right: str, users: int, day: int) -> Path:
    rows = []
    for u in range(users):
        t = f"2026-01-0{day}T10:{u:02d}:"
        rows.append({"turn_id": f"d{day}u{u}a", "user_id": f"u{u}", "timestamp": t + "00Z",
                     "utterance": wrong, "response": FAIL})  # fmt: skip
        rows.append({"turn_id": f"d{day}u{u}b", "user_id": f"u{u}", "timestamp": t + "05Z",
                     "utterance": right, "response": "OK."})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    return path


def test_nightly_publish_rewrite_rollback(
    tmp_path: Path, redis_url: str, clean_redis: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRW_REDIS__URL", redis_url)
    runner = CliRunner()
    day1 = _logs(tmp_path / "d1.jsonl", "turn of the lights", "turn off the lights", 3, 1)
    res = runner.invoke(app, ["nightly", "--logs", str(day1), "--out", str(tmp_path / "r1"),
                              "--publish"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r1" / "report.json").read_text())["counts"]["pairs"] == 1
    assert (tmp_path / "r1" / "quarantine.jsonl").read_text().count("\n") == 1
    day2 = _logs(tmp_path / "d2.jsonl", "call mum", "call mom", 3, 2)
    res = runner.invoke(app, ["nightly", "--logs", str(day1), "--logs", str(day2),
                              "--out", str(tmp_path / "r2"), "--publish"])  # fmt: skip
    assert res.exit_code == 0, res.output

    from rewrite.config import load_settings

    with RewriteServer(load_settings(), port=0) as server:
        res = runner.invoke(app, ["rewrite", "Call Mum!", "--user", "x", "--target", server.target])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["rewrite"] == "call mom" and out["source"] == "precomputed"
        res = runner.invoke(app, ["rewrite", "", "--user", "x", "--target", server.target])
        assert res.exit_code == 2 and "utterance" in res.output

        assert runner.invoke(app, ["rollback"]).exit_code == 0
        # the service caches the active version for service.version_cache_s (1 s)
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            res = runner.invoke(app, ["rewrite", "call mum", "--user", "x",
                                      "--target", server.target])  # fmt: skip
            if not json.loads(res.output)["rewritten"]:
                break
            time.sleep(0.2)
        assert json.loads(res.output)["rewritten"] is False  # version 1 had no such pair
    assert runner.invoke(app, ["rollback"]).exit_code == 2  # nothing older


def test_evaluate_run_dir(tmp_path: Path) -> None:
    runner = CliRunner()
    logs = _logs(tmp_path / "d1.jsonl", "turn of the lights", "turn off the lights", 3, 1)
    assert (
        runner.invoke(app, ["nightly", "--logs", str(logs), "--out", str(tmp_path / "r")]).exit_code
        == 0
    )
    truth = tmp_path / "truth.jsonl"
    truth.write_text(
        "".join(
            json.dumps({"turn_id": f"d1u{u}{k}", "intended_text": "turn off the lights"}) + "\n"
            for u in range(3)
            for k in "ab"
        )
    )
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate", "--logs", str(logs), "--truth", str(truth),
                              "--run", str(tmp_path / "r"), "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert (rep["turns"], rep["rewritten"], rep["wins"], rep["losses"]) == (6, 3, 3, 0)
    assert rep["coverage"] == pytest.approx(0.5)
    bad = runner.invoke(app, ["evaluate", "--logs", str(logs), "--truth", str(truth)])
    assert bad.exit_code != 0


@pytest.mark.skipif(not DSTC2.exists(), reason=f"DSTC2 data not found at {DSTC2}")
def test_import_dstc2_cli(tmp_path: Path) -> None:
    src = tmp_path / "calls.jsonl"
    src.write_text("".join(DSTC2.read_text().splitlines(keepends=True)[:3]))
    res = CliRunner().invoke(app, ["import", "dstc2", str(src), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "turns.jsonl").exists() and (tmp_path / "o" / "truth.jsonl").exists()


def test_redis_start_returns_with_its_output_piped(tmp_path: Path) -> None:
    """``qrw redis start 2>&1 | tee log`` returns: the server it leaves running writes to its
    log file, not to the caller's stdout/stderr pipes (an inherited pipe stays open for as
    long as the server runs, so a reader would wait forever). ``qrw redis stop`` stops it."""
    import os
    import subprocess
    import sys

    from rewrite.redis_server import EmbeddedRedis

    data_dir = tmp_path / "redis"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QRW_REDIS__URL")}
    env["QRW_REDIS__DATA_DIR"] = str(data_dir)
    cmd = [sys.executable, "-c", "from offline.cli import main; main()", "redis"]
    try:
        res = subprocess.run([*cmd, "start"], env=env, capture_output=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert b"redis-server pid" in res.stdout
        assert EmbeddedRedis(data_dir).ping()
        res = subprocess.run([*cmd, "stop"], env=env, capture_output=True, timeout=30)
        assert res.returncode == 0 and b"stopped" in res.stdout, res.stderr
        assert not EmbeddedRedis(data_dir).ping()
    finally:
        EmbeddedRedis(data_dir).stop()  # by its pid file: only the server this test started
