"""The nightly job's stage logic, written once over Arrow tables and called by both engines.

Each function takes and returns a :class:`pyarrow.Table` with a fixed schema, so the local
engine can call it on the whole run and the Spark engine on one group (``applyInArrow``) or
one batch (``mapInArrow``) without conversion:

- :func:`sessionize_table` — session number and position per turn (vectorised: sort, diff,
  cumulative sums; the Spark engine does the same with window functions);
- :func:`examples_table` — the span detector's examples of whole users' sessions;
- :func:`gate_examples` — the detector gate's keep/skip decision per example;
- :func:`score_examples` — span-model predictions for a batch of examples (the ONNX model is
  loaded once per process, :func:`span_model`);
- :func:`label_users` — rephrase links, defect labels and rephrase chains of whole users
  (one row per turn, :data:`LABELLED_SCHEMA`);
- :func:`component_labels` — connected components of a (small enough) rephrase graph, labelled
  the way the Spark engine's distributed label propagation labels them;
- :func:`solve_component_table` — the Markov solve of one connected component's chains
  (:func:`solve_components_table`: of each component in a table).

Turn ``idx`` values are the run's global turn indices in every table; a function working on a
subset renumbers locally and maps back, so results never depend on how users are grouped.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from offline.chains import chain_walks
from offline.defects import DefectRule, label_turns
from offline.detector.examples import NO_REPHRASE, DetectorExample, Prediction, build_examples
from offline.markov import RephraseChain, solve_component
from offline.rephrase import HeuristicBaselineDetector, select_links
from offline.sessionize import Session, Turn
from rewrite.config import DefectSettings, MarkovSettings, RephraseSettings

log = logging.getLogger(__name__)

#: One validated turn (:class:`offline.sessionize.Turn`); ``ts`` epoch seconds.
TURNS_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("turn_id", pa.string()),
        ("user_id", pa.string()),
        ("ts", pa.float64()),
        ("utterance", pa.string()),
        ("normalized", pa.string()),
        ("response", pa.string()),
        ("barge_in", pa.bool_()),
        ("feedback", pa.int64()),
        ("rewrite_source", pa.string()),
        ("domain", pa.string()),
        ("intent", pa.string()),
        ("rewrite", pa.string()),
        ("device_type", pa.string()),
    ]
)

#: :data:`TURNS_SCHEMA` plus the session (``session_no``: 0-based per user in time order;
#: ``pos``: 0-based position in the session).
SESSIONIZED_SCHEMA = TURNS_SCHEMA.append(pa.field("session_no", pa.int64())).append(
    pa.field("pos", pa.int64())
)

#: A span-detector example: ``example`` is :meth:`DetectorExample.to_json` as JSON;
#: ``context_idx`` the global indices of its context turns (newest first); ``session_no`` and
#: ``pos`` the current turn's session and position (the run's example order); ``keep`` False
#: when the detector's gate (:mod:`offline.detector.gate`) rules the example out.
EXAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("session_no", pa.int64()),
        ("pos", pa.int64()),
        ("current_idx", pa.int64()),
        ("context_idx", pa.list_(pa.int64())),
        ("example", pa.string()),
        ("keep", pa.bool_()),
    ]
)

#: :data:`EXAMPLES_SCHEMA` plus ``n_tokens``, the rendered example's length in tokens.
SIZED_EXAMPLES_SCHEMA = EXAMPLES_SCHEMA.append(pa.field("n_tokens", pa.int64()))

#: The order the span model batches examples in (:meth:`SpanDetector.predict` sorts by token
#: length, ties in the run's example order). Batch ``k`` is ranks ``[k·B, (k+1)·B)``.
BATCH_ORDER = ("n_tokens", "user_id", "session_no", "pos")

#: One span-model prediction: ``earlier_idx`` the predicted rephrased turn (-1: none),
#: ``score`` its span probability, ``n_context`` the example's candidate pairs (context turns);
#: ``gated``: the gate ruled the example out, the span model did not score it (-1, score 0).
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("current_idx", pa.int64()),
        ("earlier_idx", pa.int64()),
        ("score", pa.float64()),
        ("n_context", pa.int64()),
        ("gated", pa.bool_()),
    ]
)

#: :func:`label_users` output, one row per turn: ``rephrases`` the global idx of the turn this
#: one rephrases (-1: none) with ``rephrase_score``; ``candidates`` the candidate pairs the
#: detector scored for the group and ``gated`` those the gate ruled out before the span model
#: (both on the group's first row, 0 elsewhere); the turn's defect
#: label; ``chain`` the utterances of the chain starting at this turn (null: no chain starts
#: here) and ``chain_success`` its absorbing outcome.
LABELLED_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("user_id", pa.string()),
        ("session_no", pa.int64()),
        ("pos", pa.int64()),
        ("rephrases", pa.int64()),
        ("rephrase_score", pa.float64()),
        ("candidates", pa.int64()),
        ("gated", pa.int64()),
        ("defect", pa.bool_()),
        ("reasons", pa.string()),
        ("chain", pa.list_(pa.string())),
        ("chain_success", pa.bool_()),
    ]
)

#: Chains with their order key (user, session, start position), as the Markov stage reads them.
CHAINS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("session_no", pa.int64()),
        ("pos", pa.int64()),
        ("chain", pa.list_(pa.string())),
        ("chain_success", pa.bool_()),
    ]
)

#: :func:`solve_component_table` output: one row per pair, plus one summary row per component
#: (``source`` null) carrying ``candidates`` and the rejections by reason.
COMPONENT_PAIRS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("rewrite", pa.string()),
        ("absorption_probability", pa.float64()),
        ("support", pa.int64()),
        ("n_users", pa.int64()),
        ("candidates", pa.int64()),
        ("rejected_probability", pa.int64()),
        ("rejected_support", pa.int64()),
        ("rejected_users", pa.int64()),
    ]
)


def turns_to_table(turns: Sequence[Turn]) -> pa.Table:
    """The job's turns as a :data:`TURNS_SCHEMA` table (row ``i`` is ``turns[i]``)."""
    cols: dict[str, list[Any]] = {name: [] for name in TURNS_SCHEMA.names}
    for t in turns:
        for name in TURNS_SCHEMA.names:
            cols[name].append(getattr(t, name))
    return pa.Table.from_pydict(cols, schema=TURNS_SCHEMA)


