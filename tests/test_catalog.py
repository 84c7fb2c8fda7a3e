"""Global catalog and personal histories from hand-written turns (offline.catalog)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from logrows import turn_line

from offline.catalog import (
    CatalogEntry,
    PersonalEntry,
    build_catalog,
    read_catalog,
    read_personal,
    write_catalog,
    write_personal,
)
from offline.defects import DefectRule, label_turns
from offline.job import run_nightly
from offline.rephrase import RephraseLink
from offline.sessionize import Turn, sessionize
from rewrite.config import CatalogSettings, DefectSettings, Settings
from rewrite.privacy import pseudonymize
from rewrite.retrieval import DeviceTypeStat

FAIL = "Sorry, I didn't understand that."
KEY = b"test-key"
RULE = DefectRule(DefectSettings())


class _Log:
    """Builds turns; each turn is 1000 s after the previous one unless ``ts`` is given."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []

    def add(
        self,
        user: str,
        text: str,
        response: str = "OK.",
        ts: float | None = None,
        barge_in: bool = False,
        feedback: int = 0,
        domain: str = "",
        intent: str = "",
        device_type: str = "",
    ) -> int:
        idx = len(self.turns)
        when = ts if ts is not None else 1000.0 * idx
        turn = Turn(
            idx, f"t{idx}", user, when, text, text, response, barge_in, feedback, "", domain,
            intent, device_type=device_type,
        )  # fmt: skip
        self.turns.append(turn)
        return idx

    def build(
        self, cfg: CatalogSettings, links: list[RephraseLink] | None = None
    ) -> tuple[list[CatalogEntry], list[PersonalEntry]]:
        sessions = sessionize(self.turns, 300.0)
        labels = label_turns(self.turns, sessions, links or [], RULE)
        res = build_catalog(self.turns, labels, cfg, KEY)
        assert res.n_turns == len(self.turns)
        return res.catalog, res.personal


def test_success_is_no_defect_signal_and_not_rephrased() -> None:
    log = _Log()
    log.add("u1", "play jazz", ts=0)
    log.add("u1", "whats the whether", ts=10, barge_in=True)
    log.add("u1", "call mom", FAIL, ts=20)
    log.add("u1", "call mum", ts=30, feedback=-1)
    log.add("u1", "set timer", ts=40)  # fine on its face, but rephrased by the next turn
    log.add("u1", "set a timer", ts=45)
    sessions = sessionize(log.turns, 300.0)
    labels = label_turns(log.turns, sessions, [RephraseLink(4, 5, 0.9)], RULE)
    assert [not lab.defect for lab in labels] == [True, False, False, False, False, True]


def test_global_catalog_thresholds_metadata_and_order() -> None:
    log = _Log()
    for user, dom, intent in [("u1", "music", "play"), ("u2", "music", "play"), ("u3", "", "x")]:
        log.add(user, "play jazz", domain=dom, intent=intent)
    log.add("u1", "rare one")
    log.add("u2", "rare one")  # 2 turns < min_frequency
    for _ in range(3):
        log.add("u1", "only me")  # 1 user < min_users
    for i in range(10):  # success rate exactly 0.7 -> kept
        log.add(f"u{i % 2}", "flaky", FAIL if i >= 7 else "OK.", domain="b" if i < 5 else "a")
    for i in range(10):  # 0.6 -> dropped
        log.add(f"u{i % 2}", "flakier", FAIL if i >= 6 else "OK.")
    catalog, _ = log.build(CatalogSettings(min_frequency=3, min_users=2, min_success_rate=0.7))
    assert [e.text for e in catalog] == ["flaky", "play jazz"]  # frequency descending
    flaky, jazz = catalog
    assert (flaky.frequency, flaky.n_users) == (10, 2)
    assert flaky.success_rate == pytest.approx(0.7)
    assert flaky.domain == "a" and flaky.intent == ""  # 5:5 tie -> alphabetical; none logged
    assert flaky.last_seen == max(t.ts for t in log.turns if t.normalized == "flaky")
    assert (jazz.frequency, jazz.n_users, jazz.success_rate) == (3, 3, 1.0)
    assert (jazz.domain, jazz.intent) == ("music", "play")  # empty values do not count


