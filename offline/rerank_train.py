"""Train the online reranker (``qrw train ranker``): LightGBM lambdarank over
:data:`rewrite.rerank.FEATURE_NAMES`, plus the trigger threshold chosen for precision.

Data: one **group** per query — a defective utterance whose correct rewrite is known (mined
pairs / rephrase links) — with the candidates a :data:`CandidateGenerator` retrieves for it
(global + personal); label 1 for the candidate equal to the known rewrite, 0 for the others.
A group whose rewrite equals the query (the utterance was fine) teaches "don't rewrite": the
identical candidate is the positive and the trigger never fires on it.

Training: the users are split once into **test** users (``test_frac``, held out for the
report) and the rest, which are **cross-fitted**: dealt into ``cv_folds`` folds by user (no
user in two folds), a LightGBM ``objective=lambdarank`` model per fold is trained on the other
folds, and the number of boosting rounds is the fewest whose *mean* held-out ndcg@1 over the
folds is within one standard error of the best (the one-standard-error rule). Each group's
**out-of-fold** (OOF) score comes from the model that never saw its user; the served ranker is
refitted on all non-test users with that many rounds. Deterministic (``seed``,
``deterministic=True``, ``force_row_wise=True``, ``num_threads``). (LightGBM: Ke et al.,
NeurIPS 2017; LambdaMART: Burges, MSR-TR-2010-82; out-of-fold stacking: Wolpert, "Stacked
generalization", Neural Networks 1992.)

Trigger: a LightGBM binary model over the top candidate's features, its ranker score and the
margin (:data:`rewrite.rerank.TRIGGER_FEATURE_NAMES`), trained on the OOF rows of every
non-test group, so it learns from ranker scores of queries the ranker had not seen, as at
serving. Its threshold is the **lowest** whose precision at trigger on the trigger model's own
out-of-fold probabilities (same folds) is >= the target (0.9). Precision at trigger = share of
triggered queries whose top candidate is the correct rewrite; a query whose correct rewrite is
not among its candidates is a wrong trigger if it triggers. A query triggers when its top
candidate differs from the query and its probability clears the threshold
(:func:`rewrite.rerank.trigger`). Choosing the threshold on all non-test users instead of a
15 % dev split is what makes it stable across seeds (README, "Online rewriting"). A Platt
scaling of the OOF top score (Platt, 1999) gives the response confidence when no trigger
model could be fitted.

Artifacts: ``<artifacts_dir>/<content-hash>/ranker.txt`` (LightGBM text model),
``ranker.json`` and the ONNX export the service runs (``ranker.onnx`` / ``trigger.onnx``,
:func:`export_trees_onnx`, checked against LightGBM on the training rows);
``<artifacts_dir>/LATEST`` names the newest. Written under a temporary name and renamed when
complete.

Figures reported per split — ``train`` (the refitted models on their own training groups),
``oof`` (out-of-fold over the non-test users: the honest development figure) and ``test``
(held-out users, refitted models): recall@1 and MRR of the dense order (retrieval alone), the
:class:`~rewrite.rerank.HeuristicRanker` and the trained ranker; precision at trigger and
trigger rate at the chosen threshold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rapidfuzz import fuzz, process

from rewrite.rerank import (
    FEATURE_NAMES,
    ONNX_INPUT,
    RANKER_META_FILE,
    RANKER_MODEL_FILE,
    RANKER_ONNX_FILE,
    TRIGGER_FEATURE_NAMES,
    TRIGGER_MODEL_FILE,
    TRIGGER_ONNX_FILE,
    HeuristicRanker,
    LightgbmTreeScorer,
    OnnxTreeScorer,
    feature_matrices,
    trigger_features,
)
from rewrite.retrieval import (
    DEVICE_TYPES_TYPE,
    DeviceTypeStat,
    RetrievedCandidate,
    device_types_from_rows,
)
from rewrite.types import ContextTurn

log = logging.getLogger(__name__)

#: ``generate(query, user) -> candidates`` (normalized texts; global + personal, merged).
CandidateGenerator = Callable[[str, str], list[RetrievedCandidate]]

GROUPS_FORMAT = "qrw-rank-groups-v1"

#: Largest |ONNX - LightGBM| score difference :func:`export_trees_onnx` accepts.
ONNX_MAX_ABS_DIFF = 1e-4
#: ONNX ``ai.onnx.ml`` opset target of the export (the newest onnxmltools' LightGBM converter
#: supports).
ONNX_TARGET_OPSET = 15


def _float32_thresholds(model_str: str) -> str:
    """The same LightGBM text model with every split threshold ``t`` (a double) replaced by
    the largest float32 ``<= t``: for float32 inputs ``x <= t`` iff ``x <= t32``, so the
    model's predictions on float32 features are unchanged, and the thresholds survive the
    float32 ``nodes_values`` of ONNX ``TreeEnsemble`` exactly (rounding to nearest would move
    a split past a training value now and then). ``tree_sizes`` (byte offsets) is dropped;
    LightGBM then parses the trees in order."""

    def down(match: re.Match[str]) -> str:
        t = np.array(match.group(1).split(), dtype=np.float64)
        t32 = t.astype(np.float32)
        t32 = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32)
        return "threshold=" + " ".join(repr(float(v)) for v in t32)

    out = re.sub(r"^threshold=(.*)$", down, model_str, flags=re.MULTILINE)
    return re.sub(r"^tree_sizes=.*\n", "", out, flags=re.MULTILINE)


def export_trees_onnx(model_str: str, check_x: np.ndarray) -> tuple[bytes, float]:
    """Export a LightGBM text model to ONNX (onnxmltools ``convert_lightgbm``) and verify it.

    A ``lambdarank`` model is exported as a regression model: its prediction is the raw sum of
    the trees either way, and onnxmltools has no ranking converter. A ``binary`` model keeps
    its ``probabilities`` output (:class:`rewrite.rerank.OnnxTreeScorer` reads column 1).
    Thresholds are first rounded down to float32 (:func:`_float32_thresholds`), which keeps
    every split decision of float32 inputs.

    Args:
        model_str: ``Booster.model_to_string()``.
        check_x: ``(n, F)`` float32 rows to compare both runtimes on (the training rows).

    Returns:
        ``(onnx_bytes, max_abs_diff)``: the serialized model (input ``x`` ``(n, F)`` float32)
        and the largest score difference to ``Booster.predict`` of the original model on
        ``check_x`` (float32 sums of the leaves: ~1e-6).

    Raises:
        ValueError: the ONNX scores differ by more than :data:`ONNX_MAX_ABS_DIFF`.
    """
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    reference = LightgbmTreeScorer(model_str)
    objective = re.search(r"^objective=(\S+)", model_str, flags=re.MULTILINE)
    binary = objective is not None and objective.group(1) == "binary"
    export_str = re.sub(
        r"^objective=lambdarank.*$",
        "objective=regression",
        _float32_thresholds(model_str),
        flags=re.MULTILINE,
    )
    n_feat = reference.num_feature()
    model = convert_lightgbm(
        lgb.Booster(model_str=export_str),
        initial_types=[(ONNX_INPUT, FloatTensorType([None, n_feat]))],
        target_opset=ONNX_TARGET_OPSET,
        zipmap=False,
    )
    data = model.SerializeToString()
    diff = 0.0
    if len(check_x):
        x = np.ascontiguousarray(check_x, dtype=np.float32)
        got = OnnxTreeScorer(data, "probability" if binary else "score").predict(x)
        diff = float(np.max(np.abs(got - reference.predict(x))))
    if diff > ONNX_MAX_ABS_DIFF:
        raise ValueError(f"ONNX export differs from LightGBM by {diff:.3g} (> {ONNX_MAX_ABS_DIFF})")
    return data, diff


@dataclass(frozen=True)
class RankExample:
    """One training query: the normalized ``query`` of ``user`` and its known ``rewrite``."""

    query: str
    user: str
    rewrite: str
    now_s: float = 0.0
    context: tuple[ContextTurn, ...] = ()
    also_correct: tuple[str, ...] = ()  # other acceptable rewrites (see examples_from_rephrases)
    device_type: str = ""  # the query turn's normalized device type ("" unknown)


@dataclass
class RankGroup:
    """A query with its retrieved candidates; ``correct`` is the known rewrite's text."""

    query: str
    user: str
    correct: str
    candidates: list[RetrievedCandidate]
    now_s: float = 0.0
    context: tuple[ContextTurn, ...] = ()
    also_correct: tuple[str, ...] = ()
    device_type: str = ""

    def is_correct(self, text: str) -> bool:
        """``text`` is the known rewrite or another acceptable one."""
        return text == self.correct or text in self.also_correct

    def labels(self) -> np.ndarray:
        """``(n,)`` float32: 1.0 for a correct candidate (:meth:`is_correct`), else 0.0."""
        return np.array([self.is_correct(c.text) for c in self.candidates], dtype=np.float32)

    @property
    def has_correct(self) -> bool:
        """Whether a correct rewrite is among the candidates."""
        return any(self.is_correct(c.text) for c in self.candidates)


