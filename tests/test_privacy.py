"""Privacy of self-learning: k-anonymity of everything shared across users
(``privacy.min_users_global``), ``qrw forget-user`` and the forget list, and no raw user id
in logs, Prometheus metrics, Redis or the run directory's outputs.

Users only ever see their own personal history: tests/test_personal.py::
test_users_only_see_their_own_history (two users, a stranger, a pseudonym used as an id, another
deployment key); here after forget-user the forgotten user's history is gone while another
user's is intact.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import prometheus_client
import pyarrow.parquet as pq
import pytest
import redis
from logrows import turn_row
from typer.testing import CliRunner

from offline.catalog import PersonalEntry, build_catalog
from offline.cli import app
from offline.defects import DefectRule, label_turns
from offline.forget import forget_user, read_forgotten
from offline.job import run_nightly
from offline.markov import RephraseChain, RewritePair, mine_pairs
from offline.publish import PublishError, connect, publish_pairs
from offline.sessionize import Turn, sessionize
from rewrite import keyspace
from rewrite.client import RewriteClient
from rewrite.config import (
    FULL_PIPELINE,
    CatalogSettings,
    DefectSettings,
    MarkovSettings,
    Settings,
    load_settings,
)
from rewrite.personal import PersonalStore
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.server import RewriteServer
from rewrite.store import MembershipFilter
from rewrite.types import InvalidRequestError, RewriteRequest

T0 = datetime(2026, 2, 2, 9, 0, tzinfo=UTC)
FAIL = "Sorry, I didn't understand that."
KEY = b"privacy-test-key"
BOSTON = ("whats the whether in boston", "what's the weather in boston")  # a recurring fix


def _row(tid: str, user: str, sec: float, utt: str, response: str = "OK.", **kw: object) -> dict:
    return turn_row(tid, user, sec, utt, response, t0=T0, **kw)


def _fix(user: str, tid: str, base: float, wrong: str, right: str) -> list[dict]:
    """``user`` says ``wrong`` (failure, barge-in), then ``right`` (success) 4 s later."""
    return [
        _row(f"{tid}a", user, base, wrong, FAIL, barge_in=True),
        _row(f"{tid}b", user, base + 4, right, "Here it is."),
    ]


def _dump(rows: list[dict], path: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


# ------------------------------------------------------------------ k-anonymity (unit)

W, X = "wether in boston", "weather in boston"


def _chains(users: list[str]) -> list[RephraseChain]:
    return [RephraseChain((W, X), True, u) for u in users] + [RephraseChain((X,), True, "z")]


def test_default_k_is_3_and_above_the_section_thresholds() -> None:
    s = load_settings()
    assert s.privacy.min_users_global == 3
    assert s.markov.min_users < 3 and s.catalog.min_users < 3  # the floor is what bites


def test_markov_pair_needs_k_distinct_users() -> None:
    lax = MarkovSettings(min_support=1, min_users=1)
    pairs, stats = mine_pairs(_chains(["a", "b"]), lax, min_users_global=3)
    assert pairs == [] and stats.rejected == {"users": 1} and stats.min_users_effective == 3
    pairs, _ = mine_pairs(_chains(["a", "b", "b", "a"]), lax, min_users_global=3)
    assert pairs == []  # support 4 chains, but 2 users
    pairs, stats = mine_pairs(_chains(["a", "b", "c"]), lax, min_users_global=3)
    assert [(p.source, p.rewrite, p.n_users) for p in pairs] == [(W, X, 3)]
    assert stats.rejected == {}
    strict = MarkovSettings(min_support=1, min_users=4)  # section above k: max() = 4
    assert mine_pairs(_chains(["a", "b", "c"]), strict, min_users_global=3)[0] == []
    assert mine_pairs(_chains(["a", "b"]), lax)[0] != []  # without the floor: 1 user is enough


def _turns(spec: list[tuple[str, str]]) -> list[Turn]:
    return [
        Turn(i, f"t{i}", user, 1000.0 * i, text, text, "OK.", False, 0, "")
        for i, (user, text) in enumerate(spec)
    ]


def test_catalog_entry_needs_k_distinct_users_personal_unaffected() -> None:
    cfg = CatalogSettings(min_frequency=3, min_users=1)
    rule = DefectRule(DefectSettings())

    def catalog(spec: list[tuple[str, str]]) -> tuple[set[str], set[tuple[str, str]]]:
        turns = _turns(spec)
        res = build_catalog(
            turns, label_turns(turns, sessionize(turns, 300.0), [], rule), cfg, KEY, 3
        )
        return {e.text for e in res.catalog}, {(p.user, p.text) for p in res.personal}

    two = [("a", "play jazz"), ("a", "play jazz"), ("b", "play jazz"), ("b", "play jazz")]
    texts, personal = catalog(two)
    assert texts == set()  # frequency 4 >= 3, but 2 users < k
    assert (pseudonymize("a", KEY), "play jazz") in personal  # personal layer keeps it
    texts, _ = catalog([*two, ("c", "play jazz")])
    assert texts == {"play jazz"}


# ------------------------------------------------------------------ k-anonymity (the job)


@pytest.mark.integration
def test_job_publishes_pair_and_catalog_entry_only_with_k_users(
    tmp_path: Path, settings: Settings, clean_redis: redis.Redis
) -> None:
    s = settings.model_copy(deep=True)
    s.dpr.build_index = False
    wrong, right = "whats the whether in boston", "what's the weather in boston"

    def run(name: str, users: list[str]) -> dict:
        rows = [r for i, u in enumerate(users) for r in _fix(u, f"{u}-", i * 1000, wrong, right)]
        rep = run_nightly([_dump(rows, tmp_path / f"{name}.jsonl")], tmp_path / name, s,
                          publish=True)  # fmt: skip
        assert rep.publish is not None
        catalog = set(pq.read_table(tmp_path / name / "catalog.parquet")["text"].to_pylist())
        return {"version": rep.publish["version"], "pairs": rep.counts["pairs"],
                "rejected": rep.markov["rejected"], "catalog": catalog}  # fmt: skip

    k_minus_1 = run("two", ["u1", "u2"])
    assert k_minus_1["pairs"] == 0 and k_minus_1["rejected"] == {"users": 1}
    assert right not in k_minus_1["catalog"]
    assert not clean_redis.exists(keyspace.pair_key(k_minus_1["version"], wrong))
    k = run("three", ["u1", "u2", "u3"])
    assert k["pairs"] == 1 and right in k["catalog"]
    stored = clean_redis.hgetall(keyspace.pair_key(k["version"], wrong))
    assert stored["rewrite"] == right and stored["n_users"] == "3"


# ------------------------------------------------------------------ forget-user

ALICE = "raw-alice-7731"  # the user who asks to be forgotten


def _forget_logs(path: Path) -> Path:
    """Pair A is supported by alice, u1, u2 (exactly k); pair B by alice, u1, u2, u3; alice
    and u1 have personal histories; one of alice's rows is malformed (quarantined)."""
    rows: list[dict] = []
    for i, u in enumerate([ALICE, "u1", "u2"]):
        rows += _fix(u, f"a{i}", i * 1000, *BOSTON)
    for i, u in enumerate([ALICE, "u1", "u2", "u3"]):
        rows += _fix(u, f"b{i}", 10000 + i * 1000, "turn of the kitchen light",
                     "turn off the kitchen light")  # fmt: skip
    rows += [_row(f"p{d}", ALICE, 20000 + d * 1000, "play my running playlist") for d in range(2)]
    rows += [_row(f"g{d}", "u1", 30000 + d * 1000, "call grandma") for d in range(2)]
    bad = json.dumps({"turn_id": "bad1", "user_id": ALICE, "timestamp": "not a time",
                      "utterance": "x"})  # fmt: skip
    return _dump(rows, path, (bad + "\n",))


