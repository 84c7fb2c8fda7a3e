"""The A/B outcome store (offline.ab.store): hive-partitioned Parquet read with DuckDB."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from ab_synth import make_table, synthetic, user_turns

from offline.ab.analysis import analyze
from offline.ab.schema import OUTCOME_SCHEMA, validate_outcomes
from offline.ab.store import PART_FILE, OutcomeStore

SHARES = {"control": 0.5, "treatment": 0.5}


def day_slice(table: pa.Table, day: int) -> pa.Table:
    return table.filter(pc.equal(table.column("day"), day))


def sorted_rows(table: pa.Table) -> list[dict[str, object]]:
    return sorted(table.to_pylist(), key=lambda r: str(r["turn_id"]))


@pytest.fixture(scope="module")
def experiment() -> pa.Table:
    """Three days, two arms, three domains."""
    return synthetic(11, {"control": 0.3, "treatment": 0.22}, users=80, days=3)


@pytest.fixture
def store(tmp_path: Path, experiment: pa.Table) -> OutcomeStore:
    s = OutcomeStore(tmp_path / "store")
    for day in (1, 2, 3):
        s.write_day("exp", day, day_slice(experiment, day))
    return s


def test_round_trip_and_layout(store: OutcomeStore, experiment: pa.Table) -> None:
    assert (store.root / "experiment=exp" / "day=02" / PART_FILE).is_file()
    got = store.read("exp")
    assert got.schema.equals(OUTCOME_SCHEMA)
    assert got.num_rows == experiment.num_rows
    assert sorted_rows(got) == sorted_rows(experiment)
    days = got.column("day").to_pylist()
    assert days == sorted(days)  # ordered by day
    assert store.experiments() == ["exp"]
    assert store.days("exp") == [1, 2, 3]
    assert store.domains("exp") == ["iot", "music", "weather"]


def test_read_filters_days_and_domains(store: OutcomeStore, experiment: pa.Table) -> None:
    got = store.read("exp", day_range=(2, 3), domains=["iot", "music"])
    expected = [
        r for r in experiment.to_pylist() if 2 <= r["day"] <= 3 and r["domain"] in ("iot", "music")
    ]
    assert 0 < got.num_rows < experiment.num_rows
    assert sorted_rows(got) == sorted(expected, key=lambda r: str(r["turn_id"]))
    assert store.read("exp", day_range=(3, 3)).num_rows == day_slice(experiment, 3).num_rows
    assert store.read("exp", domains=[]).num_rows == experiment.num_rows  # empty = all
    assert store.read("exp", day_range=(7, 9)).num_rows == 0
    with pytest.raises(ValueError):
        store.read("exp", day_range=(3, 1))


def test_filter_values_are_parameters_not_sql(store: OutcomeStore) -> None:
    got = store.read("exp", domains=["x' OR '1'='1", "weather') OR (1=1"])
    assert got.num_rows == 0 and got.schema.equals(OUTCOME_SCHEMA)


def test_analyze_filter_equals_store_filter(store: OutcomeStore) -> None:
    day_range, domains = (2, 3), ["weather", "iot"]
    in_analyze = analyze(
        store.read("exp"), experiment="exp", shares=SHARES, day_range=day_range, domains=domains
    )
    in_store = analyze(
        store.read("exp", day_range, domains),
        experiment="exp",
        shares=SHARES,
        day_range=day_range,
        domains=domains,
    )
    assert in_analyze == in_store
    unlabeled = analyze(store.read("exp", day_range, domains), experiment="exp", shares=SHARES)
    assert unlabeled.arms == in_analyze.arms
    assert unlabeled.comparisons == in_analyze.comparisons
    assert unlabeled.per_day == in_analyze.per_day
    assert unlabeled.top_rewrites == in_analyze.top_rewrites
    assert unlabeled.srm == in_analyze.srm


def test_rewriting_a_day_replaces_it(store: OutcomeStore, experiment: pa.Table) -> None:
    replacement = make_table(user_turns("control", "only", 3, 1, day=2))
    store.write_day("exp", 2, replacement)
    day2 = store.read("exp", day_range=(2, 2))
    assert sorted_rows(day2) == sorted_rows(validate_outcomes(replacement))
    assert store.read("exp").num_rows == (
        day_slice(experiment, 1).num_rows + 3 + day_slice(experiment, 3).num_rows
    )
    day_dir = store.root / "experiment=exp" / "day=02"
    assert [p.name for p in day_dir.iterdir()] == [PART_FILE]  # no temp files left


def test_empty_day_is_stored(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path)
    store.write_day("e", 1, make_table([], "e"))
    assert store.days("e") == [1]
    assert store.read("e").num_rows == 0


def test_missing_experiment_gives_empty_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = OutcomeStore(tmp_path / "nothing-here")
    with caplog.at_level(logging.WARNING, logger="offline.ab.store"):
        got = store.read("exp")
    assert got.num_rows == 0 and got.schema.equals(OUTCOME_SCHEMA)
    assert "no outcomes" in caplog.text
    assert store.experiments() == [] and store.days("exp") == [] and store.domains("exp") == []


def test_write_validates(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path)
    good = make_table(user_turns("control", "a", 3, 1))
    with pytest.raises(ValueError, match="defect_reasons"):
        store.write_day("exp", 1, good.drop_columns(["defect_reasons"]))
    with pytest.raises(ValueError, match="another day"):
        store.write_day("exp", 2, good)
    with pytest.raises(ValueError, match="another experiment"):
        store.write_day("other", 1, good)
    dup = pa.concat_tables([good, good])
    with pytest.raises(ValueError, match="duplicate turn_id"):
        store.write_day("exp", 1, dup)
    for bad_name in ("../x", "a=b", "*", ""):
        with pytest.raises(ValueError, match="invalid experiment name"):
            store.write_day(bad_name, 1, good)
    with pytest.raises(ValueError):
        store.write_day("exp", 0, good)
    assert store.experiments() == []  # nothing written by failed writes


def test_write_casts_compatible_types(tmp_path: Path) -> None:
    good = make_table(user_turns("control", "a", 3, 1))
    # int64 day, ns timestamps and an extra column are accepted and normalised
    loose = good.set_column(1, "day", pc.cast(good.column("day"), pa.int64()))
    loose = loose.set_column(6, "timestamp", pc.cast(good.column("timestamp"), pa.timestamp("ns")))
    loose = loose.append_column("extra", pa.array([1, 2, 3]))
    store = OutcomeStore(tmp_path)
    store.write_day("exp", 1, loose)
    assert sorted_rows(store.read("exp")) == sorted_rows(good)


def test_multiple_experiments_are_separate(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path)
    store.write_day("a", 1, make_table(user_turns("control", "x", 2, 1), "a"))
    store.write_day("b", 4, make_table(user_turns("control", "y", 5, 0, day=4), "b"))
    assert store.experiments() == ["a", "b"]
    assert store.days("b") == [4]
    assert store.read("a").column("user").to_pylist() == ["x", "x"]
    assert set(store.read("b").column("experiment").to_pylist()) == {"b"}