def build_groups(examples: Iterable[RankExample], generate: CandidateGenerator) -> list[RankGroup]:
    """One :class:`RankGroup` per example with the candidates ``generate(query, user)`` returns.

    The correct rewrite is never injected: when retrieval misses it the group keeps all labels
    0 (it still counts in the metrics, as in serving).
    """
    return [
        RankGroup(
            ex.query,
            ex.user,
            ex.rewrite,
            list(generate(ex.query, ex.user)),
            ex.now_s,
            ex.context,
            ex.also_correct,
            ex.device_type,
        )
        for ex in examples
    ]


# --------------------------------------------------------------------------- groups on disk


def write_groups(groups: Sequence[RankGroup], path: Path) -> None:
    """Write groups to Parquet: one row per group, candidates as a list of structs."""
    rows = [
        {
            "query": g.query,
            "user": g.user,
            "correct": g.correct,
            "also_correct": list(g.also_correct),
            "now_s": float(g.now_s),
            "context": json.dumps([asdict(t) for t in g.context]),
            "device_type": g.device_type,
            "candidates": [asdict(c) for c in g.candidates],
        }
        for g in groups
    ]
    cand_type = pa.struct(
        [
            ("text", pa.string()),
            ("layer", pa.string()),
            ("dense_score", pa.float64()),
            ("frequency", pa.int64()),
            ("success_rate", pa.float64()),
            ("n_users", pa.int64()),
            ("personal_count", pa.int64()),
            ("personal_age_s", pa.float64()),
            ("domain", pa.string()),
            ("intent", pa.string()),
            ("device_types", DEVICE_TYPES_TYPE),
        ]
    )
    schema = pa.schema(
        [
            ("query", pa.string()),
            ("user", pa.string()),
            ("correct", pa.string()),
            ("also_correct", pa.list_(pa.string())),
            ("now_s", pa.float64()),
            ("context", pa.string()),
            ("device_type", pa.string()),
            ("candidates", pa.list_(cand_type)),
        ],
        metadata={"format": GROUPS_FORMAT},
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_groups(path: Path) -> list[RankGroup]:
    """Read groups written by :func:`write_groups`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a required column is missing.
    """
    table = pq.read_table(path)
    missing = {"query", "user", "correct", "candidates"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a ranker groups file (missing {sorted(missing)})")
    out = []
    for row in table.to_pylist():
        ctx = tuple(ContextTurn(**t) for t in json.loads(row.get("context") or "[]"))
        cands = [
            RetrievedCandidate(
                **{**c, "device_types": device_types_from_rows(c.get("device_types"))}
            )
            for c in row["candidates"] or []
        ]
        out.append(
            RankGroup(
                row["query"],
                row["user"],
                row["correct"],
                cands,
                float(row.get("now_s") or 0.0),
                ctx,
                tuple(row.get("also_correct") or ()),
                str(row.get("device_type") or ""),
            )
        )
    return out


# --------------------------------------------------------------------------- a fuzzy retriever


def char_ngram_cosine(query: str, texts: Sequence[str], n: int = 3) -> np.ndarray:
    """Cosine of character ``n``-gram count vectors (padded with spaces), ``(len(texts),)``.

    A cheap, encoder-free stand-in for a dense score in [0, 1].
    """

    def grams(s: str) -> Counter[str]:
        p = f" {s} "
        return Counter(p[i : i + n] for i in range(max(len(p) - n + 1, 1)))

    gq = grams(query)
    nq = math.sqrt(sum(v * v for v in gq.values()))
    out = np.zeros(len(texts), dtype=np.float64)
    for i, t in enumerate(texts):
        gt = grams(t)
        nt = math.sqrt(sum(v * v for v in gt.values()))
        dot = sum(v * gt.get(k, 0) for k, v in gq.items())
        out[i] = dot / (nq * nt) if nq and nt else 0.0
    return out


@dataclass(frozen=True)
class CatalogEntry:
    """A catalog row (see ``catalog.parquet``)."""

    text: str
    frequency: int = 0
    success_rate: float = 0.0
    n_users: int = 0
    domain: str = ""
    intent: str = ""
    device_types: tuple[DeviceTypeStat, ...] = ()


@dataclass(frozen=True)
class PersonalEntry:
    """One utterance of a user's personal history."""

    text: str
    count: int
    age_s: float = -1.0


class FuzzyCatalogRetriever:
    """A :data:`CandidateGenerator` without an encoder: rapidfuzz ``WRatio`` top-k over the
    catalog plus the user's personal history, merged by text with the service's
    :func:`rewrite.online.merge_personal` (layer ``"personal"`` when the user has it, catalog
    metadata kept, also for history entries outside the global top-k). ``dense_score`` comes
    from ``dense`` (default :func:`char_ngram_cosine`), a stand-in for the DPR cosine — the
    serving generator (DPR + FAISS + personal layer, :class:`RunRetriever`) replaces this class
    when the run has an index.

    Args:
        catalog: global rewrite targets.
        personal: user → history entries.
        top_k: global and personal candidates each.
        dense: ``(query, texts) -> (len(texts),)`` scores.
    """

    def __init__(
        self,
        catalog: Sequence[CatalogEntry],
        personal: Mapping[str, Sequence[PersonalEntry]] | None = None,
        top_k: int = 10,
        dense: Callable[[str, Sequence[str]], np.ndarray] = char_ngram_cosine,
    ) -> None:
        self.catalog = list(catalog)
        self.texts = [c.text for c in self.catalog]
        self._row_of = {t: i for i, t in enumerate(self.texts)}
        self.personal = dict(personal or {})
        self.top_k = top_k
        self.dense = dense

    def __call__(self, query: str, user: str) -> list[RetrievedCandidate]:
        """Candidates for ``query`` of ``user`` (global top-k ∪ personal top-k, merged by
        :func:`rewrite.online.merge_personal` as in the service)."""
        from rewrite.online import merge_personal

        hits = process.extract(query, self.texts, scorer=fuzz.WRatio, limit=self.top_k)
        cands = [self._global(idx) for _text, _score, idx in hits]
        hist = list(self.personal.get(user, ()))
        if hist:
            hist_texts = [h.text for h in hist]
            scores = process.cdist([query], hist_texts, scorer=fuzz.WRatio)[0]
            cands = merge_personal(
                cands,
                hist_texts,
                np.array([h.count for h in hist], dtype=np.int64),
                np.array([h.age_s for h in hist], dtype=np.float64),
                scores,
                self.top_k,
                self._lookup,
            )
        dense = self.dense(query, [c.text for c in cands])
        out = [replace(c, dense_score=float(d)) for c, d in zip(cands, dense, strict=True)]
        out.sort(key=lambda c: -c.dense_score)
        return out

    def _global(self, idx: int) -> RetrievedCandidate:
        e = self.catalog[idx]
        return RetrievedCandidate(
            text=e.text,
            layer="global",
            dense_score=0.0,
            frequency=e.frequency,
            success_rate=e.success_rate,
            n_users=e.n_users,
            domain=e.domain,
            intent=e.intent,
            device_types=e.device_types,
        )

    def _lookup(self, texts: Sequence[str]) -> list[RetrievedCandidate | None]:
        """Catalog candidates of ``texts`` (None outside the catalog), as
        :meth:`rewrite.retrieval.GlobalIndex.lookup_many`."""
        rows = [self._row_of.get(t) for t in texts]
        return [None if idx is None else self._global(idx) for idx in rows]


def read_catalog(path: Path) -> list[CatalogEntry]:
    """``catalog.parquet`` rows (columns ``text, frequency, n_users, success_rate`` and,
    optionally, ``domain, intent, device_types``)."""
    names = {f.name for f in fields(CatalogEntry)}
    out = []
    for row in pq.read_table(path).to_pylist():
        kw = {k: v for k, v in row.items() if k in names and v is not None}
        kw["device_types"] = device_types_from_rows(kw.get("device_types"))
        out.append(CatalogEntry(**kw))
    return out


def examples_from_run(run_dir: Path) -> list[RankExample]:
    """Training queries from a nightly run dir: one per mined pair (``pairs.parquet``,
    source → rewrite).

    ``pairs.parquet`` carries no users, so the user key is the query text (``q:<source>``): the
    by-user split then keeps each query in one split. Groups with real users come from
    ``--data`` (:func:`write_groups`).

    Raises:
        FileNotFoundError: no ``pairs.parquet`` in ``run_dir``.
    """
    path = Path(run_dir) / "pairs.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `qrw nightly --out {run_dir}` first")
    rows = pq.read_table(path).to_pylist()
    return [RankExample(r["source"], f"q:{r['source']}", r["rewrite"]) for r in rows]


def catalog_from_run(run_dir: Path) -> list[CatalogEntry]:
    """``catalog.parquet`` of the run when present, else the distinct rewrite targets of
    ``pairs.parquet`` (frequency = support, success rate 1.0: absorbing states succeed)."""
    run_dir = Path(run_dir)
    if (run_dir / "catalog.parquet").exists():
        return read_catalog(run_dir / "catalog.parquet")
    log.warning("%s has no catalog.parquet; using the pair rewrites as the catalog", run_dir)
    support: Counter[str] = Counter()
    users: dict[str, int] = defaultdict(int)
    for r in pq.read_table(run_dir / "pairs.parquet").to_pylist():
        support[r["rewrite"]] += int(r["support"])
        users[r["rewrite"]] = max(users[r["rewrite"]], int(r["n_users"]))
    return [CatalogEntry(t, f, 1.0, users[t]) for t, f in sorted(support.items())]


# --------------------------------------------------------------------------- split, metrics


def split_by_user(
    groups: Sequence[RankGroup], dev_frac: float, test_frac: float, seed: int
) -> dict[str, list[RankGroup]]:
    """Split groups into ``train``/``dev``/``test`` so that no user is in two splits.

    Users are shuffled with ``random.Random(seed)`` (sorted first: deterministic) and cut by
    count; dev and test (each when its share is > 0) get at least one user each when there
    are >= 3 users.
    """
    users = sorted({g.user for g in groups})
    random.Random(seed).shuffle(users)
    n = len(users)
    n_dev = max(round(n * dev_frac), 1 if n >= 3 and dev_frac > 0 else 0)
    n_test = max(round(n * test_frac), 1 if n >= 3 and test_frac > 0 else 0)
    part = {u: "dev" for u in users[:n_dev]}
    part.update({u: "test" for u in users[n_dev : n_dev + n_test]})
    out: dict[str, list[RankGroup]] = {"train": [], "dev": [], "test": []}
    for g in groups:
        out[part.get(g.user, "train")].append(g)
    return out


def folds_by_user(groups: Sequence[RankGroup], k: int, seed: int) -> np.ndarray:
    """Cross-fitting folds: ``(G,)`` int64 fold in ``[0, min(k, users))`` of each group, users
    shuffled with ``random.Random(seed)`` (sorted first: deterministic) and dealt round-robin,
    so no user is in two folds and the folds' user counts differ by at most one.

    Raises:
        ValueError: ``k < 2``.
    """
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {k}")
    users = sorted({g.user for g in groups})
    random.Random(seed).shuffle(users)
    fold_of = {u: i % k for i, u in enumerate(users)}
    return np.array([fold_of[g.user] for g in groups], dtype=np.int64)


@dataclass
class GroupMatrix:
    """Features of many groups stacked: ``x`` (N, F) float32, ``y`` (N,) float32, and
    ``offsets`` (G+1,) int64 so group g owns rows ``offsets[g]:offsets[g+1]``."""

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray

    def sizes(self) -> np.ndarray:
        """``(G,)`` candidates per group."""
        return np.diff(self.offsets)


def group_matrix(groups: Sequence[RankGroup]) -> GroupMatrix:
    """The groups' features stacked (:func:`rewrite.rerank.feature_matrices`, the service's
    batched featurisation) with their labels."""
    x, offsets = feature_matrices(
        [(g.query, g.candidates, g.context, g.device_type) for g in groups]
    )
    ys = [g.labels() for g in groups]
    y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.float32)
    return GroupMatrix(x, y.astype(np.float32), offsets)


