"""The nightly job's two engines (``engine: local | spark``, :mod:`offline.engine`).

The Spark tests run PySpark in ``local[2]`` mode (the session fixture ``spark`` in conftest)
on simulator logs and assert that both engines write byte-identical ``pairs.parquet``,
``defects.parquet``, ``rephrases.parquet``, ``catalog.parquet`` and ``personal.parquet`` and
report the same counts and Markov stats — with the heuristic detector, and with the BERT span
detector scored through ``mapInArrow``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from offline.engine.stages import sessionize_table, turns_to_table
from offline.job import read_pairs, run_nightly
from offline.markov import RephraseChain, mine_pairs
from offline.schema import read_turn_logs
from offline.sessionize import sessionize, to_turns
from rewrite.config import Settings, load_settings

CORPUS = Path(__file__).parents[2] / "shared/data/slurp/utterances.jsonl"
OUTPUTS = ("pairs", "defects", "rephrases", "catalog", "personal")
needs_corpus = pytest.mark.skipif(not CORPUS.is_file(), reason=f"no SLURP corpus at {CORPUS}")


def _simulate(root: Path, users: int, days: int) -> Path:
    from offline.schema import write_turn_logs
    from offline.simulate import Simulator

    sim = Simulator(CORPUS, users=users, seed=7)
    for day in range(1, days + 1):
        write_turn_logs(sim.simulate_day(day).turns, root / f"day-{day:02d}.jsonl")
    return root


@pytest.fixture(scope="module")
def sim_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated days of 300 users (about 6,000 turns)."""
    return _simulate(tmp_path_factory.mktemp("engines"), users=300, days=2)


@pytest.fixture(scope="module")
def small_sim_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated day of 80 users (about 800 turns: the span model scores them on CPU)."""
    return _simulate(tmp_path_factory.mktemp("engines-small"), users=80, days=1)


def _job_settings(settings: Settings) -> Settings:
    s = settings.model_copy(deep=True)
    s.rephrase.detector = "heuristic_baseline"
    s.privacy.min_users_global = 2
    s.dpr.build_index = False
    s.spark.shuffle_partitions = 2
    return s


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_both(logs: Path, tmp_path: Path, s: Settings) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for engine in ("local", "spark"):
        t0 = time.perf_counter()
        report = run_nightly([logs], tmp_path / engine, s, engine=engine)
        runs[engine] = (report, round(time.perf_counter() - t0, 2))
    local, spark = runs["local"][0], runs["spark"][0]
    for name in OUTPUTS:
        assert _digest(tmp_path / "local" / f"{name}.parquet") == _digest(
            tmp_path / "spark" / f"{name}.parquet"
        ), name
    assert local.markov == spark.markov
    assert local.pairs_content_hash == spark.pairs_content_hash
    keys = ("sessions", "rephrase_links", "rephrase_candidates_scored", "chains", "pairs")
    keys += ("rephrase_candidates_gated",)
    assert {k: local.counts[k] for k in keys} == {k: spark.counts[k] for k in keys}
    assert local.counts["defects"] == spark.counts["defects"]
    assert json.loads((tmp_path / "spark" / "report.json").read_text())["settings"]["engine"] == (
        "spark"
    )
    print("engine wall times (s):", {e: r[1] for e, r in runs.items()})
    return {e: r[0] for e, r in runs.items()}


@needs_corpus
def test_sessionize_table_matches_sessionize(sim_logs: Path) -> None:
    """The vectorised sessionization gives the per-row rule's sessions exactly."""
    turns = to_turns(read_turn_logs([sim_logs]).turns)
    for gap in (0.0, 30.0, 300.0):
        expected = {(t, s.session_id, p) for s in sessionize(turns, gap) for p, t in
                    enumerate(s.turns)}  # fmt: skip
        table = sessionize_table(turns_to_table(turns), gap).to_pydict()
        got = {
            (i, f"{u}#{n}", p)
            for i, u, n, p in zip(
                table["idx"], table["user_id"], table["session_no"], table["pos"], strict=True
            )
        }
        assert got == expected and len(got) == len(turns)


def _chain(*utts: str, ok: bool = True, user: str = "u1") -> RephraseChain:
    return RephraseChain(tuple(utts), ok, user)