def sessionize_table(turns: pa.Table, gap_s: float) -> pa.Table:
    """Sessions by inactivity gap, vectorised (same rule as :func:`offline.sessionize.sessionize`).

    Turns are ordered by ``(user_id, ts, turn_id)``; a new session starts at a user's first turn
    and after a gap strictly greater than ``gap_s`` seconds.

    Args:
        turns: :data:`TURNS_SCHEMA` rows (any order, any subset of whole users).
        gap_s: inactivity gap in seconds (>= 0).

    Returns:
        :data:`SESSIONIZED_SCHEMA` rows in ``(user_id, ts, turn_id)`` order.

    Raises:
        ValueError: ``gap_s`` is negative.
    """
    if gap_s < 0:
        raise ValueError("gap_s must be >= 0")
    order = pc.sort_indices(
        turns, sort_keys=[("user_id", "ascending"), ("ts", "ascending"), ("turn_id", "ascending")]
    )
    t = turns.take(order)
    n = t.num_rows
    if n == 0:
        empty = [pa.array([], pa.int64()), pa.array([], pa.int64())]
        return pa.Table.from_arrays([*t.columns, *empty], schema=SESSIONIZED_SCHEMA)
    users = pc.dictionary_encode(t["user_id"]).combine_chunks().indices.to_numpy()
    ts = t["ts"].to_numpy()
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_session = new_user.copy()
    new_session[1:] |= (ts[1:] - ts[:-1]) > gap_s
    rows = np.arange(n)
    count = np.cumsum(new_session)
    user_start = np.maximum.accumulate(np.where(new_user, rows, 0))
    session_start = np.maximum.accumulate(np.where(new_session, rows, 0))
    session_no = count - count[user_start]
    pos = rows - session_start
    return t.append_column("session_no", pa.array(session_no, pa.int64())).append_column(
        "pos", pa.array(pos, pa.int64())
    )