def take_groups(gm: GroupMatrix, idx: np.ndarray) -> GroupMatrix:
    """The groups ``idx`` ((g,) int, in that order) of ``gm`` as a new :class:`GroupMatrix`."""
    sizes = gm.sizes()[idx]
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    rows = group_rows(gm, idx)
    return GroupMatrix(gm.x[rows], gm.y[rows], offsets)


def group_rows(gm: GroupMatrix, idx: np.ndarray) -> np.ndarray:
    """Row indices of ``gm`` owned by the groups ``idx`` ((g,) int), in that order."""
    if len(idx) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(gm.offsets[g], gm.offsets[g + 1]) for g in idx])


@dataclass(frozen=True)
class TopChoice:
    """Per group: the top candidate under some scores."""

    score: np.ndarray  # (G,) float64 top score (-inf: no candidates)
    correct: np.ndarray  # (G,) bool: top candidate is the correct rewrite
    eligible: np.ndarray  # (G,) bool: top candidate differs from the query (can trigger)
    rank: np.ndarray  # (G,) int: 1-based rank of the correct candidate, 0 when absent
    positive: np.ndarray | None = None  # (G,) bool: the group has a rewrite (correct != query);
    # None = all groups. Negative groups (a fine utterance: correct = query) only count for
    # the trigger (a trigger there is wrong), not for recall@k / MRR.


