"""The Spark engine: the stage functions of :mod:`offline.engine.stages` orchestrated by PySpark.

Plan (``settings.spark``; README "Engines: local and Spark"):

1. the driver's validated turns become a DataFrame (Arrow);
2. sessionization with window functions (``lag`` of the timestamp per user, a running sum of
   session starts, ``row_number`` within the session) — the same rule as
   :func:`~offline.engine.stages.sessionize_table`;
3. span detector: ``repartition(user)`` and ``mapInArrow`` over whole partitions
   (:func:`whole_partition`; every user's turns in one partition): ``examples_table`` →
   ``gate_examples`` → ``size_examples`` (token lengths) → the examples the detector's gate
   keeps: global sort by :data:`~offline.engine.stages.BATCH_ORDER` and ``zipWithIndex``
   into the model's batches → ``groupBy(batch).applyInArrow(score_examples)`` (the ONNX model
   loaded once per executor Python worker, :func:`~offline.engine.stages.span_model`;
   identical batches keep the int8 model's per-batch activation scales, hence the scores,
   identical to the local engine's) → the predictions joined to their current turns →
   ``repartition(user)`` → ``mapInArrow(label_users)`` per partition; heuristic baseline:
   the same last step without predictions;
4. Markov: states and rephrase edges by explode / distinct; connected components on the
   driver for a graph of at most ``spark.driver_cc_max_edges`` edges
   (:func:`~offline.engine.stages.component_labels`), else by iterative min-label propagation
   over DataFrame joins and group-bys (:func:`connected_components`), same labels either way;
   component sizes by group-by (on the driver, for the driver's components); components
   over ``markov.max_component_states`` skipped and counted; every other component solved
   by ``repartition(component)`` → ``mapInArrow(solve_components_table)``. Only the pairs and one
   summary row per component reach the driver; the per-turn labels are collected for the
   driver's later stages.

Requires ``pyspark`` (``pip install -e '.[spark]'``) and Java 17.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from offline.engine import CoreResult, collect_result, prepare_detector, timed
from offline.engine.stages import (
    BATCH_ORDER,
    COMPONENT_PAIRS_SCHEMA,
    LABELLED_SCHEMA,
    PREDICTIONS_SCHEMA,
    SESSIONIZED_SCHEMA,
    SIZED_EXAMPLES_SCHEMA,
    component_labels,
    examples_table,
    gate_examples,
    label_users,
    score_examples,
    size_examples,
    solve_components_table,
    turns_to_table,
)
from offline.markov import MarkovStats, RewritePair
from offline.sessionize import Turn
from rewrite.config import RephraseSettings, Settings, SparkSettings

log = logging.getLogger(__name__)


def spark_session(cfg: SparkSettings) -> Any:
    """The active SparkSession, or a new one from ``cfg``.

    Under ``spark-submit`` (``PYSPARK_GATEWAY_PORT`` set) the master and driver memory come
    from the submit command and ``cfg.master`` / ``cfg.driver_memory`` are not applied.
    ``PYSPARK_PYTHON`` defaults to this interpreter, so local executors use the same venv.

    Raises:
        ImportError: pyspark is not installed.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder: Any = SparkSession.builder.appName(cfg.app_name)
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        builder = builder.master(cfg.master).config("spark.driver.memory", cfg.driver_memory)
    builder = builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
    builder = builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def whole_partition(batches: Iterator[pa.RecordBatch]) -> pa.Table | None:
    """One ``mapInArrow`` partition as a single table (None when empty).

    After ``repartition("user_id")`` every user's rows lie in one partition, so the stage
    functions, which take whole users, run once per partition rather than once per user:
    ``groupBy(user).applyInArrow`` called Python ~12k times at 100k turns (one call per user
    of ~8 turns), most of the Spark engine's fixed cost.
    """
    parts = [b for b in batches if b.num_rows]
    return pa.Table.from_batches(parts) if parts else None