def _turns_and_sessions(table: pa.Table) -> tuple[list[Turn], list[Session], np.ndarray]:
    """Rebuild :class:`Turn` / :class:`Session` objects for a sessionized table.

    Returns:
        (turns with local ``idx`` 0..n-1 in global-idx order, sessions in (user, session_no)
        order, the global idx of each local turn).
    """
    table = table.take(pc.sort_indices(table, sort_keys=[("idx", "ascending")]))
    rows = table.to_pylist()
    turns = [
        Turn(**{name: r[name] for name in TURNS_SCHEMA.names if name != "idx"}, idx=i)
        for i, r in enumerate(rows)
    ]
    members: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for i, r in enumerate(rows):
        members.setdefault((r["user_id"], r["session_no"]), []).append((r["pos"], i))
    sessions = [
        Session(f"{user}#{no}", user, tuple(i for _, i in sorted(members[(user, no)])))
        for user, no in sorted(members)
    ]
    return turns, sessions, table["idx"].to_numpy()


def examples_table(table: pa.Table, rephrase: RephraseSettings) -> pa.Table:
    """The span detector's examples for whole users' sessionized turns.

    Args:
        table: :data:`SESSIONIZED_SCHEMA` rows covering whole users.
        rephrase: ``lookback_turns`` (context size) and ``max_gap_s``.

    Returns:
        :data:`EXAMPLES_SCHEMA` rows, one per turn with context
        (:func:`offline.detector.examples.build_examples`), ``keep`` True (see
        :func:`gate_examples`).
    """
    turns, sessions, gidx = _turns_and_sessions(table)
    examples = build_examples(turns, sessions, rephrase.lookback_turns, rephrase.max_gap_s)
    where = {i: (int(s.session_id.rsplit("#", 1)[1]), p) for s in sessions
             for p, i in enumerate(s.turns)}  # fmt: skip
    return pa.Table.from_pydict(
        {
            "user_id": [ex.user_id for ex in examples],
            "session_no": [where[ex.current_idx][0] for ex in examples],
            "pos": [where[ex.current_idx][1] for ex in examples],
            "current_idx": [int(gidx[ex.current_idx]) for ex in examples],
            "context_idx": [[int(gidx[i]) for i in ex.context_idx] for ex in examples],
            "example": [json.dumps(ex.to_json(), ensure_ascii=False) for ex in examples],
            "keep": pa.array(np.ones(len(examples), dtype=bool), pa.bool_()),
        },
        schema=EXAMPLES_SCHEMA,
    )


def gate_examples(examples: pa.Table, rephrase: RephraseSettings, artifact: str | Path) -> pa.Table:
    """Set ``keep`` to the detector gate's answer (:func:`span_gate`) for a batch of
    :data:`EXAMPLES_SCHEMA` rows; unchanged when the gate is off or the artifact has none.

    Any grouping of the rows gives the same answer (one example at a time), so the Spark
    engine calls it per ``mapInArrow`` batch and the local engine once.
    """
    gate = span_gate(artifact, rephrase)
    if gate is None or examples.num_rows == 0:
        return examples
    exs = [DetectorExample.from_json(json.loads(e)) for e in examples["example"].to_pylist()]
    keep = pa.array(gate.keep(exs), pa.bool_())
    return examples.set_column(examples.schema.get_field_index("keep"), "keep", keep)


_MODELS: dict[tuple[str, str, int], Any] = {}
_MODELS_LOCK = threading.Lock()