def top_choices(groups: Sequence[RankGroup], scores: np.ndarray, offsets: np.ndarray) -> TopChoice:
    """Top candidate of each group under ``scores`` ((N,) aligned with ``offsets``).

    Ties break by candidate order (stable sort).
    """
    g_n = len(groups)
    top = np.full(g_n, -np.inf)
    correct = np.zeros(g_n, dtype=bool)
    eligible = np.zeros(g_n, dtype=bool)
    rank = np.zeros(g_n, dtype=np.int64)
    for gi, g in enumerate(groups):
        s = scores[offsets[gi] : offsets[gi + 1]]
        if len(s) == 0:
            continue
        order = np.argsort(-s, kind="stable")
        best = g.candidates[int(order[0])]
        top[gi] = float(s[order[0]])
        correct[gi] = g.is_correct(best.text)
        # as at serving: a query that is itself a candidate (a catalog entry or in the user's
        # history, i.e. it succeeds) is never rewritten (rewrite.rerank.trigger)
        eligible[gi] = all(c.text != g.query for c in g.candidates)
        for r, ci in enumerate(order, start=1):
            if g.is_correct(g.candidates[int(ci)].text):
                rank[gi] = r
                break
    positive = np.array([g.correct != g.query for g in groups], dtype=bool)
    return TopChoice(top, correct, eligible, rank, positive)


def ranking_metrics(tc: TopChoice) -> dict[str, float]:
    """recall@1, recall@3, MRR over the positive groups (a missing correct candidate counts as
    a miss)."""
    rank = tc.rank if tc.positive is None else tc.rank[tc.positive]
    n = max(len(rank), 1)
    return {
        "recall@1": float(np.sum(rank == 1) / n),
        "recall@3": float(np.sum((rank >= 1) & (rank <= 3)) / n),
        "mrr": float(np.sum(np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0.0)) / n),
    }


def trigger_metrics(tc: TopChoice, threshold: float) -> dict[str, float]:
    """Precision at trigger and trigger rate of a threshold (see the module docstring).

    ``good_trigger_rate`` = share of all groups rewritten to the correct, different text.
    """
    trig = tc.eligible & (tc.score >= threshold)
    n = max(len(trig), 1)
    n_trig = int(trig.sum())
    n_good = int((trig & tc.correct).sum())
    return {
        "precision_at_trigger": n_good / n_trig if n_trig else float("nan"),
        "trigger_rate": n_trig / n,
        "good_trigger_rate": n_good / n,
        "triggered": n_trig,
        "groups": len(trig),
    }


def choose_threshold(
    tc: TopChoice, target_precision: float = 0.9, min_triggers: int = 1
) -> tuple[float, bool]:
    """The lowest threshold (among the top scores) whose precision at trigger >= target and
    that triggers on at least ``min_triggers`` groups (a precision measured on a handful of
    dev triggers is chance: on DSTC2's small dev split a threshold "met" on 5 triggers gave
    precision 0.50 on test).

    Returns:
        ``(threshold, met)``; when no threshold reaches the target, ``met`` is False and the
        threshold is above every top score (nothing triggers on dev).
    """
    s = tc.score[tc.eligible]
    c = tc.correct[tc.eligible]
    if len(s) == 0:
        return float("inf"), False
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    cum_good = np.cumsum(c)
    cum_n = np.arange(1, len(s) + 1)
    # only the last index of each run of equal scores is a reachable threshold
    last = np.r_[s[1:] != s[:-1], True]
    ok = last & (cum_good / cum_n >= target_precision) & (cum_n >= min_triggers)
    if not ok.any():
        return float(s[0]) + 1.0, False
    return float(s[np.nonzero(ok)[0][-1]]), True


def fit_platt(scores: np.ndarray, correct: np.ndarray, l2: float = 1e-3) -> dict[str, float]:
    """Platt scaling ``P(correct | s) = sigmoid(a * s + b)`` by Newton's method (L2 ``l2``)."""
    if len(scores) == 0 or correct.all() or not correct.any():
        return {"a": 1.0, "b": 0.0, "fitted": 0.0}
    x = np.stack([scores, np.ones_like(scores)], axis=1)
    y = correct.astype(np.float64)
    w = np.zeros(2)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"a": float(w[0]), "b": float(w[1]), "fitted": 1.0}


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RankerTrainConfig:
    """LightGBM, split and cross-fitting settings of ``qrw train ranker``.

    ``num_boost_round`` is the most rounds a fold model trains; the served ranker gets the
    count the one-standard-error rule picks from the folds' held-out ndcg@1
    (:func:`cross_fit_ranker`). ``cv_folds``: folds by user over the non-test
    users (fewer when there are fewer users). ``test_frac``: share of users held out for the
    report. ``min_oof_triggers``: out-of-fold triggers a threshold must fire on to count.
    """

    num_boost_round: int = 500
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    feature_fraction: float = 1.0
    lambda_l2: float = 1.0
    seed: int = 13
    num_threads: int = 2
    cv_folds: int = 5
    test_frac: float = 0.15
    target_precision: float = 0.9
    min_oof_triggers: int = 20  # a threshold must trigger on this many out-of-fold groups

    def params(self) -> dict[str, Any]:
        """LightGBM parameters (deterministic)."""
        return {
            "objective": "lambdarank",
            "metric": ["ndcg"],
            "eval_at": [1, 3],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }


@dataclass
class RankerTrainResult:
    """Where the ranker went and what it measured (``meta`` = ``ranker.json``)."""

    artifact: Path
    meta: dict[str, Any]
    booster: lgb.Booster | None = None
    splits: dict[str, list[RankGroup]] = field(default_factory=dict)


def _dataset(gm: GroupMatrix, reference: lgb.Dataset | None = None) -> lgb.Dataset | None:
    """LightGBM dataset of the groups with >= 1 positive (others carry no ranking signal)."""
    keep = [
        gi
        for gi in range(len(gm.offsets) - 1)
        if gm.y[gm.offsets[gi] : gm.offsets[gi + 1]].sum() > 0
    ]
    if not keep:
        return None
    kept = take_groups(gm, np.asarray(keep, dtype=np.int64))
    return lgb.Dataset(
        kept.x,
        label=kept.y,
        group=kept.sizes(),
        feature_name=list(FEATURE_NAMES),
        reference=reference,
        free_raw_data=False,
        params={"verbosity": -1},
    )


def trigger_rows(groups: Sequence[RankGroup], gm: GroupMatrix, scores: np.ndarray) -> np.ndarray:
    """Trigger-model inputs, one row per group (:func:`rewrite.rerank.trigger_features` of its
    top candidate under ``scores``): ``(G, len(TRIGGER_FEATURE_NAMES))`` float32; groups
    without candidates get zeros (they are never eligible)."""
    out = np.zeros((len(groups), len(TRIGGER_FEATURE_NAMES)), dtype=np.float32)
    for gi in range(len(groups)):
        lo, hi = int(gm.offsets[gi]), int(gm.offsets[gi + 1])
        if hi == lo:
            continue
        s = scores[lo:hi]
        order = np.argsort(-s, kind="stable")
        out[gi] = trigger_features(gm.x[lo + int(order[0])], s[order])[0]
    return out


@dataclass
class TriggerModel:
    """The trigger model of :func:`fit_trigger_model` and how it did out of fold on dev."""

    booster: lgb.Booster
    model_str: str
    threshold: float
    met: bool
    oof: np.ndarray  # (G,) out-of-fold probabilities of the dev groups (-inf: not eligible)
    params: dict[str, Any]


def _trigger_params(config: RankerTrainConfig) -> dict[str, Any]:
    return {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": 7,
        "min_data_in_leaf": 10,
        "lambda_l2": 1.0,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": config.num_threads,
        "verbosity": -1,
    }