def _component_chains() -> list[RephraseChain]:
    """A 6-state path component (a..f), a 2-state component (x, y), singletons."""
    path = [_chain(a, b, user=f"u{k}") for k in range(3) for a, b in
            [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e"), ("e", "f")]]  # fmt: skip
    return [*path, *(_chain("x", "y", user=f"u{k}") for k in range(3)), _chain("solo", ok=False)]


def test_giant_component_is_skipped_and_counted() -> None:
    s = load_settings().markov.model_copy(update={"max_component_states": 5})
    pairs, stats = mine_pairs(_component_chains(), s, 2)
    assert stats.components == 2 and stats.largest_component == 6
    assert stats.components_skipped_giant == 1 and stats.components_solved == 1
    assert stats.states_skipped_giant == 6
    assert [(p.source, p.rewrite) for p in pairs] == [("x", "y")]
    pairs, stats = mine_pairs(_component_chains(), s.model_copy(update={"max_component_states": 6}))
    assert stats.components_skipped_giant == 0 and len(pairs) > 1


def test_engine_is_a_setting_with_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().engine == "local"
    monkeypatch.setenv("QRW_ENGINE", "spark")
    monkeypatch.setenv("QRW_SPARK__SHUFFLE_PARTITIONS", "8")
    s = load_settings()
    assert s.engine == "spark" and s.spark.shuffle_partitions == 8
    assert s.spark.master == "local[2]"


def test_component_labels_name_each_component_by_its_smallest_vertex() -> None:
    """scipy's components, each labelled by its smallest name in binary (UTF-8 byte) order,
    the order Spark's ``min`` uses on strings; duplicate and reversed edges change nothing."""
    import pyarrow as pa

    from offline.engine.stages import component_labels

    edges = pa.table(
        {
            "a": ["play jazz", "zürich", "b", "x", "y", "b", "wilkerson"],
            "b": ["play jas", "zurich", "a", "y", "x", "c", "wilmington"],
        }
    )
    got = component_labels(edges).to_pylist()
    assert [r["v"] for r in got] == sorted(r["v"] for r in got)  # sorted, one row per vertex
    labels = {r["v"]: r["c"] for r in got}
    assert labels == {
        "a": "a", "b": "a", "c": "a", "x": "x", "y": "x",
        "play jas": "play jas", "play jazz": "play jas",
        "zurich": "zurich", "zürich": "zurich",  # "u" (0x75) < "ü" (0xc3 0xbc)
        "wilkerson": "wilkerson", "wilmington": "wilkerson",
    }  # fmt: skip


def test_solve_components_table_equals_one_solve_per_component() -> None:
    """Several components in one (shuffled) table: the same rows as one
    ``solve_component_table`` call per component, in component order."""
    import random

    import pyarrow as pa

    from offline.engine.stages import (
        CHAINS_SCHEMA,
        COMPONENT_PAIRS_SCHEMA,
        solve_component_table,
        solve_components_table,
    )

    chains = _component_chains()
    comp = {"a": "a", "b": "a", "c": "a", "d": "a", "e": "a", "x": "x", "solo": "solo"}
    rows = [
        {"user_id": ch.user_id, "session_no": 0, "pos": i, "chain": list(ch.utterances),
         "chain_success": ch.success, "c": comp[ch.utterances[0]]}
        for i, ch in enumerate(chains)
    ]  # fmt: skip
    random.Random(3).shuffle(rows)
    schema = CHAINS_SCHEMA.append(pa.field("c", pa.string()))
    table = pa.Table.from_pylist(rows, schema=schema)
    markov = load_settings().markov
    got = solve_components_table(table, markov, 2)
    want = [
        solve_component_table(table.filter(pa.compute.equal(table["c"], c)), markov, 2)
        for c in ("a", "solo", "x")
    ]
    assert got.to_pylist() == pa.concat_tables(want).to_pylist()
    assert sum(r["source"] is None for r in got.to_pylist()) == 3  # one summary per component
    assert solve_components_table(table.slice(0, 0), markov, 2).schema == COMPONENT_PAIRS_SCHEMA


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("driver_cc_max_edges", [0, 1_000], ids=["propagation", "driver"])
def test_spark_connected_components_and_cap_match_local(
    spark: Any, driver_cc_max_edges: int
) -> None:
    """Label propagation (``driver_cc_max_edges`` 0) and the driver's scipy components find
    the local engine's components; the cap skips the same component."""
    from offline.engine.spark import connected_components, mine_pairs_spark
    from offline.engine.stages import component_labels

    chains = _component_chains()
    rows = [
        {"user_id": c.user_id, "session_no": 0, "pos": i, "chain": list(c.utterances),
         "chain_success": c.success}
        for i, c in enumerate(chains)
    ]  # fmt: skip
    df = spark.createDataFrame(rows, "user_id string, session_no long, pos long, "
                                     "chain array<string>, chain_success boolean")  # fmt: skip
    s = _job_settings(load_settings())
    s.markov.max_component_states = 5  # the 6-state path is skipped, (x, y) solved
    s.spark.driver_cc_max_edges = driver_cc_max_edges
    want_pairs, want = mine_pairs(chains, s.markov, s.privacy.min_users_global)
    got_pairs, got, info = mine_pairs_spark(df, s)
    assert got == want and got_pairs == want_pairs
    assert got.components_skipped_giant == 1 and got.components_solved == 1
    if driver_cc_max_edges:
        assert info["cc_method"] == "driver" and info["cc_rounds"] == 0
    else:
        assert info["cc_method"] == "label_propagation"
        assert info["cc_rounds"] <= 5  # path of 6 states: pointer jumping beats diameter + 1
        # both methods give the same labels
        edges = spark.createDataFrame(
            [(a, b) for c in chains for a, b in itertools.pairwise(c.utterances) if a != b],
            "a string, b string",
        )
        spread, _ = connected_components(edges, 64)
        pairs_of = lambda rows: sorted((r["v"], r["c"]) for r in rows)  # noqa: E731
        assert pairs_of(spread.toArrow().to_pylist()) == pairs_of(
            component_labels(edges.toArrow()).to_pylist()
        )


@pytest.mark.slow
@pytest.mark.integration
@needs_corpus
def test_engines_write_identical_outputs_heuristic(
    spark: Any, sim_logs: Path, tmp_path: Path, settings: Settings
) -> None:
    s = _job_settings(settings)
    s.spark.driver_cc_max_edges = 0  # distributed label propagation end to end here
    reports = _run_both(sim_logs, tmp_path, s)
    pairs = read_pairs(tmp_path / "spark" / "pairs.parquet")
    assert len(pairs) >= 3 and reports["spark"].markov["components"] > 10
    assert reports["local"].counts["rephrase_links"] > 100


def _detector_artifact(tmp_path_factory: pytest.TempPathFactory, s: Settings) -> Path:
    """The trained detector under ``rephrase.artifacts_dir`` when there is one, else a tiny
    one trained here on synthetic examples (as tests/test_span_detector.py does)."""
    from offline.rephrase import DetectorModelMissingError, resolve_detector_artifact

    try:
        return resolve_detector_artifact(s.rephrase)
    except DetectorModelMissingError:
        from test_span_detector import tiny_span_artifact

        return tiny_span_artifact(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.integration
@needs_corpus
def test_engines_write_identical_outputs_span_detector(
    spark: Any,
    small_sim_logs: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    settings: Settings,
) -> None:
    """BERT span detector: examples per user (applyInArrow), scored by mapInArrow with the
    ONNX model loaded once per executor (batches: token-length rank → groupBy(batch)), links
    chosen per user (cogroup) — same outputs.

    ``batch_size`` 16 makes several model batches, so the batch-forming step is exercised
    (the int8 model's scores depend on batch composition). The artifact carries a gate that
    rules out about half the examples: both engines batch only the kept ones."""
    from test_gate import gated_artifact

    from offline.detector.examples import build_examples

    s = _job_settings(settings)
    s.rephrase.detector = "bert_span"
    turns = to_turns(read_turn_logs([small_sim_logs]).turns)
    examples = build_examples(
        turns, sessionize(turns, s.session.gap_s), s.rephrase.lookback_turns, s.rephrase.max_gap_s
    )
    s.rephrase.detector_artifact = gated_artifact(
        _detector_artifact(tmp_path_factory, s), tmp_path / "gated-artifact", examples
    )
    s.rephrase.batch_size = 16
    s.rephrase.min_detector_score = 0.0  # links from the tiny model too (as in its job test)
    reports = _run_both(small_sim_logs, tmp_path, s)
    counts = reports["spark"].counts
    assert counts["rephrase_detector"] == "bert_span"
    assert counts["rephrase_candidates_scored"] > 50 and counts["rephrase_candidates_gated"] > 50
    # the raw model outputs too (a tiny CI model may link nothing above its threshold)
    from offline.engine.spark import sessionize_spark, span_predictions
    from offline.engine.stages import examples_table, gate_examples, score_examples

    table = sessionize_table(turns_to_table(turns), s.session.gap_s)
    artifact = str(s.rephrase.detector_artifact)
    gated = gate_examples(examples_table(table, s.rephrase), s.rephrase, artifact)
    local = score_examples(gated, s.rephrase, artifact).to_pylist()
    assert any(r["gated"] for r in local) and not all(r["gated"] for r in local)
    frame = sessionize_spark(spark.createDataFrame(turns_to_table(turns)), s.session.gap_s)
    remote = span_predictions(frame, s.rephrase, artifact).toArrow().to_pylist()
    assert len(local) > 50
    by_turn = lambda rows: sorted(rows, key=lambda r: r["current_idx"])  # noqa: E731
    assert by_turn(remote) == by_turn(local)