def span_model(artifact: str | Path, rephrase: RephraseSettings) -> Any:
    """The span detector for ``artifact``, loaded once per process (a Spark executor's Python
    worker keeps it across tasks while ``spark.python.worker.reuse`` is on, the default), with
    ``rephrase.detector_backend`` and ``rephrase.batch_workers``.

    Raises:
        FileNotFoundError: not a complete artifact.
    """
    from offline.detector.inference import SpanDetector

    key = (str(artifact), rephrase.detector_backend, rephrase.batch_workers)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = SpanDetector.load(
                Path(artifact),
                backend=rephrase.detector_backend,
                batch_workers=rephrase.batch_workers,
            )
        return _MODELS[key]


_GATES: dict[str, Any] = {}


def span_gate(artifact: str | Path, rephrase: RephraseSettings) -> Any:
    """The detector artifact's gate (:class:`offline.detector.gate.RephraseGate`), loaded once
    per process; ``None`` when ``rephrase.gate`` is off or the artifact has no gate.

    Raises:
        ValueError: the artifact's gate does not match this code's features.
    """
    if not rephrase.gate:
        return None
    from offline.detector.gate import RephraseGate

    key = str(artifact)
    with _MODELS_LOCK:
        if key not in _GATES:
            _GATES[key] = RephraseGate.load(Path(artifact))
            if _GATES[key] is None:
                log.info("detector artifact %s has no gate; every example goes to the model", key)
        return _GATES[key]


def size_examples(examples: pa.Table, rephrase: RephraseSettings, artifact: str | Path) -> pa.Table:
    """Add ``n_tokens`` (:data:`SIZED_EXAMPLES_SCHEMA`): each example rendered by the span
    model's renderer, the length the model batches by (0 for examples the gate ruled out: they
    are never batched).

    Why: the default ``onnx-int8`` model quantizes activations dynamically, with one scale per
    batch tensor, so a score depends on which examples share its batch. The Spark engine
    therefore forms exactly the batches :meth:`SpanDetector.predict` forms over the whole run
    (rank by :data:`BATCH_ORDER`, chunks of ``batch_size``) and scores each batch as one group.
    """
    keep = examples["keep"].to_pylist()
    exs = [
        DetectorExample.from_json(json.loads(e))
        for e, k in zip(examples["example"].to_pylist(), keep, strict=True)
        if k
    ]
    model = span_model(artifact, rephrase)
    lengths = iter([len(r.input_ids) for r in model.renderer.render_many(exs)] if exs else [])
    sized = [next(lengths) if k else 0 for k in keep]
    return examples.append_column("n_tokens", pa.array(sized, pa.int64()))


def score_examples(
    examples: pa.Table, rephrase: RephraseSettings, artifact: str | Path
) -> pa.Table:
    """Run the span model over a batch of examples.

    Args:
        examples: :data:`EXAMPLES_SCHEMA` rows in the run's example order (or one batch of
            :data:`BATCH_ORDER`); the model sorts the rows to ``keep`` by token length and
            runs batches of ``rephrase.batch_size``, and with the int8 model a score depends
            on its batch (see :func:`size_examples`); the other rows come back ``gated``.
        rephrase: ``batch_size`` and ``detector_backend``.
        artifact: the detector artifact directory (resolved on the driver).

    Returns:
        :data:`PREDICTIONS_SCHEMA` rows in input order.
    """
    rows = examples.to_pylist()
    exs = [DetectorExample.from_json(json.loads(r["example"])) for r in rows if r["keep"]]
    scored = iter(
        span_model(artifact, rephrase).predict(exs, batch_size=rephrase.batch_size) if exs else []
    )
    preds = [next(scored) if r["keep"] else Prediction(NO_REPHRASE, 0.0) for r in rows]
    return pa.Table.from_pydict(
        {
            "user_id": [r["user_id"] for r in rows],
            "current_idx": [r["current_idx"] for r in rows],
            "earlier_idx": [
                r["context_idx"][p.label] if p.label >= 0 else -1
                for r, p in zip(rows, preds, strict=True)
            ],
            "score": [float(p.score) for p in preds],
            "n_context": [len(r["context_idx"]) for r in rows],
            "gated": [not r["keep"] for r in rows],
        },
        schema=PREDICTIONS_SCHEMA,
    )