def fit_trigger_model(
    groups: Sequence[RankGroup],
    gm: GroupMatrix,
    scores: np.ndarray,
    config: RankerTrainConfig,
    fold: np.ndarray,
    rounds: int = 150,
) -> TriggerModel | None:
    """Train the trigger model: a LightGBM binary classifier of "the top candidate under the
    ranker is a correct, different rewrite" over :data:`rewrite.rerank.TRIGGER_FEATURE_NAMES`,
    with the threshold for ``config.target_precision`` chosen on its out-of-fold probabilities
    (folds ``fold``, by user: no user in both halves), then refitted on all eligible groups.

    Lambdarank scores only order candidates within a query; this model turns the top one into
    a probability that is comparable across queries, and it learns from the groups whose query
    needs no rewrite (negatives) which a lambdarank loss never sees.

    Args:
        groups: the groups; ``gm`` their features, ``scores`` ``(N,)`` their ranker scores
            (out of fold: from rankers that did not see the group's user).
        fold: ``(G,)`` int fold of each group (:func:`folds_by_user`).

    Returns:
        None when fewer than 10 correct or 10 wrong eligible top candidates exist.
    """
    tc = top_choices(groups, scores, gm.offsets)
    x = trigger_rows(groups, gm, scores)
    elig = tc.eligible.copy()
    y = tc.correct.astype(np.float64)
    if int(y[elig].sum()) < 10 or int((1 - y[elig]).sum()) < 10:
        log.warning("too few eligible groups for a trigger model (%d)", int(elig.sum()))
        return None
    params = _trigger_params(config)
    oof = np.full(len(groups), -np.inf)
    for f in np.unique(fold).tolist():
        tr, te = elig & (fold != f), elig & (fold == f)
        if not te.any() or len(np.unique(y[tr])) < 2:
            continue
        b = lgb.train(params, lgb.Dataset(x[tr], label=y[tr], params={"verbosity": -1}), rounds)
        oof[te] = b.predict(x[te], num_threads=config.num_threads)
    threshold, met = choose_threshold(
        TopChoice(oof, tc.correct, elig & np.isfinite(oof), tc.rank, tc.positive),
        config.target_precision,
        config.min_oof_triggers,
    )
    booster = lgb.train(
        params,
        lgb.Dataset(
            x[elig],
            label=y[elig],
            feature_name=list(TRIGGER_FEATURE_NAMES),
            params={"verbosity": -1},
        ),
        rounds,
    )
    model_str = booster.model_to_string()
    return TriggerModel(lgb.Booster(model_str=model_str), model_str, threshold, met, oof, params)


@dataclass
class CrossFit:
    """What :func:`cross_fit_ranker` measured: ``oof`` ``(N,)`` out-of-fold ranker scores of
    every row, ``rounds`` the boosting rounds chosen (one-standard-error rule), ``curve`` the
    mean held-out ndcg@1 per round, ``se`` its standard error at the best round, ``fold_best``
    each fold's own best round (report)."""

    oof: np.ndarray
    rounds: int
    curve: list[float]
    se: float
    fold_best: list[int]


def cross_fit_ranker(gm: GroupMatrix, fold: np.ndarray, config: RankerTrainConfig) -> CrossFit:
    """One lambdarank model per fold, trained on the other folds for
    ``config.num_boost_round`` rounds with the held-out fold's ndcg@1 recorded each round.
    The round count is chosen by the **one-standard-error rule** (Breiman et al., CART, 1984;
    Hastie et al., ESL 2nd ed. §7.10): the fewest rounds whose mean held-out ndcg@1 is within
    one standard error (over the folds, at the best round) of the best mean. The curve is flat
    over hundreds of rounds on a night's groups, and its raw maximum landed anywhere from 57 to
    365 rounds between seeds (2026-12-07); those rounds then score each held-out fold.

    Args:
        gm: the groups' features and labels; ``fold`` ``(G,)`` their folds (by user).

    Raises:
        ValueError: a fold's training groups hold no correct candidate at all.
    """
    params = config.params()
    folds = np.unique(fold).tolist()
    models: dict[int, lgb.Booster] = {}
    curves: list[list[float]] = []
    fold_best: list[int] = []
    for f in folds:
        train_gm = take_groups(gm, np.nonzero(fold != f)[0])
        held_gm = take_groups(gm, np.nonzero(fold == f)[0])
        train_ds = _dataset(train_gm)
        if train_ds is None:
            raise ValueError(f"fold {f}: no training group has its correct rewrite listed")
        held_ds = _dataset(held_gm, reference=train_ds)
        evals: dict[str, Any] = {}
        models[f] = lgb.train(
            params,
            train_ds,
            num_boost_round=config.num_boost_round,
            valid_sets=[held_ds] if held_ds is not None else [],
            valid_names=["held_out"] if held_ds is not None else [],
            callbacks=[lgb.record_evaluation(evals)],
        )
        curve = evals.get("held_out", {}).get("ndcg@1")
        if curve:
            curves.append(list(curve))
            fold_best.append(int(np.argmax(curve)) + 1)
    per_fold = np.asarray(curves)  # (folds with a held-out positive, rounds)
    mean_curve = per_fold.mean(axis=0) if curves else np.zeros(0)
    se = 0.0
    if len(mean_curve):
        best = int(np.argmax(mean_curve))
        se = (
            float(per_fold[:, best].std(ddof=1)) / math.sqrt(len(curves))
            if len(curves) > 1
            else 0.0
        )
        rounds = int(np.nonzero(mean_curve >= mean_curve[best] - se)[0][0]) + 1
    else:
        rounds = config.num_boost_round
    oof = np.zeros(len(gm.x), dtype=np.float64)
    for f in folds:
        rows = group_rows(gm, np.nonzero(fold == f)[0])
        if len(rows):
            oof[rows] = models[f].predict(
                gm.x[rows], num_iteration=rounds, num_threads=config.num_threads
            )
    return CrossFit(oof, rounds, [float(v) for v in mean_curve], se, fold_best)