def test_device_type_counts_per_entry_most_turns_first_capped() -> None:
    log = _Log()
    # "show the weather": 4 turns on displays (all fine), 3 on speakers (2 fail), 1 unknown
    for i in range(4):
        log.add(f"u{i}", "show the weather", device_type="display")
    for i in range(3):
        log.add(f"u{i}", "show the weather", FAIL if i else "OK.", device_type="speaker")
    log.add("u9", "show the weather")
    for dev in ("tv", "car", "phone"):  # one turn each: ties broken by name, cap 2 drops phone
        log.add(f"w-{dev}", "what's the weather", device_type=dev)
    log.add("w-x", "what's the weather")
    cfg = CatalogSettings(min_frequency=3, min_users=2, min_success_rate=0.5, max_device_types=2)
    catalog, _ = log.build(cfg)
    by_text = {e.text: e for e in catalog}
    show = by_text["show the weather"]
    assert (show.frequency, show.success_rate) == (8, 6 / 8)
    assert show.device_types == (
        DeviceTypeStat("display", 4, 4),
        DeviceTypeStat("speaker", 3, 1),
    )
    assert by_text["what's the weather"].device_types == (
        DeviceTypeStat("car", 1, 1),
        DeviceTypeStat("phone", 1, 1),
    )
    # no device types logged: no device-type data
    log2 = _Log()
    for i in range(3):
        log2.add(f"u{i}", "play jazz")
    assert log2.build(CatalogSettings())[0][0].device_types == ()


def test_rephrased_turns_do_not_count_as_successes() -> None:
    log = _Log()
    links = []
    for u in ("u1", "u2", "u3"):
        a = log.add(u, "set timer")
        b = log.add(u, "set a timer", ts=log.turns[a].ts + 5)
        links.append(RephraseLink(a, b, 0.9))
    catalog, personal = log.build(CatalogSettings(min_frequency=3, min_users=2), links)
    assert [e.text for e in catalog] == ["set a timer"]
    assert {p.text for p in personal} == {"set a timer"}


def test_personal_thresholds_caps_order_and_pseudonyms() -> None:
    log = _Log()
    for _ in range(3):
        log.add("alice", "x")
    log.add("alice", "y", ts=800)
    log.add("alice", "y", ts=900)
    log.add("alice", "z", ts=950)
    log.add("alice", "z", ts=1000)  # same count as y, more recent
    log.add("alice", "w", ts=1100)  # one success < personal_min_count
    for i in range(5):  # 2 of 5 succeed: rate 0.4 < 0.5
        log.add("alice", "v", FAIL if i >= 2 else "OK.", ts=2000 + 1000 * i)
    log.add("bob", "x", ts=100)
    log.add("bob", "x", ts=200)
    log.add("bob", "x", FAIL, ts=700)
    log.add("bob", "x", FAIL, ts=1400)  # 2 of 4: rate 0.5 -> kept; last success at 200
    cfg = CatalogSettings(
        personal_min_count=2, personal_max_per_user=2, personal_min_success_rate=0.5
    )
    _, personal = log.build(cfg)
    alice, bob = pseudonymize("alice", KEY), pseudonymize("bob", KEY)
    by_user: dict[str, list[tuple[str, int, float]]] = {}
    for p in personal:
        by_user.setdefault(p.user, []).append((p.text, p.count, p.last_seen))
    assert set(by_user) == {alice, bob}
    assert [t for t, _, _ in by_user[alice]] == ["x", "z"]  # most used, then most recent; cap 2
    assert by_user[alice][1] == ("z", 2, 1000.0)
    assert by_user[bob] == [("x", 2, 200.0)]  # last *successful* use
    assert all("alice" not in p.user and "bob" not in p.user for p in personal)