def label_users(
    table: pa.Table,
    rephrase: RephraseSettings,
    defects: DefectSettings,
    predictions: pa.Table | None = None,
) -> pa.Table:
    """Rephrase links, defect labels and rephrase chains of whole users' turns.

    With ``predictions`` (span detector) the links are :func:`offline.rephrase.select_links`
    of the predictions passing ``min_detector_score``; without, the heuristic baseline
    (:class:`offline.rephrase.HeuristicBaselineDetector`) runs here. Labels are
    :func:`offline.defects.label_turns`, chains :func:`offline.chains.chain_walks`.

    Args:
        table: :data:`SESSIONIZED_SCHEMA` rows covering whole users (any order).
        rephrase: detector thresholds.
        defects: the defect rule's settings.
        predictions: :data:`PREDICTIONS_SCHEMA` rows for exactly these users' examples, or
            ``None`` for the heuristic baseline.

    Returns:
        :data:`LABELLED_SCHEMA` rows in global ``idx`` order.
    """
    turns, sessions, gidx = _turns_and_sessions(table)
    local = {int(g): i for i, g in enumerate(gidx)}
    if predictions is None:
        detected = HeuristicBaselineDetector(rephrase, defects).detect(turns, sessions)
        links, candidates, gated = detected.links, detected.candidates_scored, 0
    else:
        p = predictions.to_pydict()
        candidates = sum(n for n, g in zip(p["n_context"], p["gated"], strict=True) if not g)
        gated = sum(n for n, g in zip(p["n_context"], p["gated"], strict=True) if g)
        links = select_links(
            (score, local[earlier], local[later])
            for later, earlier, score in zip(
                p["current_idx"], p["earlier_idx"], p["score"], strict=True
            )
            if earlier >= 0 and score >= rephrase.min_detector_score
        )
    labels = label_turns(turns, sessions, links, DefectRule(defects))
    n = len(turns)
    rephrases = [-1] * n
    scores = [0.0] * n
    for lk in links:
        rephrases[lk.later] = int(gidx[lk.earlier])
        scores[lk.later] = lk.score
    chain: list[list[str] | None] = [None] * n
    success: list[bool | None] = [None] * n
    for s, pos, seq in chain_walks(turns, sessions, links):
        start = s.turns[pos]
        chain[start] = [turns[i].normalized for i in seq]
        success[start] = not labels[seq[-1]].defect
    session_of: dict[int, tuple[int, int]] = {}
    for s in sessions:
        no = int(s.session_id.rsplit("#", 1)[1])
        for pos, i in enumerate(s.turns):
            session_of[i] = (no, pos)
    return pa.Table.from_pydict(
        {
            "idx": gidx,
            "user_id": [t.user_id for t in turns],
            "session_no": [session_of[i][0] for i in range(n)],
            "pos": [session_of[i][1] for i in range(n)],
            "rephrases": rephrases,
            "rephrase_score": scores,
            "candidates": [candidates if i == 0 else 0 for i in range(n)],
            "gated": [gated if i == 0 else 0 for i in range(n)],
            "defect": [lab.defect for lab in labels],
            "reasons": [",".join(lab.reasons) for lab in labels],
            "chain": chain,
            "chain_success": success,
        },
        schema=LABELLED_SCHEMA,
    )


def chains_of(table: pa.Table) -> list[RephraseChain]:
    """:data:`CHAINS_SCHEMA` (or :data:`LABELLED_SCHEMA`) rows → chains in the run's chain
    order: by ``(user_id, session_no, pos)``; rows without a chain are skipped."""
    table = table.filter(pc.is_valid(table["chain"]))
    order = pc.sort_indices(
        table,
        sort_keys=[("user_id", "ascending"), ("session_no", "ascending"), ("pos", "ascending")],
    )
    t = table.take(order).select(["user_id", "chain", "chain_success"]).to_pydict()
    return [
        RephraseChain(tuple(u), bool(ok), user)
        for user, u, ok in zip(t["user_id"], t["chain"], t["chain_success"], strict=True)
    ]