def sessionize_spark(df: Any, gap_s: float) -> Any:
    """Add ``session_no`` and ``pos`` (both long, 0-based) with window functions.

    Same rule as :func:`offline.engine.stages.sessionize_table`: per user in
    ``(ts, turn_id)`` order, a gap strictly greater than ``gap_s`` seconds starts a session.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("user_id").orderBy("ts", "turn_id")
    prev = F.lag("ts").over(w)
    start = F.when(prev.isNull() | ((F.col("ts") - prev) > F.lit(float(gap_s))), 1).otherwise(0)
    running = w.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    df = df.withColumn("_start", start)
    df = df.withColumn("session_no", (F.sum("_start").over(running) - 1).cast("long"))
    wp = Window.partitionBy("user_id", "session_no").orderBy("ts", "turn_id")
    return df.withColumn("pos", (F.row_number().over(wp) - 1).cast("long")).drop("_start")


def connected_components(edges: Any, max_iterations: int) -> tuple[Any, int]:
    """Connected components of an undirected graph by min-label propagation with pointer
    jumping.

    Every vertex starts with its own name as label. Each round, a vertex takes the minimum of
    its label and its neighbours' labels (a join of the edges with the labels, a group-by
    ``min``), then the minimum of that and the previous label of the vertex its label names
    (pointer jumping: a label is always a vertex of the same component, so this is safe and
    shortens long paths). Labels only decrease; a round without a change is the fixed point,
    where every component carries its smallest vertex name. Each round's labels are
    checkpointed (``localCheckpoint``) to cut the lineage; the change count reads the
    checkpoint (the previous label rides along), so a round is one shuffle-heavy job.

    Args:
        edges: DataFrame with string columns ``a``, ``b`` (direction ignored).
        max_iterations: round limit.

    Returns:
        (DataFrame ``v`` (vertex), ``c`` (component label) for every vertex on an edge, rounds
        run including the final one without change).

    Raises:
        RuntimeError: not converged within ``max_iterations`` rounds.
    """
    from pyspark.sql import functions as F

    und = (
        edges.select(F.col("a").alias("src"), F.col("b").alias("dst"))
        .union(edges.select(F.col("b").alias("src"), F.col("a").alias("dst")))
        .distinct()
        .cache()
    )
    labels = und.select(F.col("src").alias("v")).distinct().withColumn("c", F.col("v"))
    labels = labels.localCheckpoint()
    for rounds in range(1, max_iterations + 1):
        own = labels.select("v", "c", F.col("c").alias("old"))
        msgs = und.join(labels, und.src == labels.v).select(
            F.col("dst").alias("v"), "c", F.lit(None).cast("string").alias("old")
        )
        prop = (
            own.unionByName(msgs).groupBy("v").agg(F.min("c").alias("c"), F.max("old").alias("old"))
        )
        jump = labels.select(F.col("v").alias("c"), F.col("c").alias("cc"))
        new = (
            prop.join(jump, "c").select("v", F.least("c", "cc").alias("c"), "old").localCheckpoint()
        )
        changed = new.where(F.col("c") != F.col("old")).count()
        labels = new.select("v", "c")
        if changed == 0:
            und.unpersist()
            return labels, rounds
    raise RuntimeError(
        f"connected components did not converge in {max_iterations} rounds "
        "(raise spark.max_cc_iterations)"
    )


def mine_pairs_spark(
    chains: Any, settings: Settings
) -> tuple[list[RewritePair], MarkovStats, dict[str, Any]]:
    """:func:`offline.markov.mine_pairs` distributed: same pairs, same stats.

    Args:
        chains: DataFrame with :data:`~offline.engine.stages.CHAINS_SCHEMA` columns.
        settings: ``markov`` thresholds and cap, ``privacy.min_users_global``, ``spark``.

    Returns:
        (pairs sorted by source, stats, ``{"cc_rounds", "cc_method", "cc_s"}`` (seconds of the
        connected components step)): components
        found on the driver (``"driver"``, 0 rounds) when the graph has at most
        ``spark.driver_cc_max_edges`` edges (:func:`~offline.engine.stages.component_labels`),
        else by :func:`connected_components` (``"label_propagation"``).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    markov = settings.markov
    min_users = max(markov.min_users, settings.privacy.min_users_global)
    chains = chains.cache()
    stats = MarkovStats(chains=chains.count(), min_users_effective=min_users)
    stats.states = chains.select(F.explode("chain").alias("v")).distinct().count()
    pairs_expr = (
        "zip_with(slice(chain, 1, size(chain) - 1), slice(chain, 2, size(chain) - 1), "
        "(x, y) -> named_struct('a', x, 'b', y))"
    )
    edges = (
        chains.where(F.size("chain") > 1)
        .select(F.explode(F.expr(pairs_expr)).alias("e"))
        .select("e.a", "e.b")
        .where(F.col("a") != F.col("b"))
        .distinct()
        .cache()
    )
    stats.rephrase_edges = edges.count()
    if stats.rephrase_edges == 0:
        return [], stats, {"cc_rounds": 0, "cc_method": "none", "cc_s": 0.0}
    t0 = time.perf_counter()
    cap = markov.max_component_states
    sizes = None
    if stats.rephrase_edges <= settings.spark.driver_cc_max_edges:
        # a small graph: one collect beats ~2 Spark jobs per propagation round, and the
        # component sizes and the cap are then known on the driver too
        table = component_labels(edges.toArrow())
        size_of = table.group_by("c").aggregate([("v", "count")])
        size_list = size_of["v_count"].to_pylist()
        stats.components, stats.largest_component = len(size_list), max(size_list)
        giant = [int(n) for n in size_list if n > cap]
        solvable = size_of.filter(pc.less_equal(size_of["v_count"], cap))["c"]
        table = table.filter(pc.is_in(table["c"], value_set=solvable.combine_chunks()))
        labels = chains.sparkSession.createDataFrame(table)
        rounds, method = 0, "driver"
        cc_s = round(time.perf_counter() - t0, 4)
    else:
        labels, rounds = connected_components(edges, settings.spark.max_cc_iterations)
        method = "label_propagation"
        cc_s = round(time.perf_counter() - t0, 4)
        sizes = labels.groupBy("c").agg(F.count("*").alias("size")).cache()
        summary = sizes.agg(F.count("*").alias("n"), F.max("size").alias("largest")).first()
        stats.components = int(summary["n"])
        stats.largest_component = int(summary["largest"])
        giant = [int(r["size"]) for r in sizes.where(F.col("size") > cap).collect()]
        labels = labels.join(sizes.where(F.col("size") <= cap), "c").select("v", "c")
    for size in giant:
        log.warning("skipping giant component with %d states", size)
    stats.components_skipped_giant = len(giant)
    stats.states_skipped_giant = sum(giant)
    # chains keyed by the component of their first state; giant components' chains drop out
    keyed = chains.join(
        labels.withColumnRenamed("v", "first"), F.element_at("chain", 1) == F.col("first")
    )

    def solve(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table = whole_partition(batches)
        if table is not None:
            yield from solve_components_table(table, markov, min_users).to_batches()

    out = keyed.repartition("c").mapInArrow(solve, from_arrow_schema(COMPONENT_PAIRS_SCHEMA))
    rows = out.toArrow().to_pylist()
    pairs = [
        RewritePair(
            r["source"], r["rewrite"], r["absorption_probability"], r["support"], r["n_users"]
        )
        for r in rows
        if r["source"] is not None
    ]
    pairs.sort(key=lambda p: p.source)
    summaries = [r for r in rows if r["source"] is None]
    stats.components_solved = len(summaries)
    stats.candidates = sum(r["candidates"] for r in summaries)
    rejected = {
        reason: sum(r[f"rejected_{reason}"] for r in summaries)
        for reason in ("probability", "support", "users")
    }
    stats.rejected = {k: v for k, v in rejected.items() if v}
    stats.pairs = len(pairs)
    chains.unpersist()
    edges.unpersist()
    if sizes is not None:
        sizes.unpersist()
    return pairs, stats, {"cc_rounds": rounds, "cc_method": method, "cc_s": cc_s}


def span_predictions(turns: Any, rephrase: RephraseSettings, artifact: str) -> Any:
    """Span-model predictions for every example of sessionized turns, on Spark.

    ``repartition(user)`` → ``mapInArrow`` over whole partitions (:func:`whole_partition`):
    ``examples_table`` → ``gate_examples`` → ``size_examples`` → the examples the gate keeps:
    global sort by :data:`~offline.engine.stages.BATCH_ORDER` and ``zipWithIndex`` into
    chunks of ``rephrase.batch_size`` →
    ``groupBy(batch).applyInArrow(score_examples)``: exactly the batches
    :meth:`SpanDetector.predict` forms over the local run's kept examples, so the int8 model's
    per-batch activation scales, hence the scores, equal the local engine's; the examples the
    gate rules out become ``gated`` rows without a model run.

    Args:
        turns: DataFrame of :data:`~offline.engine.stages.SESSIONIZED_SCHEMA` rows.
        rephrase: context size, gap, batch size, backend.
        artifact: detector artifact directory, readable at this path on every executor.

    Returns:
        DataFrame of :data:`~offline.engine.stages.PREDICTIONS_SCHEMA` rows.
    """
    from pyspark.sql.pandas.types import from_arrow_schema

    def examples(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table = whole_partition(batches)
        if table is not None:
            gated = gate_examples(examples_table(table, rephrase), rephrase, artifact)
            yield from size_examples(gated, rephrase, artifact).to_batches()

    def score(table: pa.Table) -> pa.Table:
        order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in BATCH_ORDER])
        return score_examples(table.take(order), rephrase, artifact)

    every = (
        turns.repartition("user_id")
        .mapInArrow(examples, from_arrow_schema(SIZED_EXAMPLES_SCHEMA))
        .cache()
    )
    sized = every.filter("keep")
    gated = every.filter("NOT keep").selectExpr(
        "user_id",
        "current_idx",
        "CAST(-1 AS BIGINT) AS earlier_idx",
        "CAST(0.0 AS DOUBLE) AS score",
        "CAST(size(context_idx) AS BIGINT) AS n_context",
        "true AS gated",
    )
    batch_size = rephrase.batch_size
    ranks = (
        sized.select("current_idx", *BATCH_ORDER)
        .orderBy(*BATCH_ORDER)
        .rdd.zipWithIndex()
        .map(lambda row: (row[0]["current_idx"], row[1] // batch_size))
        .toDF("current_idx long, batch long")
    )
    scored = (
        sized.join(ranks, "current_idx")
        .groupBy("batch")
        .applyInArrow(score, from_arrow_schema(PREDICTIONS_SCHEMA))
    )
    return scored.unionByName(gated)


def run_spark(turns: Sequence[Turn], settings: Settings, spark: Any = None) -> CoreResult:
    """Sessionize, detect rephrases, label defects, build chains and mine pairs on Spark.

    Args:
        turns: validated turns (``turns[i].idx == i``), from the driver.
        settings: as for the local engine plus ``spark``.
        spark: a SparkSession to use (default :func:`spark_session`).

    Raises:
        ImportError: pyspark is not installed.
        DetectorModelMissingError: span detector without an artifact.
        RuntimeError: connected components did not converge.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    timings: dict[str, float] = {}
    with timed(timings, "spark_session"):
        spark = spark or spark_session(settings.spark)
        spark.conf.set("spark.sql.shuffle.partitions", str(settings.spark.shuffle_partitions))
    with timed(timings, "rephrase_warm_up"):
        detector = prepare_detector(settings)
        artifact = detector[1]
    rephrase, defects = settings.rephrase, settings.defects
    with timed(timings, "sessionize"):
        df = spark.createDataFrame(turns_to_table(turns))
        df = sessionize_spark(df, settings.session.gap_s).cache()
        df.count()
    labelled_type = from_arrow_schema(LABELLED_SCHEMA)
    with timed(timings, "rephrase"):
        turn_columns = list(SESSIONIZED_SCHEMA.names)
        if artifact is None:
            joined, with_predictions = df, False
        else:  # each turn carries the prediction of the example it is the current turn of
            predictions = span_predictions(df, rephrase, str(artifact)).select(
                *(F.col(c).alias(f"p_{c}") for c in PREDICTIONS_SCHEMA.names if c != "user_id")
            )
            joined = df.join(predictions, df.idx == predictions.p_current_idx, "left")
            with_predictions = True

        def label(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            table = whole_partition(batches)
            if table is None:
                return
            preds = None
            if with_predictions:
                rows = table.filter(pc.is_valid(table["p_current_idx"]))
                preds = pa.table(
                    [rows["user_id"], *(rows[f"p_{c}"] for c in PREDICTIONS_SCHEMA.names[1:])],
                    schema=PREDICTIONS_SCHEMA,
                )
            turns_t = table.select(turn_columns)
            yield from label_users(turns_t, rephrase, defects, preds).to_batches()

        labelled = joined.repartition("user_id").mapInArrow(label, labelled_type).cache()
        per_turn = labelled.drop("chain", "chain_success").toArrow()
    with timed(timings, "markov"):
        chains = labelled.where(F.col("chain").isNotNull()).select(
            "user_id", "session_no", "pos", "chain", "chain_success"
        )
        pairs, stats, info = mine_pairs_spark(chains, settings)
    timings["markov_components"] = info["cc_s"]
    labelled.unpersist()
    df.unpersist()
    log.info(
        "spark engine: %d turns, %d chains, %d pairs, connected components by %s (%d rounds)",
        len(turns),
        stats.chains,
        len(pairs),
        info["cc_method"],
        info["cc_rounds"],
    )
    return collect_result(per_turn, detector, stats.chains, pairs, stats, timings)