def test_uncapped_personal_history_keeps_every_success() -> None:
    log = _Log()
    for i in range(5):
        log.add("carol", f"utterance {i}")
    _, personal = log.build(CatalogSettings(personal_max_per_user=200))
    assert len(personal) == 5 and {p.count for p in personal} == {1}


def test_empty_input_gives_empty_outputs() -> None:
    catalog, personal = _Log().build(CatalogSettings())
    assert catalog == [] and personal == []


def test_parquet_round_trip_and_exact_columns(tmp_path: Path) -> None:
    cat = [
        CatalogEntry("play jazz", 5, 3, 0.8, "music", "play", 1.5e9, (DeviceTypeStat("tv", 2, 1),)),
        CatalogEntry("call mom", 4, 2, 1.0, "", "", 1.6e9),
    ]
    pers = [PersonalEntry("ab" * 16, "play jazz", 3, 1.5e9)]
    write_catalog(cat, tmp_path / "catalog.parquet")
    write_personal(pers, tmp_path / "personal.parquet")
    assert pq.read_table(tmp_path / "catalog.parquet").schema.names == [
        "text",
        "frequency",
        "n_users",
        "success_rate",
        "domain",
        "intent",
        "last_seen",
        "device_types",
    ]
    assert pq.read_table(tmp_path / "personal.parquet").schema.names == [
        "user",
        "text",
        "count",
        "last_seen",
    ]
    assert read_catalog(tmp_path / "catalog.parquet") == cat  # order = FAISS ids
    assert read_personal(tmp_path / "personal.parquet") == pers
    with pytest.raises(ValueError, match="columns"):
        read_catalog(tmp_path / "personal.parquet")
    # a catalog written before device types were recorded still reads (no device-type data)
    old = pq.read_table(tmp_path / "catalog.parquet").drop_columns(["device_types"])
    pq.write_table(old, tmp_path / "old.parquet")
    assert [e.device_types for e in read_catalog(tmp_path / "old.parquet")] == [(), ()]
    with pytest.raises(FileNotFoundError):
        read_personal(tmp_path / "missing.parquet")


T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _row(tid: str, user: str, sec: float, utt: str, response: str = "OK.", **kw: object) -> str:
    return turn_line(tid, user, sec, utt, response, t0=T0, **kw)


def test_nightly_writes_catalog_and_personal(tmp_path: Path, settings: Settings) -> None:
    lines = []
    for k in range(4):
        u, base = f"user{k}", k * 1000
        lines += [
            _row(f"{u}-1", u, base, "whats the whether in boston", FAIL, barge_in=True),
            _row(f"{u}-2", u, base + 4, "what's the weather in boston", "It is sunny."),
            _row(f"{u}-3", u, base + 600, "turn on the lights", domain="home", intent="on"),
        ]
    lines.append(_row("other-1", "user9", 0, "play jazz"))
    logs = tmp_path / "day.jsonl"
    logs.write_text("\n".join(lines) + "\n")
    report = run_nightly([logs], tmp_path / "run", settings)
    catalog = read_catalog(tmp_path / "run" / "catalog.parquet")
    assert [(e.text, e.frequency, e.n_users, e.domain) for e in catalog] == [
        ("turn on the lights", 4, 4, "home"),
        ("what's the weather in boston", 4, 4, ""),
    ]
    personal = read_personal(tmp_path / "run" / "personal.parquet")
    assert len(personal) == 9 and len({p.user for p in personal}) == 5
    assert not any(p.user.startswith("user") for p in personal)
    assert "whats the whether in boston" not in {p.text for p in personal}
    c = report.counts
    assert (c["catalog_entries"], c["personal_users"], c["personal_entries"]) == (2, 5, 9)
    assert c["success_turns"] == 9 and c["utterances"] == 4
    assert "catalog" in report.timings_s