def _split_report(
    groups: Sequence[RankGroup],
    gm: GroupMatrix,
    ranker_scores: np.ndarray,
    threshold: float,
    heuristic: HeuristicRanker,
    decision: np.ndarray | None = None,
) -> dict[str, Any]:
    """Ranking and trigger metrics of one split; ``decision`` ((G,) per-group decision
    scores, e.g. trigger-model probabilities) replaces the top ranker score for the trigger."""
    dense = gm.x[:, FEATURE_NAMES.index("dense_cosine")].astype(np.float64)
    heur = heuristic.score_matrix(gm.x)
    tc_ranker = top_choices(groups, ranker_scores, gm.offsets)
    tc_trig = tc_ranker if decision is None else dataclasses.replace(tc_ranker, score=decision)
    tc_heur = top_choices(groups, heur, gm.offsets)
    return {
        "groups": len(groups),
        "users": len({g.user for g in groups}),
        "correct_in_candidates": float(np.mean([g.has_correct for g in groups])) if groups else 0.0,
        "dense": ranking_metrics(top_choices(groups, dense, gm.offsets)),
        "heuristic": {
            **ranking_metrics(tc_heur),
            **trigger_metrics(tc_heur, heuristic.trigger_threshold),
        },
        "ranker": {**ranking_metrics(tc_ranker), **trigger_metrics(tc_trig, threshold)},
    }


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def train_ranker(
    groups: Sequence[RankGroup],
    out_root: Path = Path("artifacts/ranker"),
    config: RankerTrainConfig | None = None,
    heuristic_threshold: float = 0.8,
    source: str = "",
    update_latest: bool = True,
) -> RankerTrainResult:
    """Hold out test users, cross-fit the lambdarank model and the trigger model on the rest
    (module docstring), choose the trigger threshold out of fold, refit both on all non-test
    users, save.

    Args:
        groups: all training groups (:func:`build_groups` / :func:`read_groups`).
        out_root: ``artifacts/ranker``; the model goes to ``<out_root>/<content-hash>/``.
        config: training settings (default :class:`RankerTrainConfig`).
        heuristic_threshold: threshold of the heuristic baseline in the report.
        source: where the groups came from (recorded in the meta).
        update_latest: point ``<out_root>/LATEST`` at the new artifact.

    Raises:
        ValueError: fewer than 2 non-test users, or no non-test group (or a fold's training
            groups) with the correct rewrite among its candidates.
    """
    config = config or RankerTrainConfig()
    t0 = time.perf_counter()
    held = split_by_user(groups, 0.0, config.test_frac, config.seed)
    splits = {"train": held["train"], "test": held["test"]}
    n_users = len({g.user for g in splits["train"]})
    if n_users < 2:
        raise ValueError(f"cross-fitting needs at least 2 users besides the test users ({n_users})")
    mats = {name: group_matrix(gs) for name, gs in splits.items()}
    fit_gm = mats["train"]
    full_ds = _dataset(fit_gm)
    if full_ds is None:
        raise ValueError("no training group has its correct rewrite among the candidates")
    fold = folds_by_user(splits["train"], min(config.cv_folds, n_users), config.seed)
    cf = cross_fit_ranker(fit_gm, fold, config)
    booster = lgb.train(config.params(), full_ds, num_boost_round=cf.rounds)
    model_str = booster.model_to_string()
    booster = lgb.Booster(model_str=model_str)  # exactly what is saved
    train_s = time.perf_counter() - t0

    scores = {
        name: np.asarray(booster.predict(m.x, num_threads=config.num_threads), dtype=np.float64)
        if len(m.x)
        else np.zeros(0)
        for name, m in mats.items()
    }
    scores["oof"] = cf.oof
    mats["oof"] = fit_gm
    splits_oof = {**splits, "oof": splits["train"]}
    tc_oof = top_choices(splits["train"], cf.oof, fit_gm.offsets)
    trig = fit_trigger_model(splits["train"], fit_gm, cf.oof, config, fold)
    decision: dict[str, np.ndarray | None] = {name: None for name in mats}
    if trig is not None:
        threshold, met = trig.threshold, trig.met
        for name in ("train", "test"):
            rows = trigger_rows(splits[name], mats[name], scores[name])
            decision[name] = (
                np.asarray(trig.booster.predict(rows, num_threads=config.num_threads))
                if len(rows)
                else np.zeros(0)
            )
        decision["oof"] = trig.oof  # out of fold: the honest development figure
    else:
        threshold, met = choose_threshold(tc_oof, config.target_precision, config.min_oof_triggers)
    if not met:
        log.warning(
            "no out-of-fold threshold reaches precision %.2f; the ranker will not trigger",
            config.target_precision,
        )
    eligible = tc_oof.eligible & np.isfinite(tc_oof.score)
    platt = fit_platt(tc_oof.score[eligible], tc_oof.correct[eligible])
    heuristic = HeuristicRanker(heuristic_threshold)
    metrics = {
        name: _split_report(
            splits_oof[name], mats[name], scores[name], threshold, heuristic, decision[name]
        )
        for name in ("train", "oof", "test")
    }
    gain = booster.feature_importance(importance_type="gain")
    model_sha = hashlib.sha256(model_str.encode()).hexdigest()
    h = hashlib.sha256(model_sha.encode())
    h.update(json.dumps([FEATURE_NAMES, threshold], default=str).encode())
    trigger_meta: dict[str, Any] | None = None
    if trig is not None:
        trigger_sha = hashlib.sha256(trig.model_str.encode()).hexdigest()
        h.update(trigger_sha.encode())
        trigger_meta = {
            "file": TRIGGER_MODEL_FILE,
            "sha256": trigger_sha,
            "feature_names": list(TRIGGER_FEATURE_NAMES),
            "params": trig.params,
            "threshold_from": (
                f"out-of-fold probabilities over the non-test users ({len(cf.fold_best)} folds "
                "by user)"
            ),
        }
    chash = h.hexdigest()[:16]
    check_x = np.concatenate([mats["train"].x, mats["test"].x])
    ranker_onnx, ranker_diff = export_trees_onnx(model_str, check_x)
    onnx_meta: dict[str, Any] = {
        "ranker_sha256": hashlib.sha256(ranker_onnx).hexdigest(),
        "ranker_max_abs_diff": ranker_diff,
        "converter": f"onnxmltools {metadata.version('onnxmltools')}",
        "target_opset": ONNX_TARGET_OPSET,
    }
    trigger_onnx: bytes | None = None
    if trig is not None:
        trig_x = trigger_rows(splits["train"], fit_gm, cf.oof)
        trigger_onnx, trigger_diff = export_trees_onnx(trig.model_str, trig_x)
        onnx_meta["trigger_sha256"] = hashlib.sha256(trigger_onnx).hexdigest()
        onnx_meta["trigger_max_abs_diff"] = trigger_diff
    meta: dict[str, Any] = {
        "name": "lightgbm_lambdarank",
        "content_hash": chash,
        "model_sha256": model_sha,
        "feature_names": list(FEATURE_NAMES),
        "trigger_threshold": threshold,
        "threshold_met": met,
        "trigger_model": trigger_meta,
        "onnx": onnx_meta,
        "target_precision": config.target_precision,
        "calibration": platt,
        "config": asdict(config),
        "params": config.params(),
        "best_iteration": cf.rounds,
        "cross_fit": {
            "folds": len(np.unique(fold)),
            "users": n_users,
            "rounds": cf.rounds,
            "fold_best_rounds": cf.fold_best,
            "ndcg@1_standard_error": round(cf.se, 5),
            "mean_oof_ndcg@1": [round(v, 5) for v in cf.curve],
        },
        "feature_importance_gain": {
            n: round(float(g), 3)
            for n, g in sorted(zip(FEATURE_NAMES, gain, strict=True), key=lambda t: -t[1])
        },
        "metrics": _round(metrics),
        "source": source,
        "train_seconds": round(train_s, 2),
        "versions": {"lightgbm": metadata.version("lightgbm")},
        "created_unix": round(time.time(), 3),
    }
    out = Path(out_root) / chash
    if not (out / RANKER_META_FILE).exists():
        tmp = out.with_name(f".{chash}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / RANKER_MODEL_FILE).write_text(model_str)
        (tmp / RANKER_ONNX_FILE).write_bytes(ranker_onnx)
        if trig is not None and trigger_onnx is not None:
            (tmp / TRIGGER_MODEL_FILE).write_text(trig.model_str)
            (tmp / TRIGGER_ONNX_FILE).write_bytes(trigger_onnx)
        (tmp / RANKER_META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    else:
        log.info("ranker %s already saved; reusing", chash)
    if update_latest:
        (Path(out_root) / "LATEST").write_text(chash + "\n")
    log.info(
        "ranker %s: out-of-fold recall@1 %.3f (dense %.3f), threshold %.3f, precision@trigger %s",
        chash,
        metrics["oof"]["ranker"]["recall@1"],
        metrics["oof"]["dense"]["recall@1"],
        threshold,
        metrics["oof"]["ranker"]["precision_at_trigger"],
    )
    return RankerTrainResult(out, meta, booster, splits)


# --------------------------------------------------------------------------- synthetic task

_SYN_TEMPLATES = (
    "what's the weather in {}",
    "navigate to {}",
    "play music by {}",
    "call {}",
    "book a table at {}",
)
_SYN_SLOTS = (
    ("wilkerson", "wilkinson", "wilson", "wilkes"),
    ("boston", "austin", "houston", "bolton"),
    ("paris", "harris", "ferris", "parris"),
    ("adele", "adelle", "odell", "del"),
    ("madison", "addison", "mattison", "davidson"),
    ("sheffield", "springfield", "shelby", "sheldon"),
    ("tina", "dina", "gina", "nina"),
    ("marco", "mario", "margo", "marcel"),
)
#: Device types of :func:`synthetic_task` users, with their shares (the rest log none).
_SYN_DEVICES = (("speaker", 0.55), ("display", 0.35))
#: Slot families whose dominant value differs by device type: value 0 is what speaker users
#: mean, value 1 what display users mean (like "play the office" on a TV vs a speaker).
_SYN_DEVICE_SPLIT = (1, 6)


def _garble(word: str, rng: random.Random) -> str:
    """An ASR-like misspelling: a dropped, doubled, swapped or replaced letter."""
    if len(word) < 3:
        return word + word[-1:]
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1 :]
    if op == 1:
        return word[:i] + word[i] + word[i:]
    if op == 2:
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    return word[:i] + rng.choice("aeiouy") + word[i + 1 :]


def synthetic_task(
    n_users: int = 120, queries_per_user: int = 6, seed: int = 0, top_k: int = 8
) -> tuple[list[RankGroup], FuzzyCatalogRetriever]:
    """A small reranking task where fuzzy similarity, frequency and personal history decide
    better than the dense score (for tests and smoke runs).

    Catalog: templates x confusable slot values, each slot family with one dominant value
    (frequency) and users' personal favourites (some users prefer a rarer value). Queries:
    10% the target said right (correct = the query itself), 25% misheard as another value of
    the slot family (sometimes garbled too: only frequency and personal history can tell),
    65% the target with a garbled slot word; 20% also drop a filler word. ``dense_score`` is
    nearly entity-blind: word overlap outside the slot, a little character overlap, and
    noise, so dense alone confuses the slot values.

    Device types: 55% of users talk to a ``speaker``, 35% to a ``display``, 10% log none. In
    the slot families :data:`_SYN_DEVICE_SPLIT` display users mean value 1 (85% of their
    requests there), speaker users the dominant value 0, and the catalog's per-device-type
    counts (``device_types``) show it (value 0: 10% of turns on displays, value 1: 90%; other
    entries ~40% ± noise): only the request's device type tells the two apart when the slot
    word was misheard as another value.
    """
    rng = random.Random(seed)
    dev_rng = random.Random(seed + 2)  # device aspects: the other draws stay as they were
    catalog: list[CatalogEntry] = []
    for tpl in _SYN_TEMPLATES:
        for fam_i, fam in enumerate(_SYN_SLOTS):
            for rank, val in enumerate(fam):
                freq = int(200 / (rank + 1) ** 2 * rng.uniform(0.7, 1.3))
                rate = rng.uniform(0.75, 0.98)
                if fam_i in _SYN_DEVICE_SPLIT and rank < 2:
                    p_display = 0.1 if rank == 0 else 0.9
                else:
                    p_display = min(max(dev_rng.gauss(0.4, 0.1), 0.0), 1.0)
                n_disp = round(freq * p_display)
                devices = tuple(
                    DeviceTypeStat(d, n, round(n * rate))
                    for d, n in sorted(
                        (("display", n_disp), ("speaker", freq - n_disp)), key=lambda x: -x[1]
                    )
                    if n > 0
                )
                catalog.append(
                    CatalogEntry(
                        tpl.format(val), freq, rate, max(freq // 4, 1), device_types=devices
                    )
                )
    prior = {c.text: c.frequency for c in catalog}
    slot_words = {v for fam in _SYN_SLOTS for v in fam}

    noise_rng = random.Random(seed + 1)
    noise: dict[tuple[str, str], float] = {}

    def dense(query: str, texts: Sequence[str]) -> np.ndarray:
        qw = {w for w in query.split() if w not in slot_words}
        out = []
        chars = char_ngram_cosine(query, texts)
        for i, t in enumerate(texts):
            tw = {w for w in t.split() if w not in slot_words}
            jac = len(qw & tw) / max(len(qw | tw), 1)
            key = (query, t)
            if key not in noise:
                noise[key] = noise_rng.gauss(0.0, 0.05)
            out.append(0.5 + 0.3 * jac + 0.15 * chars[i] + noise[key])
        return np.clip(np.array(out), -1.0, 1.0)

    personal: dict[str, list[PersonalEntry]] = {}
    examples: list[RankExample] = []
    for u in range(n_users):
        user = f"u{u:04d}"
        device, r_dev = "", dev_rng.random()
        for name, share in _SYN_DEVICES:
            if r_dev < share:
                device = name
                break
            r_dev -= share
        favs: dict[int, str] = {}
        if rng.random() < 0.35:  # this user prefers a rarer value of one slot family
            fam_i = rng.randrange(len(_SYN_SLOTS))
            favs[fam_i] = rng.choice(_SYN_SLOTS[fam_i][1:])
        hist: dict[str, PersonalEntry] = {}
        for _q in range(queries_per_user):
            tpl = rng.choice(_SYN_TEMPLATES)
            fam_i = rng.randrange(len(_SYN_SLOTS))
            fam = _SYN_SLOTS[fam_i]
            if fam_i in favs:
                val = favs[fam_i]
            else:
                weights = [prior[tpl.format(v)] for v in fam]
                val = rng.choices(fam, weights=weights)[0]
                if fam_i in _SYN_DEVICE_SPLIT and device == "display" and dev_rng.random() < 0.85:
                    val = fam[1]
            target = tpl.format(val)
            if fam_i in favs or rng.random() < 0.3:  # the user said it successfully before
                hist[target] = PersonalEntry(target, rng.randint(1, 8), rng.uniform(3600, 3e6))
            r = rng.random()
            if r < 0.1:  # said right
                query = target
            elif r < 0.35:  # misheard as another value of the family (maybe garbled too)
                heard = rng.choice([v for v in fam if v != val])
                query = tpl.format(_garble(heard, rng) if rng.random() < 0.5 else heard)
            else:
                query = tpl.format(_garble(val, rng))
            if rng.random() < 0.2:
                query = query.replace("the ", "").replace(" to ", " ")
            examples.append(RankExample(query, user, target, device_type=device))
        # a distractor the user used once: a different value of a family they did not ask for
        d_fam = _SYN_SLOTS[rng.randrange(len(_SYN_SLOTS))]
        d_text = rng.choice(_SYN_TEMPLATES).format(rng.choice(d_fam))
        hist.setdefault(d_text, PersonalEntry(d_text, 1, rng.uniform(3600, 3e6)))
        personal[user] = list(hist.values())
    retriever = FuzzyCatalogRetriever(catalog, personal, top_k=top_k, dense=dense)
    return build_groups(examples, retriever), retriever


# --------------------------------------------------------------------------- real retrieval


def examples_from_rephrases(
    run_dir: Path, negatives_per_positive: float = 3.0, seed: int = 13
) -> list[RankExample]:
    """Training queries from the run's rephrase links (``rephrases.parquet``): the earlier
    (failing) utterance with the later one as its rewrite, when the later one is a catalog
    entry (a rewrite target the online layer can retrieve) and differs from the earlier one.
    One example per (user, earlier, later); ``user`` is the pseudonymous key the job wrote, so
    the by-user split and the personal layer see real users. ``now_s`` is the later turn's time.

    A rewrite is also *acceptable* when any user rephrased the same failing text into it in
    this run (``also_correct``): the user's own next wording is one of several phrasings that
    work, and exact-text targets alone make every other good fix a "wrong" trigger.

    Plus ``negatives_per_positive`` × as many *negative* examples (the query is its own correct
    answer): utterances that succeeded in the run (``personal.parquet``), were never
    rephrased and are not catalog entries — half asked by a user without history, half by a
    user who succeeded with them once, that use left out of their history (see
    :meth:`RunRetriever.leave_out`); each with a device type drawn from the positives' (the
    run's histories record none). Serving traffic is mostly such utterances; without them
    the trigger would be chosen on failing queries only and would fire on everything, and
    without the second half it learns that a near neighbour in the user's history means
    "rewrite" (measured: personal-layer win/loss 1.9:1 in the closed loop).

    Raises:
        FileNotFoundError: no ``rephrases.parquet`` or ``catalog.parquet`` in ``run_dir``.
    """
    run_dir = Path(run_dir)
    catalog = {e.text for e in read_catalog(run_dir / "catalog.parquet")}
    rows = pq.read_table(run_dir / "rephrases.parquet").to_pylist()
    accepted: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["later"] in catalog and r["earlier"] != r["later"]:
            accepted[r["earlier"]].add(r["later"])
    seen: set[tuple[str, str, str]] = set()
    out: list[RankExample] = []
    for r in rows:
        key = (str(r.get("user") or f"q:{r['earlier']}"), r["earlier"], r["later"])
        if r["later"] not in catalog or r["earlier"] == r["later"] or key in seen:
            continue
        seen.add(key)
        also = tuple(sorted(accepted[r["earlier"]] - {r["later"]}))
        out.append(
            RankExample(
                r["earlier"],
                key[0],
                r["later"],
                float(r.get("ts") or 0.0),
                (),
                also,
                str(r.get("device_type") or ""),
            )
        )
    rephrased = {r["earlier"] for r in rows}
    personal_path = run_dir / "personal.parquet"
    if negatives_per_positive > 0 and personal_path.exists():
        # fine utterances: succeeded for someone, never rephrased, not a catalog entry (the
        # online layer must leave them alone). Half are asked by a user without history
        # ("new:"), half by a user who succeeded with it exactly once, with that use left out
        # of their history (their first time: a new but fine utterance from a user whose
        # history offers near neighbours is the case that breaks working requests)
        prows = pq.read_table(personal_path).to_pylist()
        fine_texts = {r["text"] for r in prows} - catalog - rephrased
        fine = sorted(fine_texts)
        once = sorted((r["user"], r["text"]) for r in prows
                      if r["text"] in fine_texts and int(r["count"]) == 1)  # fmt: skip
        rng = random.Random(seed)
        rng.shuffle(fine)
        rng.shuffle(once)
        n_neg = int(negatives_per_positive * len(out))
        n_hist = min(len(once), n_neg // 2)
        # personal.parquet records no device types: a negative gets one drawn from the
        # positives' device types (same share of "" too), so whether the device type is known
        # says nothing about the label (measured: with negatives all "unknown" the trigger
        # model learnt "device type known -> rewrite" and fired on 42 % of a simulated day)
        devices = [ex.device_type for ex in out] or [""]
        for user, text in once[:n_hist]:
            out.append(RankExample(text, user, text, device_type=rng.choice(devices)))
        for text in fine[: n_neg - n_hist]:
            out.append(RankExample(text, f"new:{text}", text, device_type=rng.choice(devices)))
    return out


class RunRetriever:
    """The serving path's candidates for a run, without Redis: DPR query encoder + the run's
    FAISS index (global layer) and the run's ``personal.parquet`` scored exactly with the
    passage encoder (personal layer), merged by :func:`rewrite.online.merge_personal` — the
    same code the online stage uses.

    Args:
        run_dir: a nightly run dir with ``index/`` and ``personal.parquet``.
        settings: loaded settings (``dpr.artifacts_dir``, ``dpr.top_k``,
            ``rerank.personal_top_k``).

    Raises:
        FileNotFoundError: no index in the run, or its encoder's artifact is missing.
    """

    def __init__(self, run_dir: Path, settings: Any) -> None:
        from rewrite.encoder import PassageEncoder, QueryEncoder
        from rewrite.retrieval import GlobalIndex, IndexInfo

        run_dir = Path(run_dir)
        info = IndexInfo.read(run_dir / "index")
        artifact = Path(settings.dpr.artifacts_dir) / info.encoder_id
        self.index = GlobalIndex.load(run_dir / "index", expected_encoder_id=info.encoder_id)
        self.query_encoder = QueryEncoder.load(artifact, threads=2)
        passage = PassageEncoder.load(artifact, threads=2)
        self.top_k = int(settings.dpr.top_k)
        self.personal_top_k = int(settings.rerank.personal_top_k)
        rows = pq.read_table(run_dir / "personal.parquet").to_pylist()
        texts = sorted({r["text"] for r in rows})
        vecs = passage.encode(texts) if texts else np.zeros((0, passage.dim), np.float32)
        row_of = {t: i for i, t in enumerate(texts)}
        by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_user[r["user"]].append(r)
        self.now_s = max((float(r["last_seen"]) for r in rows), default=0.0)
        self._left_out: dict[tuple[str, str], str] = {}
        self.history = {
            u: (
                [r["text"] for r in hs],
                np.array([r["count"] for r in hs], dtype=np.int64),
                np.array([r["last_seen"] for r in hs], dtype=np.float64),
                vecs[[row_of[r["text"]] for r in hs]],
            )
            for u, hs in by_user.items()
        }

    def leave_out(self, examples: Iterable[RankExample]) -> None:
        """Training groups: the user's history was built from the same night, so a rephrase's
        own successful target counts in it. For these examples one use of the target is
        removed from the user's history when their candidates are generated."""
        self._left_out = {(ex.user, ex.query): ex.rewrite for ex in examples}

    def __call__(self, query: str, user: str, now_s: float = 0.0) -> list[RetrievedCandidate]:
        """Global top-k ∪ the user's personal top-k for ``query`` (normalized); ``now_s``
        (epoch s) defaults to the latest personal ``last_seen`` of the run."""
        from rewrite.online import history_ages, merge_personal

        q = self.query_encoder.encode_cached([query])
        cands = self.index.search(q, self.top_k, texts=[query])[0]
        hist = self.history.get(user)
        if hist is None:
            return list(cands)
        texts, counts, last_seen, vecs = hist
        target = self._left_out.get((user, query))
        if target is not None and target in texts:
            # this rephrase's own success is in the history: take it out (no leakage)
            i = texts.index(target)
            counts = counts.copy()
            counts[i] -= 1
            if counts[i] <= 0:
                keep = np.arange(len(texts)) != i
                texts = [t for t, k in zip(texts, keep, strict=True) if k]
                counts, last_seen, vecs = counts[keep], last_seen[keep], vecs[keep]
        ages = history_ages(last_seen, now_s or self.now_s)
        return merge_personal(
            cands, texts, counts, ages, vecs @ q[0], self.personal_top_k, self.index.lookup_many
        )


def groups_from_run(run_dir: Path, settings: Any, top_k: int = 10) -> tuple[list[RankGroup], str]:
    """Training groups of a nightly run dir, and a description of how they were built.

    With the run's index: rephrase links (+ negatives, :func:`examples_from_rephrases`)
    scored with the serving retrieval (:class:`RunRetriever`), each rephrase's own success
    left out of its user's history. Without one: mined pairs (:func:`examples_from_run`)
    with :class:`FuzzyCatalogRetriever` (``top_k`` candidates).

    Raises:
        FileNotFoundError: a file the run needs is missing.
    """
    run_dir = Path(run_dir)
    if (run_dir / "index" / "index.json").exists():
        retriever = RunRetriever(run_dir, settings)
        examples = examples_from_rephrases(run_dir)
        retriever.leave_out(examples)
        groups = build_groups(examples, retriever)
        return groups, f"run:{run_dir} (rephrase links; DPR + FAISS + personal layer)"
    fuzzy = FuzzyCatalogRetriever(catalog_from_run(run_dir), top_k=top_k)
    groups = build_groups(examples_from_run(run_dir), fuzzy)
    return groups, f"run:{run_dir} (no index: fuzzy catalog retrieval, char-3gram stand-in)"
