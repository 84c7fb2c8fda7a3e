"""Guardrails before publish (offline.guardrails): canary rewrites and the changed-pair share
refuse a publish (the previous version stays active), --force overrides, rollback after a
refusal restores the first version. Real Redis; the job runs with the heuristic detector.

Rollback itself is covered by tests/test_publish.py::test_rollback_restores_previous_and_
expires_old (library: three versions, TTLs, nothing left to roll back to) and
tests/test_cli.py::test_nightly_publish_rewrite_rollback (`qrw nightly --publish` twice, then
`qrw rollback`, the served rewrite of version 2 disappears); here: a refused publish leaves
the version history alone, so `qrw rollback` after two publishes and a refusal restores the
first version exactly.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from logrows import turn_row
from typer.testing import CliRunner

from offline.cli import app
from offline.guardrails import (
    PublishRefusedError,
    changed_share_check,
    evaluate_guardrails,
    load_canaries,
)
from offline.job import run_nightly
from offline.markov import RewritePair
from rewrite import keyspace
from rewrite.config import PROJECT_ROOT, GuardrailSettings, Settings, load_settings
from rewrite.normalize import normalize_utterance

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
FAIL = "Sorry, I didn't understand that."
CITIES = [
    "boston", "denver", "austin", "dallas", "miami", "chicago", "seattle", "portland",
    "phoenix", "atlanta", "houston", "detroit", "memphis", "raleigh", "tampa", "omaha",
    "tulsa", "fresno", "reno", "boise", "orlando", "madison", "spokane", "toledo", "akron",
]  # fmt: skip
USERS = ("u0", "u1", "u2")  # k = 3 distinct users behind every pair


def _row(tid: str, user: str, sec: float, utt: str, response: str = "OK.", **kw: object) -> dict:
    return turn_row(tid, user, sec, utt, response, t0=T0, **kw)


def _write(path: Path, fixes: list[tuple[str, str]]) -> Path:
    """Logs in which each of USERS says ``wrong`` (a failure, barged in) then ``right`` (a
    success) for every fix, one session per fix: each fix becomes a pair with 3 users."""
    rows = []
    for u, user in enumerate(USERS):
        for i, (wrong, right) in enumerate(fixes):
            base = (u * len(fixes) + i) * 1000
            rows.append(_row(f"{user}-{i}a", user, base, wrong, FAIL, barge_in=True))
            rows.append(_row(f"{user}-{i}b", user, base + 4, right, "Here it is."))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _weather(cities: list[str], right: str = "what's the weather in {}") -> list[tuple[str, str]]:
    return [(f"whats the whether in {c}", right.format(c)) for c in cities]


@pytest.fixture
def s(settings: Settings) -> Settings:
    """Default guardrails (canary list, max share 0.5, 20 pairs); no FAISS index build."""
    out = settings.model_copy(deep=True)
    out.dpr.build_index = False
    return out


# ---------------------------------------------------------------- unit checks


def test_shipped_canary_list_is_well_formed() -> None:
    settings = load_settings()
    assert settings.guardrails.canary_file == Path("configs/canary.txt")
    canaries = load_canaries(settings.guardrails.canary_file)
    assert 35 <= len(canaries) <= 60
    assert "what's the weather today" in canaries and "turn off the lights" in canaries
    raw = (PROJECT_ROOT / "configs" / "canary.txt").read_text().splitlines()
    listed = [x for x in raw if x.strip() and not x.startswith("#")]
    assert len(listed) == len(canaries)  # no duplicates, nothing lost to normalization
    assert all(normalize_utterance(x) == x for x in listed)  # already in normalized form


def test_load_canaries_normalizes_skips_comments_and_refuses_empty(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("# comment\n\n  Turn OFF the lights!  \nturn off the lights\nStop.\n")
    assert load_canaries(f) == ["turn off the lights", "stop"]
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no utterance"):
        load_canaries(f)
    with pytest.raises(FileNotFoundError):
        load_canaries(tmp_path / "missing.txt")


def test_canary_as_source_fails_as_target_passes() -> None:
    cfg = GuardrailSettings()
    canaries = ["turn off the lights", "stop"]
    target_ok = [RewritePair("turn of the lights", "turn off the lights", 0.9, 3, 3)]
    res = evaluate_guardrails(target_ok, canaries, {}, None, cfg)
    assert res.passed and res.refused is None
    assert res.checks["canary"]["rewritten"] == 0 and res.checks["canary"]["precision"] == 1.0
    bad = [*target_ok, RewritePair("stop", "stop the music", 0.8, 3, 3)]
    res = evaluate_guardrails(bad, canaries, {}, None, cfg)
    assert not res.passed and "canary" in str(res.refused)
    assert res.checks["canary"]["examples"] == ["stop"]
    assert res.checks["canary"]["precision"] == pytest.approx(0.5)
    loose = cfg.model_copy(update={"max_canary_rewrites": 1})
    assert evaluate_guardrails(bad, canaries, {}, None, loose).passed
    off = cfg.model_copy(update={"enabled": False})
    res = evaluate_guardrails(bad, canaries, {}, None, off)
    assert res.passed and not res.enabled and res.checks == {}


def test_changed_share_counts_changed_removed_added() -> None:
    active = {f"s{i}": f"r{i}" for i in range(20)}
    new = [RewritePair(f"s{i}", f"r{i}", 0.9, 3, 3) for i in range(17)]  # s17..s19 removed
    new[0] = RewritePair("s0", "other", 0.9, 3, 3)  # changed
    new += [RewritePair(f"n{i}", "x", 0.9, 3, 3) for i in range(4)]  # added
    c = changed_share_check(new, active, "v1", 0.5, 20, 1.0)
    assert (c["changed"], c["removed"], c["added"]) == (1, 3, 4)
    assert c["share"] == pytest.approx(4 / 20) and c["passed"] and c["skipped"] is None
    assert c["added_share"] == pytest.approx(4 / 20)
    assert not changed_share_check(new, active, "v1", 0.19, 20)["passed"]
    # growth is checked apart from churn: 4 new on 20 passes at 0.2, not at 0.19
    assert changed_share_check(new, active, "v1", 0.5, 20, 0.2)["passed"]
    assert not changed_share_check(new, active, "v1", 0.5, 20, 0.19)["passed"]
    small = changed_share_check(new, active, "v1", 0.0, 21)  # active has 20 < 21 pairs
    assert small["passed"] and "20 < 21" in small["skipped"] and small["share"] is None
    none = changed_share_check(new, {}, None, 0.0, 0)
    assert none["passed"] and none["skipped"] == "no active version"


# ---------------------------------------------------------------- the job on real Redis


@pytest.mark.integration
def test_canary_rewrite_refused_previous_version_stays(
    tmp_path: Path, s: Settings, clean_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = run_nightly([_write(tmp_path / "d1.jsonl", _weather(CITIES[:3]))], tmp_path / "r1", s,
                     publish=True)  # fmt: skip
    assert v1.publish is not None and v1.guardrails is not None and v1.guardrails["passed"]
    version1 = v1.publish["version"]
    # "turn on the lights" is a canary: three users fail with it and say "switch on the lights"
    fixes = [*_weather(CITIES[:3]), ("turn on the lights", "switch on the lights")]
    with (
        caplog.at_level(logging.WARNING, logger="offline"),
        pytest.raises(PublishRefusedError) as err,
    ):
        run_nightly([_write(tmp_path / "d2.jsonl", fixes)], tmp_path / "r2", s, publish=True)
    assert "canary" in err.value.reason and "turn on the lights" in err.value.reason
    assert clean_redis.get(keyspace.ACTIVE) == version1
    assert clean_redis.lrange(keyspace.VERSIONS, 0, -1) == [version1]
    versions = {k.split(":")[1] for k in clean_redis.scan_iter(match="qrw:v*:*")}
    assert versions == {version1}  # nothing of the refused version was written
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert report["publish"] is None and report["counts"]["pairs"] == 4
    g = report["guardrails"]
    assert g["refused"] == err.value.reason and not g["passed"] and not g["forced"]
    assert g["checks"]["canary"]["rewritten"] == 1
    assert g["checks"]["canary"]["examples"] == ["turn on the lights"]
    assert g["checks"]["changed_share"]["skipped"]  # 3 active pairs < 20
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING and "refused" in
                r.getMessage()]  # fmt: skip
    assert len(refusals) == 1 and "canary" in refusals[0].getMessage()


@pytest.mark.integration
def test_too_many_changed_pairs_refused_within_threshold_published(
    tmp_path: Path, s: Settings, clean_redis: redis.Redis
) -> None:
    v1 = run_nightly([_write(tmp_path / "d1.jsonl", _weather(CITIES))], tmp_path / "r1", s,
                     publish=True)  # fmt: skip
    assert v1.publish is not None and v1.publish["n_pairs"] == 25
    version1 = v1.publish["version"]
    # 13 of 25 rewrites change (share 0.52 > 0.5): refused
    changed = _weather(CITIES[:13], "what is the weather in {}") + _weather(CITIES[13:])
    with pytest.raises(PublishRefusedError, match=r"changed-pair share 0\.520"):
        run_nightly([_write(tmp_path / "d2.jsonl", changed)], tmp_path / "r2", s, publish=True)
    assert clean_redis.get(keyspace.ACTIVE) == version1
    c = json.loads((tmp_path / "r2" / "report.json").read_text())["guardrails"]["checks"]
    assert c["changed_share"]["changed"] == 13 and c["changed_share"]["share"] == 0.52
    assert c["canary"]["passed"]
    # 8 changed + 2 removed = 10 of 25 -> 0.40 (2 added -> 0.08): published
    ok = (
        _weather(CITIES[:8], "what is the weather in {}")
        + _weather(CITIES[8:23])
        + _weather(["el paso", "fargo"])
    )
    rep = run_nightly([_write(tmp_path / "d3.jsonl", ok)], tmp_path / "r3", s, publish=True)
    assert rep.publish is not None and rep.publish["previous"] == version1
    assert clean_redis.get(keyspace.ACTIVE) == rep.publish["version"] != version1
    g = rep.guardrails
    assert g is not None and g["passed"] and g["refused"] is None
    cs = g["checks"]["changed_share"]
    assert (cs["changed"], cs["removed"], cs["added"], cs["share"]) == (8, 2, 2, 0.4)
    assert cs["added_share"] == 0.08


@pytest.mark.integration
def test_cli_refuses_with_exit_3_force_publishes_rollback_restores_first(
    tmp_path: Path, redis_url: str, clean_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRW_REDIS__URL", redis_url)
    monkeypatch.setenv("QRW_DPR__BUILD_INDEX", "false")
    runner = CliRunner()

    def nightly(name: str, fixes: list[tuple[str, str]], *flags: str) -> tuple[int, str]:
        logs = _write(tmp_path / f"{name}.jsonl", fixes)
        res = runner.invoke(app, ["nightly", "--logs", str(logs), "--out",
                                  str(tmp_path / name), *flags])  # fmt: skip
        return res.exit_code, res.output

    code, out = nightly("r1", _weather(CITIES[:3]), "--publish")
    assert code == 0, out
    first = clean_redis.get(keyspace.ACTIVE)
    code, out = nightly("r2", _weather(CITIES[:4]), "--publish")
    assert code == 0, out
    second = clean_redis.get(keyspace.ACTIVE)
    assert second not in (None, first)
    canary_fix = [*_weather(CITIES[:4]), ("turn on the lights", "switch on the lights")]
    code, out = nightly("r3", canary_fix, "--publish")
    assert code == 3 and "publish refused" in out and "canary" in out, out
    assert clean_redis.get(keyspace.ACTIVE) == second
    assert clean_redis.lrange(keyspace.VERSIONS, 0, -1) == [second, first]
    code, out = nightly("r3f", canary_fix, "--force")
    assert code == 2 and "--publish" in out  # --force alone is a usage error
    # `qrw rollback` after two publishes (and a refusal) restores the first version
    res = runner.invoke(app, ["rollback"])
    assert res.exit_code == 0, res.output
    assert clean_redis.get(keyspace.ACTIVE) == first
    assert clean_redis.hget(keyspace.pair_key(str(first), "whats the whether in boston"),
                            "rewrite") == "what's the weather in boston"  # fmt: skip
    assert not clean_redis.exists(keyspace.pair_key(str(first), "whats the whether in miami"))
    # --force publishes over the failed check, and says so
    code, out = nightly("r4", canary_fix, "--publish", "--force")
    assert code == 0 and "guardrails overridden" in out, out
    forced = clean_redis.get(keyspace.ACTIVE)
    assert forced not in (first, second)
    assert clean_redis.hget(keyspace.pair_key(str(forced), "turn on the lights"),
                            "rewrite") == "switch on the lights"  # fmt: skip
    g = json.loads((tmp_path / "r4" / "report.json").read_text())["guardrails"]
    assert g["forced"] and not g["passed"] and "canary" in g["refused"]


@pytest.mark.integration
def test_disabled_guardrails_and_missing_canary_file(
    tmp_path: Path, s: Settings, clean_redis: redis.Redis
) -> None:
    logs = _write(tmp_path / "d.jsonl", [("turn on the lights", "switch on the lights")])
    missing = s.model_copy(deep=True)
    missing.guardrails.canary_file = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="canary_file"):
        run_nightly([logs], tmp_path / "r0", missing, publish=True)
    assert not (tmp_path / "r0" / "report.json").exists()  # refused before any work
    run_nightly([logs], tmp_path / "r0", missing)  # without publish the file is not needed
    off = s.model_copy(deep=True)
    off.guardrails.enabled = False
    rep = run_nightly([logs], tmp_path / "r1", off, publish=True)
    assert rep.publish is not None and rep.publish["n_pairs"] == 1
    assert rep.guardrails == {"enabled": False, "passed": True, "refused": None,
                              "forced": False, "checks": {}}  # fmt: skip