@pytest.fixture
def forget_settings(settings: Settings, tmp_path: Path) -> Settings:
    s = settings.model_copy(deep=True)
    s.dpr.build_index = False
    s.privacy.user_key = KEY.decode()
    s.privacy.forget_file = tmp_path / "var" / "forgotten_users.txt"
    return s


@pytest.mark.integration
def test_forget_user_removes_personal_layer_and_future_contributions(
    tmp_path: Path,
    forget_settings: Settings,
    redis_url: str,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = forget_settings
    logs = _forget_logs(tmp_path / "day1.jsonl")
    extra = _dump([_row("x1", "u3", 50000, "play some jazz")], tmp_path / "day2.jsonl")
    rep1 = run_nightly([logs], tmp_path / "r1", s, publish=True)
    rep2 = run_nightly([logs, extra], tmp_path / "r2", s, publish=True)
    assert rep1.publish and rep2.publish and rep1.publish["version"] != rep2.publish["version"]
    v1, v2 = rep1.publish["version"], rep2.publish["version"]
    assert rep2.counts["pairs"] == 2
    store = PersonalStore(redis_url, KEY, version_cache_s=0.0)
    assert "play my running playlist" in store.history(ALICE).texts
    assert len(store.history(ALICE, version=v1)) == 3  # the playlist and both fixes

    monkeypatch.setenv("QRW_REDIS__URL", redis_url)
    monkeypatch.setenv("QRW_PRIVACY__USER_KEY", KEY.decode())
    monkeypatch.setenv("QRW_PRIVACY__FORGET_FILE", str(s.privacy.forget_file))
    clean_redis.expire(keyspace.personal_users_key(v1), 3600)  # as a superseded version's keys
    res = CliRunner().invoke(app, ["forget-user", ALICE])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    pseudo = pseudonymize(ALICE, KEY)
    assert out["pseudonym"] == pseudo and ALICE not in res.output
    assert out["deleted_keys"] == 2 and out["versions"] == sorted([v1, v2])
    # gone from the active version and from the one kept for rollback; u1's history intact
    assert len(store.history(ALICE)) == 0 and len(store.history(ALICE, version=v1)) == 0
    assert store.history("u1").texts[0] == "call grandma"
    assert clean_redis.sismember(keyspace.FORGOTTEN, pseudo)
    assert s.privacy.forget_file is not None
    assert s.privacy.forget_file.read_text() == pseudo + "\n"
    assert not list(clean_redis.scan_iter(match=keyspace.personal_pattern(pseudo)))
    # and from both versions' filters of users with a history (u1 still listed)
    for v in (v1, v2):
        raw = clean_redis.execute_command("GET", keyspace.personal_users_key(v), NEVER_DECODE=True)
        members = MembershipFilter.from_bytes(raw)
        assert pseudo not in members and pseudonymize("u1", KEY) in members
    assert 0 < clean_redis.ttl(keyspace.personal_users_key(v1)) <= 3600  # expiry kept
    again = CliRunner().invoke(app, ["forget-user", ALICE])
    assert again.exit_code == 0 and json.loads(again.output)["already_listed"]
    assert json.loads(again.output)["deleted_keys"] == 0
    assert s.privacy.forget_file.read_text() == pseudo + "\n"  # listed once
    assert CliRunner().invoke(app, ["forget-user", " "]).exit_code == 2

    # the next run on the same logs: alice's turns are dropped before sessionization
    rep3 = run_nightly([logs, extra], tmp_path / "r3", s, publish=True)
    assert rep3.publish is not None
    v3 = rep3.publish["version"]
    assert rep3.counts["forgotten_turns"] == 6 and rep3.counts["turns_valid"] == 19
    pairs = {(p["source"], p["n_users"]) for p in
             pq.read_table(tmp_path / "r3" / "pairs.parquet").to_pylist()}  # fmt: skip
    # pair A had exactly k users with alice: without her it falls below k; B keeps 3 users
    assert pairs == {("turn of the kitchen light", 3)}
    assert not clean_redis.exists(keyspace.pair_key(v3, "whats the whether in boston"))
    assert clean_redis.hget(keyspace.pair_key(v3, "turn of the kitchen light"), "n_users") == "3"
    personal = pq.read_table(tmp_path / "r3" / "personal.parquet").to_pylist()
    assert pseudo not in {p["user"] for p in personal}
    assert "play my running playlist" not in {p["text"] for p in personal}
    assert not clean_redis.exists(keyspace.personal_version_key(v3, pseudo))
    assert len(store.history(ALICE)) == 0 and store.history("u1").texts[0] == "call grandma"
    # her quarantined row is kept as a count, without its raw text
    quarantine = (tmp_path / "r3" / "quarantine.jsonl").read_text()
    assert quarantine.count("\n") == 1 and ALICE not in quarantine
    assert ALICE in (tmp_path / "r1" / "quarantine.jsonl").read_text()  # before: it was there
    assert ALICE not in (tmp_path / "r3" / "report.json").read_text()
    store.close()


@pytest.mark.integration
def test_forget_list_file_alone_is_enough_for_the_job(
    tmp_path: Path, forget_settings: Settings, clean_redis: redis.Redis
) -> None:
    """The embedded Redis keeps no snapshot: after a restart the file still forgets."""
    s = forget_settings
    assert s.privacy.forget_file is not None
    s.privacy.forget_file.parent.mkdir(parents=True)
    s.privacy.forget_file.write_text("# forgotten\n" + pseudonymize(ALICE, KEY) + "\n")
    assert read_forgotten(s.privacy.forget_file, clean_redis) == {pseudonymize(ALICE, KEY)}
    rep = run_nightly([_forget_logs(tmp_path / "d.jsonl")], tmp_path / "r", s)  # no publish
    assert rep.counts["forgotten_turns"] == 6 and rep.counts["pairs"] == 1


@pytest.mark.integration
def test_publish_skips_forgotten_users_and_forget_waits_for_the_lock(
    redis_url: str, clean_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect(redis_url)
    pa, pb = pseudonymize("alice", KEY), pseudonymize("bob", KEY)
    personal = [PersonalEntry(pa, "call mom", 2, 1.7e9), PersonalEntry(pb, "play jazz", 1, 1.7e9)]
    pairs = [RewritePair("call mum", "call mom", 0.9, 3, 3)]
    clean_redis.sadd(keyspace.FORGOTTEN, pb)
    res = publish_pairs(client, pairs, personal=personal)
    assert (res.n_personal_users, res.n_forgotten_skipped) == (1, 1)
    assert clean_redis.exists(keyspace.personal_version_key(res.version, pa))
    assert not clean_redis.exists(keyspace.personal_version_key(res.version, pb))
    # a user forgotten after the job read the list but before the flip: publish refuses
    clean_redis.srem(keyspace.FORGOTTEN, pb)
    stale = connect(redis_url)
    monkeypatch.setattr(stale, "smembers", lambda name: set())  # the list as read earlier
    clean_redis.sadd(keyspace.FORGOTTEN, pb)
    with pytest.raises(PublishError, match="forgotten while this publish ran"):
        publish_pairs(stale, [*pairs, RewritePair("x", "y", 0.9, 3, 3)], personal=personal)
    assert clean_redis.get(keyspace.ACTIVE) == res.version
    assert not clean_redis.exists(keyspace.PUBLISH_LOCK)
    # forget-user waits for a running publish (the lock), then gives up with a clear error
    clean_redis.set(keyspace.PUBLISH_LOCK, "a-publish", ex=30)
    with pytest.raises(PublishError, match="retry forget-user"):
        forget_user(client, "alice", KEY, None, lock_wait_s=0.3)
    assert clean_redis.exists(keyspace.personal_version_key(res.version, pa))
    clean_redis.delete(keyspace.PUBLISH_LOCK)
    done = forget_user(client, "alice", KEY, None)
    assert done.deleted_keys == 1 and done.versions == [res.version] and done.forget_file is None
    assert not clean_redis.exists(keyspace.personal_version_key(res.version, pa))
    assert clean_redis.get(keyspace.PUBLISH_LOCK) is None  # released
    with pytest.raises(ValueError):
        forget_user(client, "", KEY, None)


# ------------------------------------------------------------------ no raw ids anywhere

RAW = [f"raw-user-zz9-plural-z-{x}" for x in ("alpha", "beta", "gamma", "delta")]
MARK = "zz9-plural-z"  # part of every raw id above, in no pseudonym (hex) or utterance


def _leaks(text: str | bytes) -> bool:
    t = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    return MARK.encode() in t


def _raw_logs(path: Path) -> Path:
    alpha, beta, gamma, delta = RAW
    rows: list[dict] = []
    for i, u in enumerate([alpha, beta, gamma]):  # a precomputed pair (k = 3) and a catalog
        rows += _fix(u, f"f{i}", i * 1000, *BOSTON)
        rows += [_row(f"w{i}{d}", u, 5000 + i * 1000 + d * 400, "what's the weather in wilmington")
                 for d in range(2)]  # fmt: skip
    rows += [_row(f"d{d}", delta, 20000 + d * 1000, "what's the weather in wilkesboro")
             for d in range(3)]  # fmt: skip
    bad = json.dumps({"turn_id": "q1", "user_id": delta, "timestamp": "yesterday",
                      "utterance": "x"})  # fmt: skip
    return _dump(rows, path, (bad + "\n",))


@pytest.mark.integration
def test_no_raw_user_id_in_logs_metrics_redis_or_outputs(
    tmp_path: Path,
    settings: Settings,
    dpr_dir: Path,
    clean_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _leaks(RAW[0]) and not _leaks(pseudonymize(RAW[0], KEY))  # the probe works
    s = settings.model_copy(deep=True)
    s.privacy.user_key = KEY.decode()
    s.privacy.forget_file = tmp_path / "forgotten.txt"
    s.dpr.artifacts_dir = dpr_dir
    s.dpr.index_root = tmp_path / "index"
    s.rerank.artifacts_dir = tmp_path / "no-ranker"
    s.rerank.trigger_threshold = 0.55  # as tests/test_online.py (zero-shot MiniLM)
    s.service.pipeline = list(FULL_PIPELINE)
    caplog.set_level(logging.DEBUG)
    for name in ("offline", "rewrite"):
        caplog.set_level(logging.DEBUG, logger=name)

    run = tmp_path / "run"
    report = run_nightly([_raw_logs(tmp_path / "day.jsonl")], run, s, publish=True)
    assert report.publish is not None and report.counts["pairs"] == 1
    assert report.publish["n_personal_users"] == 4
    answers = []
    with (
        RewriteServer(s, host="127.0.0.1", port=0, metrics_port=0) as server,
        RewriteClient(server.target) as client,
    ):
        for u in RAW:
            for text in ("whats the whether in boston", "what's the weather in wilkerson",
                         "set a timer for ten minutes"):  # fmt: skip
                answers.append(client.rewrite(RewriteRequest(text, user_id=u, request_id="r1")))
            with pytest.raises(InvalidRequestError):
                client.rewrite(RewriteRequest("", user_id=u))
            with pytest.raises(InvalidRequestError):
                client.rewrite(RewriteRequest("play jazz", user_id=u * 20))  # over 256 chars
        assert server.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
            served_metrics = r.read()
    forget_user(connect(s.redis.url), RAW[3], KEY, s.privacy.forget_file)
    # the requests really exercised the layers that see user ids
    sources = {a.source for a in answers if a.rewritten}
    assert {"precomputed", "personal"} <= sources, [(a.source, a.reason) for a in answers]

    records = caplog.records
    names = {r.name for r in records}
    assert {"offline.job", "offline.forget"} <= names
    assert any(n.startswith("rewrite.") for n in names)
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    leaked = [fmt.format(r) for r in records if _leaks(fmt.format(r))]
    assert not leaked, leaked[:3]
    assert not _leaks(prometheus_client.generate_latest())
    assert served_metrics and not _leaks(served_metrics)

    raw_redis = redis.Redis.from_url(s.redis.url)  # bytes: vectors are binary
    try:
        n_keys = 0
        for key in raw_redis.scan_iter(match="*", count=1000):
            n_keys += 1
            assert not _leaks(key), key
            kind = raw_redis.type(key)
            if kind == b"string":
                values = [raw_redis.get(key) or b""]
            elif kind == b"hash":
                values = [b"%s=%s" % kv for kv in raw_redis.hgetall(key).items()]
            elif kind == b"list":
                values = raw_redis.lrange(key, 0, -1)
            elif kind == b"set":
                values = list(raw_redis.smembers(key))
            else:
                values = [str(raw_redis.dump(key)).encode()]
            assert not any(_leaks(v) for v in values), key
        assert n_keys >= 7  # active, versions, meta, pair, personal hashes, forget set
    finally:
        raw_redis.close()

    # the run directory: everything but quarantine.jsonl (raw rejected rows, by design)
    assert not _leaks((run / "report.json").read_text())
    for f in run.glob("*.parquet"):
        assert not _leaks(json.dumps(pq.read_table(f).to_pylist(), default=str)), f
    assert _leaks((run / "quarantine.jsonl").read_text())
    assert user_key_from_settings(s) == KEY