#: A vertex and its component's label (the component's smallest vertex name).
COMPONENT_LABELS_SCHEMA = pa.schema([("v", pa.string()), ("c", pa.string())])


def component_labels(edges: pa.Table) -> pa.Table:
    """Connected components of an undirected graph, labelled by their smallest vertex name.

    The vertices are sorted (Arrow's binary string order, which is Spark's ``min`` order on
    strings), edges become index pairs, and ``scipy.sparse.csgraph.connected_components``
    (``directed=False``) finds the components; each vertex gets the smallest name of its
    component -- the fixed point of :func:`offline.engine.spark.connected_components`, so
    either method gives the same labels.

    Args:
        edges: string columns ``a`` and ``b`` (direction ignored; duplicates allowed).

    Returns:
        :data:`COMPONENT_LABELS_SCHEMA` rows, one per vertex on an edge, sorted by ``v``.
    """
    a, b = edges.column("a"), edges.column("b")
    vertices = pc.unique(pa.chunked_array(a.chunks + b.chunks, type=pa.string()))
    vertices = vertices.take(pc.sort_indices(vertices))
    n = len(vertices)
    rows = pc.index_in(a, value_set=vertices).to_numpy(zero_copy_only=False)
    cols = pc.index_in(b, value_set=vertices).to_numpy(zero_copy_only=False)
    graph = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    n_comp, labels = connected_components(graph, directed=False)
    smallest = np.full(n_comp, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n, dtype=np.int64))
    return pa.table(
        {"v": vertices, "c": vertices.take(pa.array(smallest[labels]))},
        schema=COMPONENT_LABELS_SCHEMA,
    )


def solve_component_table(table: pa.Table, markov: MarkovSettings, min_users: int) -> pa.Table:
    """:func:`offline.markov.solve_component` over one component's chain rows.

    Args:
        table: :data:`CHAINS_SCHEMA` rows (extra columns ignored) of exactly one connected
            component, any order (sorted here into the run's chain order).
        markov: the pair thresholds.
        min_users: effective distinct-user floor.

    Returns:
        :data:`COMPONENT_PAIRS_SCHEMA` rows: the pairs, then one summary row.
    """
    pairs, candidates, rejected = solve_component(chains_of(table), markov, min_users)
    none: list[int | None] = [None] * len(pairs)
    return pa.Table.from_pydict(
        {
            "source": [p.source for p in pairs] + [None],
            "rewrite": [p.rewrite for p in pairs] + [None],
            "absorption_probability": [p.absorption_probability for p in pairs] + [None],
            "support": [p.support for p in pairs] + [None],
            "n_users": [p.n_users for p in pairs] + [None],
            "candidates": [*none, candidates],
            "rejected_probability": [*none, rejected["probability"]],
            "rejected_support": [*none, rejected["support"]],
            "rejected_users": [*none, rejected["users"]],
        },
        schema=COMPONENT_PAIRS_SCHEMA,
    )


def solve_components_table(
    table: pa.Table, markov: MarkovSettings, min_users: int, key: str = "c"
) -> pa.Table:
    """:func:`solve_component_table` for every component in ``table`` (rows of several whole
    components, labelled by column ``key``), in ``key`` order; the results concatenated.

    The Spark engine calls it once per partition of chains repartitioned by component, rather
    than once per component through ``groupBy(component).applyInArrow`` (thousands of small
    Python calls).
    """
    if table.num_rows == 0:
        return COMPONENT_PAIRS_SCHEMA.empty_table()
    table = table.take(pc.sort_indices(table, sort_keys=[(key, "ascending")]))
    keys = table[key].combine_chunks()
    change = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    bounds = [0, *(np.flatnonzero(change) + 1).tolist(), len(keys)]
    return pa.concat_tables(
        solve_component_table(table.slice(a, b - a), markov, min_users)
        for a, b in itertools.pairwise(bounds)
    )
