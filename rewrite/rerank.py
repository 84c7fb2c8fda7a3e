"""Reranking of retrieved rewrite candidates and the trigger decision (online).

Per candidate the ranker sees fuzzy string similarity (rapidfuzz), a phonetic match
(Metaphone codes from jellyfish, compared with rapidfuzz), the dense cosine of the DPR
retrieval, catalog metadata (frequency, success rate, users), the user's personal history
(count, recency, layer) and the request context. A LightGBM lambdarank model (Burges,
"From RankNet to LambdaRank to LambdaMART", MSR-TR-2010-82; LightGBM, Ke et al., NeurIPS 2017)
trained by ``qrw train ranker`` (:mod:`offline.rerank_train`) orders them; without a trained
model a weighted dense + fuzzy :class:`HeuristicRanker` does. :func:`trigger` then decides
whether to rewrite at all: only when the best candidate clears a threshold chosen on dev for
precision at trigger >= 0.9, differs from the query, and the query does not already succeed
for this user (Ponnusamy et al., "Feedback-based self-learning in large-scale conversational
AI agents", AAAI 2020; Cho et al., "Personalized search-based query rewrite system for
conversational AI", 2021).

Artifacts (``artifacts/ranker/<content-hash>/``): ``ranker.txt`` (LightGBM text model),
``ranker.json`` (feature names, trigger threshold, Platt calibration, metrics, sha256) and the
same trees exported to ONNX (``ranker.onnx``, ``trigger.onnx``; onnxmltools at training time,
checked against LightGBM). The service scores with the ONNX files on ONNX Runtime's
``TreeEnsemble`` operators, so it never imports ``lightgbm`` (whose import pulls pandas,
scikit-learn and scipy: ~200 MB of resident memory, see the README's "Speed" section); an
older artifact without ONNX files falls back to LightGBM, imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rapidfuzz import fuzz, process
from rapidfuzz.distance import JaroWinkler

from rewrite.config import RerankSettings
from rewrite.encoder import onnx_session
from rewrite.normalize import normalize_utterance, phonetic_key
from rewrite.retrieval import RetrievedCandidate
from rewrite.types import ContextTurn

log = logging.getLogger(__name__)

RANKER_MODEL_FILE = "ranker.txt"
RANKER_META_FILE = "ranker.json"
TRIGGER_MODEL_FILE = "trigger.txt"
RANKER_ONNX_FILE = "ranker.onnx"
TRIGGER_ONNX_FILE = "trigger.onnx"
#: Input name of the exported tree models (``(n, F)`` float32).
ONNX_INPUT = "x"

#: Feature order of :func:`feature_matrix` columns and of the trained model (fixed; a model
#: whose stored names differ is refused by :meth:`Ranker.load`). Ranges:
#:
#: - ``token_set_ratio``, ``partial_ratio``, ``ratio``: rapidfuzz ``fuzz`` scores / 100, [0, 1]
#: - ``jaro_winkler``: rapidfuzz ``JaroWinkler.normalized_similarity``, [0, 1]
#: - ``phonetic_ratio``: ``fuzz.ratio`` of the Metaphone keys / 100, [0, 1]
#: - ``phonetic_equal``: 1.0 when the Metaphone keys are equal, {0, 1}
#: - ``dense_cosine``: the retrieval cosine, [-1, 1]
#: - ``log_frequency``: ``log1p(frequency)``, >= 0
#: - ``success_rate``: catalog success rate, [0, 1]
#: - ``log_n_users``: ``log1p(n_users)``, >= 0
#: - ``log_personal_count``: ``log1p(personal_count)``, >= 0
#: - ``has_personal``: 1.0 when the user succeeded with the candidate before, {0, 1}
#: - ``personal_log_age_s``: ``log1p(seconds since the user's last success)``, >= 0; -1 unknown
#: - ``is_personal``: 1.0 when the candidate came from the personal layer, {0, 1}
#: - ``len_diff_words``: candidate words minus query words, clipped to [-20, 20]
#: - ``query_in_context``: 1.0 when the user said the query in an earlier turn, {0, 1}
#: - ``context_max_ratio``: max ``token_set_ratio`` / 100 of candidate vs context turns, [0, 1]
#: - ``identical_to_query``: 1.0 when the candidate equals the normalized query, {0, 1}
#: - ``device_share``: share of the candidate's catalog turns (over its recorded device types)
#:   said on the request's device type, [0, 1]; -1 when the request names no device type or
#:   the catalog has no device types for the candidate
#: - ``device_success_rate``: the candidate's success rate on the request's device type,
#:   smoothed towards its overall ``success_rate`` with :data:`DEVICE_PRIOR_TURNS` pseudo-turns,
#:   [0, 1]; the overall ``success_rate`` when unknown (as above)
#:
#: A model trained on fewer features (an older artifact, e.g. before the device-type pair) is
#: served on the columns it knows (:meth:`Ranker.load`).
FEATURE_NAMES: tuple[str, ...] = (
    "token_set_ratio",
    "partial_ratio",
    "ratio",
    "jaro_winkler",
    "phonetic_ratio",
    "phonetic_equal",
    "dense_cosine",
    "log_frequency",
    "success_rate",
    "log_n_users",
    "log_personal_count",
    "has_personal",
    "personal_log_age_s",
    "is_personal",
    "len_diff_words",
    "query_in_context",
    "context_max_ratio",
    "identical_to_query",
    "device_share",
    "device_success_rate",
)
N_FEATURES = len(FEATURE_NAMES)
#: Features of the trigger model: the top candidate's :data:`FEATURE_NAMES`, its ranker score
#: and the margin to the second score (``MAX_MARGIN`` when alone). Not the number of
#: candidates: it only says whether the user has a history (global top-k plus personal
#: top-k), which the training negatives once correlated with the label.
TRIGGER_FEATURE_NAMES: tuple[str, ...] = (
    *(f"top1_{n}" for n in FEATURE_NAMES),
    "top1_score",
    "score_margin",
)
MAX_MARGIN = 10.0
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
MAX_LEN_DIFF_WORDS = 20.0
#: The three rapidfuzz ``fuzz`` columns (adjacent), scaled from [0, 100] to [0, 1] in place.
_RATIO_SLICE = slice(_COL["token_set_ratio"], _COL["ratio"] + 1)
#: Pseudo-turns at the overall success rate added to a device type's own turns
#: (``device_success_rate``): one or two turns on a device type say little.
DEVICE_PRIOR_TURNS = 2.0


def _device_features(cand: RetrievedCandidate, device_type: str) -> tuple[float, float]:
    """``(device_share, device_success_rate)`` of one candidate (see :data:`FEATURE_NAMES`)."""
    stats = cand.device_types
    if not device_type or not stats:
        return -1.0, float(cand.success_rate)
    total = sum(max(d.turns, 0) for d in stats)
    mine = next((d for d in stats if d.device_type == device_type), None)
    turns = max(mine.turns, 0) if mine else 0
    ok = min(max(mine.successes, 0), turns) if mine else 0
    share = turns / total if total else 0.0
    rate = (ok + DEVICE_PRIOR_TURNS * cand.success_rate) / (turns + DEVICE_PRIOR_TURNS)
    return share, rate


def _context_utterances(context: Sequence[ContextTurn]) -> list[str]:
    return [u for u in (normalize_utterance(t.utterance) for t in context) if u]


#: One request's reranking input for :func:`feature_matrices`: ``(query, candidates, context,
#: device_type)``, as :func:`feature_matrix` takes them.
FeatureRequest = tuple[str, Sequence[RetrievedCandidate], Sequence[ContextTurn], str]


class DeviceTypeCatalog(Protocol):
    """Where candidates with a ``catalog_row`` keep their device-type counts
    (:class:`rewrite.retrieval.GlobalIndex`)."""

    def device_features(
        self, rows: np.ndarray, success_rates: np.ndarray, device_types: Sequence[str]
    ) -> np.ndarray:
        """``(n, 2)`` float64 ``(device_share, device_success_rate)`` of catalog rows, each
        for the device type of its request."""
        ...


def feature_matrices(
    requests: Sequence[FeatureRequest],
    catalogs: Sequence[DeviceTypeCatalog | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of the candidates of several requests in one vectorised pass: one rapidfuzz
    ``cpdist`` call per string measure over every (query, candidate) pair of the batch (the
    per-call overhead dominates at ~10-20 candidates a request), plus one ``cdist`` per
    request that has context turns.

    Args:
        requests: per request ``(query, cands, context, device_type)``: the normalized query
            (:func:`rewrite.normalize.normalize_utterance`), its retrieved candidates (texts
            normalized), earlier turns of the session (normalized here), the normalized device
            type (:func:`rewrite.normalize.normalize_device_type`, ``""`` unknown).
        catalogs: per request, the index its candidates came from: a candidate with a
            ``catalog_row`` and no ``device_types`` tuple gets its device-type features from
            there (:meth:`rewrite.retrieval.GlobalIndex.device_features`, the same values);
            None = every candidate's own ``device_types``.

    Returns:
        ``(x, offsets)``: ``x`` ``(sum of len(cands), len(FEATURE_NAMES))`` float32, columns
        in :data:`FEATURE_NAMES` order, all finite, request ``j``'s rows at
        ``x[offsets[j]:offsets[j + 1]]``; ``offsets`` ``(len(requests) + 1,)`` int64.
    """
    sizes = [len(cands) for _q, cands, _c, _d in requests]
    offsets = np.zeros(len(requests) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    n = int(offsets[-1])
    x = np.zeros((n, N_FEATURES), dtype=np.float32)
    if n == 0:
        return x, offsets
    cands = [c for _q, cs, _c, _d in requests for c in cs]
    texts = [c.text for c in cands]
    queries = [q for q, cs, _c, _d in requests for _ in cs]  # the query of every pair
    x[:, _COL["token_set_ratio"]] = process.cpdist(queries, texts, scorer=fuzz.token_set_ratio)
    x[:, _COL["partial_ratio"]] = process.cpdist(queries, texts, scorer=fuzz.partial_ratio)
    x[:, _COL["ratio"]] = process.cpdist(queries, texts, scorer=fuzz.ratio)
    x[:, _RATIO_SLICE] /= 100.0
    x[:, _COL["jaro_winkler"]] = process.cpdist(
        queries, texts, scorer=JaroWinkler.normalized_similarity
    )
    qkeys = {q: phonetic_key(q) for q, _cs, _c, _d in requests}
    pair_qkeys = [qkeys[q] for q in queries]
    ckeys = [phonetic_key(t) for t in texts]
    x[:, _COL["phonetic_ratio"]] = process.cpdist(pair_qkeys, ckeys, scorer=fuzz.ratio) / 100.0
    # the per-candidate numbers in one pass over the candidates (one list and one array,
    # not a list and an assignment per column), then a vectorised transform per column
    n_words = {q: len(q.split()) for q in qkeys}
    per = np.array(
        [
            (
                c.dense_score,
                c.frequency,
                c.success_rate,
                c.n_users,
                c.personal_count,
                c.personal_age_s,
                c.layer == "personal",
                len(t.split()) - n_words[q],
                t == q,
                k == qk,
            )
            for c, t, q, k, qk in zip(cands, texts, queries, ckeys, pair_qkeys, strict=True)
        ],
        dtype=np.float64,
    )
    x[:, _COL["dense_cosine"]] = per[:, 0]
    x[:, _COL["log_frequency"]] = np.log1p(np.maximum(per[:, 1], 0.0))
    x[:, _COL["success_rate"]] = per[:, 2]
    x[:, _COL["log_n_users"]] = np.log1p(np.maximum(per[:, 3], 0.0))
    x[:, _COL["log_personal_count"]] = np.log1p(np.maximum(per[:, 4], 0.0))
    x[:, _COL["has_personal"]] = per[:, 4] > 0
    age = per[:, 5]
    x[:, _COL["personal_log_age_s"]] = np.where(age >= 0, np.log1p(np.maximum(age, 0.0)), -1.0)
    x[:, _COL["is_personal"]] = per[:, 6]
    x[:, _COL["len_diff_words"]] = np.clip(per[:, 7], -MAX_LEN_DIFF_WORDS, MAX_LEN_DIFF_WORDS)
    x[:, _COL["identical_to_query"]] = per[:, 8]
    x[:, _COL["phonetic_equal"]] = per[:, 9]
    device_cols = np.asarray([_COL["device_share"], _COL["device_success_rate"]])
    # candidates whose device-type counts stay in an index: one call per index for the batch
    by_catalog: dict[int, tuple[DeviceTypeCatalog, list[int], list[str]]] = {}
    for j, (_q, cs, _c, device_type) in enumerate(requests):
        lo = int(offsets[j])
        catalog = catalogs[j] if catalogs is not None else None
        for i, c in enumerate(cs):
            if catalog is not None and c.catalog_row >= 0 and not c.device_types:
                entry = by_catalog.setdefault(id(catalog), (catalog, [], []))
                entry[1].append(lo + i)
                entry[2].append(device_type)
            else:
                x[lo + i, device_cols] = _device_features(c, device_type)
    for catalog, at, device_types in by_catalog.values():
        x[np.ix_(np.asarray(at), device_cols)] = catalog.device_features(
            np.asarray([cands[i].catalog_row for i in at]),
            np.asarray([cands[i].success_rate for i in at]),
            device_types,
        )
    for j, (query, _cs, context, _d) in enumerate(requests):
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        ctx = _context_utterances(context) if context and hi > lo else []
        if ctx:
            x[lo:hi, _COL["query_in_context"]] = float(query in ctx)
            sims = process.cdist(texts[lo:hi], ctx, scorer=fuzz.token_set_ratio)
            x[lo:hi, _COL["context_max_ratio"]] = sims.max(axis=1) / 100.0
    # Defensive: metadata from storage could hold NaN/inf; the model needs finite inputs.
    if not np.isfinite(x).all():
        np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return x, offsets


def feature_matrix(
    query: str,
    cands: Sequence[RetrievedCandidate],
    now_s: float,
    context: Sequence[ContextTurn] = (),
    device_type: str = "",
) -> np.ndarray:
    """Features of all candidates of one request (:func:`feature_matrices` of one request).

    Args:
        query: the normalized query (:func:`rewrite.normalize.normalize_utterance`).
        cands: retrieved candidates (texts normalized).
        now_s: request time, epoch seconds. Recency comes precomputed in
            ``cand.personal_age_s``; ``now_s`` is part of the signature for time features.
        context: earlier turns of the session (utterances normalized here).
        device_type: the request's normalized device type
            (:func:`rewrite.normalize.normalize_device_type`), ``""`` unknown.

    Returns:
        ``(len(cands), len(FEATURE_NAMES))`` float32, columns in :data:`FEATURE_NAMES` order,
        all finite.
    """
    del now_s  # recency is precomputed per candidate (personal_age_s)
    return feature_matrices([(query, cands, context, device_type)])[0]


def candidate_features(
    query: str,
    cand: RetrievedCandidate,
    now_s: float,
    context: Sequence[ContextTurn] = (),
    device_type: str = "",
) -> dict[str, float]:
    """Features of one candidate by name (the row :func:`feature_matrix` computes; for
    ``explain`` responses and tests). Ranges are documented at :data:`FEATURE_NAMES`."""
    row = feature_matrix(query, [cand], now_s, context, device_type)[0]
    return {name: float(v) for name, v in zip(FEATURE_NAMES, row, strict=True)}


class CandidateRanker(Protocol):
    """What the rerank stage needs: :class:`Ranker` or :class:`HeuristicRanker`."""

    name: str
    model_version: str
    trigger_threshold: float

    def score(
        self,
        query: str,
        cands: Sequence[RetrievedCandidate],
        now_s: float,
        context: Sequence[ContextTurn] = (),
        device_type: str = "",
    ) -> np.ndarray:
        """``(n,)`` float64 scores, higher is better."""

    def score_matrix(self, x: np.ndarray) -> np.ndarray:
        """Scores of a precomputed ``(n, F)`` feature matrix."""

    def decision_score(self, x_top: np.ndarray, sorted_scores: np.ndarray) -> float:
        """What the trigger compares with ``trigger_threshold`` (``x_top`` ``(F,)``,
        ``sorted_scores`` ``(n,)`` best first)."""

    def decision_scores(
        self, x_tops: np.ndarray, sorted_scores: Sequence[np.ndarray]
    ) -> np.ndarray:
        """:meth:`decision_score` of several requests at once (``x_tops`` ``(b, F)``, one
        ``sorted_scores`` array per request) → ``(b,)`` float64."""

    def confidence(self, score: float) -> float:
        """A decision score mapped to [0, 1] (response ``confidence``)."""


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def trigger_features(x_top: np.ndarray, sorted_scores: np.ndarray) -> np.ndarray:
    """Trigger-model input for one request.

    Args:
        x_top: ``(F,)`` features of the top-ranked candidate (:func:`feature_matrix` row).
        sorted_scores: ``(n,)`` ranker scores, best first (n >= 1).

    Returns:
        ``(1, len(TRIGGER_FEATURE_NAMES))`` float32.
    """
    n = len(sorted_scores)
    margin = float(sorted_scores[0] - sorted_scores[1]) if n > 1 else MAX_MARGIN
    extra = np.array([sorted_scores[0], min(margin, MAX_MARGIN)], dtype=np.float32)
    return np.concatenate([np.asarray(x_top, dtype=np.float32), extra])[None, :]


class _FeatureRanker:
    """:meth:`score` = :meth:`score_matrix` of :func:`feature_matrix` (shared by both rankers)."""

    def score_matrix(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(
        self,
        query: str,
        cands: Sequence[RetrievedCandidate],
        now_s: float,
        context: Sequence[ContextTurn] = (),
        device_type: str = "",
    ) -> np.ndarray:
        """``(len(cands),)`` float64 scores (higher better; same scale as
        ``trigger_threshold``)."""
        return self.score_matrix(feature_matrix(query, cands, now_s, context, device_type))

    def decision_score(self, x_top: np.ndarray, sorted_scores: np.ndarray) -> float:
        """The number :func:`trigger` compares with ``trigger_threshold`` for one request
        (:meth:`decision_scores` of one)."""
        return float(self.decision_scores(np.asarray(x_top)[None, :], [sorted_scores])[0])

    def decision_scores(
        self, x_tops: np.ndarray, sorted_scores: Sequence[np.ndarray]
    ) -> np.ndarray:
        """The numbers :func:`trigger` compares with ``trigger_threshold``, one per request:
        here each request's top ranker score (:class:`Ranker` with a trigger model overrides
        it). ``x_tops`` ``(b, F)``; ``sorted_scores``: ``b`` arrays, best first → ``(b,)``
        float64."""
        del x_tops
        return np.asarray([float(s[0]) for s in sorted_scores], dtype=np.float64)


class TreeScorer(Protocol):
    """A fitted tree ensemble: ``predict((n, F) float32) -> (n,) float64``."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores of the rows of ``x``."""
        ...


class OnnxTreeScorer:
    """LightGBM trees exported to ONNX (:func:`offline.rerank_train.export_trees_onnx`, by
    onnxmltools) run on ONNX Runtime's ``ai.onnx.ml.TreeEnsemble*`` operators (one intra-op
    thread by default: the service's worker threads provide the parallelism).

    Args:
        model: the ``.onnx`` file's bytes; input ``x`` ``(n, F)`` float32.
        output: ``"score"`` (regression-style raw score, lambdarank) or ``"probability"``
            (binary classifier: column 1 of its ``probabilities`` output).
        num_threads: ONNX Runtime intra-op threads.

    Raises:
        onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf / Fail: not a valid model.
    """

    def __init__(self, model: bytes, output: str = "score", num_threads: int = 1) -> None:
        # warnings off (onnx_session): the classifier's unused `label` output warns on shape
        self._sess = onnx_session(model, num_threads)
        names = [o.name for o in self._sess.get_outputs()]
        if output == "probability":
            if "probabilities" not in names:
                raise ValueError(f"ONNX trigger model has no `probabilities` output ({names})")
            self._out, self._col = "probabilities", 1
        else:
            self._out, self._col = names[0], 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``(n, F)`` float32 → ``(n,)`` float64 (raw score or P(class 1))."""
        out = self._sess.run([self._out], {ONNX_INPUT: np.ascontiguousarray(x, np.float32)})[0]
        return np.asarray(out, dtype=np.float64).reshape(len(x), -1)[:, self._col]


class LightgbmTreeScorer:
    """The LightGBM text model itself (``lightgbm.Booster``, imported on first use): the
    fallback for artifacts trained before the ONNX export, and the reference
    :func:`offline.rerank_train.export_trees_onnx` checks the export against."""

    def __init__(self, model_str: str, num_threads: int = 1) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_str=model_str)
        self.num_threads = num_threads

    def num_feature(self) -> int:
        """Input width of the model."""
        return int(self.booster.num_feature())

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``(n, F)`` float32 → ``(n,)`` float64 (``Booster.predict``)."""
        out = self.booster.predict(x, num_threads=self.num_threads)
        return np.asarray(out, dtype=np.float64)


def _columns(names: Sequence[str], known: Sequence[str], what: str) -> np.ndarray | None:
    """Column indices of ``names`` in ``known`` (None when they are all of ``known``, in
    order: no selection needed).

    Raises:
        ValueError: ``names`` is empty, has a name not in ``known``, or is out of order.
    """
    if tuple(names) == tuple(known):
        return None
    pos = {n: i for i, n in enumerate(known)}
    unknown = [n for n in names if n not in pos]
    if not names or unknown:
        raise ValueError(f"{what} features {unknown or '[]'} unknown to this code")
    cols = np.array([pos[n] for n in names], dtype=np.intp)
    if np.any(np.diff(cols) <= 0):
        raise ValueError(f"{what} features are not in this code's order")
    return cols


def _checked_bytes(path: Path, sha256: str | None) -> bytes:
    """The file's bytes; ``ValueError`` when a recorded sha256 differs (corrupt file)."""
    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 mismatch (corrupt?)")
    return data


class Ranker(_FeatureRanker):
    """LightGBM lambdarank trees over :data:`FEATURE_NAMES` plus the trigger decision.

    Lambdarank scores order the candidates of one request but are not comparable across
    requests (the loss only sees pairs within a group), so an artifact may carry a second model,
    the **trigger model** (``trigger.txt``, LightGBM binary over
    :data:`TRIGGER_FEATURE_NAMES`): the probability that the top candidate is a correct
    rewrite, trained on held-out queries that include utterances which need no rewrite. With it,
    ``trigger_threshold`` is on that probability scale; without it, on the raw top score.
    Build with :meth:`load`; the trees run on ONNX Runtime (:class:`OnnxTreeScorer`) when
    the artifact has the ONNX export, else on LightGBM. ``model_version`` is the artifact's
    content hash.

    Attributes:
        scorer / trigger_scorer: the ranking and trigger trees (:class:`TreeScorer`).
        feature_names: the model's input columns (:data:`FEATURE_NAMES`, or a subset of it in
            the same order for an artifact trained before features were added).
        backend: ``"onnxruntime"`` or ``"lightgbm"``.
        trigger_threshold: threshold of :func:`trigger` (from ``ranker.json`` unless
            overridden).
        meta: the whole ``ranker.json``.
    """

    name = "lightgbm_lambdarank"

    def __init__(
        self,
        scorer: TreeScorer,
        meta: dict[str, Any],
        trigger_threshold: float | None = None,
        trigger_scorer: TreeScorer | None = None,
        backend: str = "onnxruntime",
    ) -> None:
        self.scorer = scorer
        names = tuple(meta.get("feature_names") or FEATURE_NAMES)
        self.feature_names = names
        self._cols = _columns(names, FEATURE_NAMES, "ranker")
        tmeta = meta.get("trigger_model") or {}
        tnames = tuple(tmeta.get("feature_names") or TRIGGER_FEATURE_NAMES)
        self._trigger_cols = _columns(tnames, TRIGGER_FEATURE_NAMES, "trigger")
        self.trigger_scorer = trigger_scorer
        self.backend = backend
        self.meta = meta
        self.model_version = str(meta.get("content_hash", ""))
        self.trigger_threshold = float(
            meta["trigger_threshold"] if trigger_threshold is None else trigger_threshold
        )
        platt = meta.get("calibration") or {}
        self._platt_a = float(platt.get("a", 1.0))
        self._platt_b = float(platt.get("b", -self.trigger_threshold))

    @classmethod
    def load(
        cls,
        artifact_dir: Path,
        trigger_threshold: float | None = None,
        num_threads: int = 1,
        backend: str = "auto",
    ) -> Ranker:
        """Load an artifact directory (``ranker.json`` + ``ranker.txt`` [+ ``trigger.txt``]
        [+ their ``.onnx`` exports]).

        Args:
            artifact_dir: ``artifacts/ranker/<content-hash>``.
            trigger_threshold: override of the stored threshold (settings).
            num_threads: prediction threads (1 online).
            backend: ``"auto"`` (ONNX Runtime when the artifact has the export, else
                LightGBM), ``"onnxruntime"`` or ``"lightgbm"``.

        Raises:
            FileNotFoundError: a file is missing (or ``backend="onnxruntime"`` without export).
            ValueError: a file's sha256 differs from the meta, or a stored feature name is
                not one of :data:`FEATURE_NAMES` / :data:`TRIGGER_FEATURE_NAMES` in the same
                order (trained by other code). A model on a subset of them (trained before a
                feature was added) is served on those columns.
        """
        artifact_dir = Path(artifact_dir)
        meta = json.loads((artifact_dir / RANKER_META_FILE).read_text())
        model_bytes = _checked_bytes(artifact_dir / RANKER_MODEL_FILE, meta.get("model_sha256"))
        names = tuple(meta.get("feature_names", ()))
        try:
            _columns(names, FEATURE_NAMES, "ranker")
        except ValueError as err:
            raise ValueError(f"{artifact_dir}: {err}; retrain with `qrw train ranker`") from None
        if names != FEATURE_NAMES:
            log.warning(
                "ranker %s was trained on %d of this code's %d features (missing: %s); "
                "retrain with `qrw train ranker` to use them",
                meta.get("content_hash"),
                len(names),
                N_FEATURES,
                ", ".join(n for n in FEATURE_NAMES if n not in names),
            )
        tmeta = meta.get("trigger_model")
        tbytes: bytes | None = None
        if tmeta:
            try:
                _columns(tuple(tmeta.get("feature_names", ())), TRIGGER_FEATURE_NAMES, "trigger")
            except ValueError as err:
                raise ValueError(f"{artifact_dir}: {err}") from None
            tbytes = _checked_bytes(artifact_dir / TRIGGER_MODEL_FILE, tmeta.get("sha256"))
        onnx_meta = meta.get("onnx") or {}
        if backend == "onnxruntime" and not onnx_meta:
            raise FileNotFoundError(f"{artifact_dir}: no ONNX export (retrain the ranker)")
        scorer: TreeScorer
        trig: TreeScorer | None = None
        if onnx_meta and backend != "lightgbm":
            used = "onnxruntime"
            rbytes = _checked_bytes(artifact_dir / RANKER_ONNX_FILE, onnx_meta["ranker_sha256"])
            scorer = OnnxTreeScorer(rbytes, "score", num_threads)
            if tbytes is not None:
                obytes = _checked_bytes(
                    artifact_dir / TRIGGER_ONNX_FILE, onnx_meta["trigger_sha256"]
                )
                trig = OnnxTreeScorer(obytes, "probability", num_threads)
        else:
            used = "lightgbm"
            lgbm = LightgbmTreeScorer(model_bytes.decode("utf-8"), num_threads)
            if lgbm.num_feature() != len(names):
                raise ValueError(f"{artifact_dir}: model has {lgbm.num_feature()} features")
            scorer = lgbm
            if tbytes is not None:
                trig = LightgbmTreeScorer(tbytes.decode("utf-8"), num_threads)
            if backend == "auto":
                log.warning(
                    "ranker %s has no ONNX export; scoring with LightGBM (retrain to export)",
                    meta.get("content_hash"),
                )
        log.info("ranker %s loaded from %s (%s)", meta.get("content_hash"), artifact_dir, used)
        return cls(scorer, meta, trigger_threshold, trig, used)

    def score_matrix(self, x: np.ndarray) -> np.ndarray:
        """Raw lambdarank scores of an ``(n, F)`` float32 feature matrix → ``(n,)`` float64."""
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        return self.scorer.predict(x if self._cols is None else x[:, self._cols])

    def decision_scores(
        self, x_tops: np.ndarray, sorted_scores: Sequence[np.ndarray]
    ) -> np.ndarray:
        """Per request, the trigger model's probability that the top candidate is correct
        (one model call for the batch), or the top ranker score when the artifact has no
        trigger model. ``x_tops`` ``(b, F)``; ``sorted_scores``: ``b`` arrays, best first →
        ``(b,)`` float64."""
        if self.trigger_scorer is None:
            return super().decision_scores(x_tops, sorted_scores)
        feats = np.concatenate(
            [trigger_features(x, s) for x, s in zip(x_tops, sorted_scores, strict=True)]
        )
        if self._trigger_cols is not None:
            feats = feats[:, self._trigger_cols]
        return np.asarray(self.trigger_scorer.predict(feats), dtype=np.float64)

    def confidence(self, score: float) -> float:
        """The trigger model's probability (``score`` is one), else the Platt-calibrated
        probability (fitted on dev) that the top candidate is correct."""
        if self.trigger_scorer is not None:
            return min(max(score, 0.0), 1.0)
        return _sigmoid(self._platt_a * score + self._platt_b)


#: Weights of :class:`HeuristicRanker` (dense cosine, rapidfuzz ``ratio`` / 100).
HEURISTIC_WEIGHTS = {"dense_cosine": 0.6, "ratio": 0.4, "has_personal": 0.1}


class HeuristicRanker(_FeatureRanker):
    """Fallback without a trained model: ``0.6 * dense_cosine + 0.4 * ratio / 100 + 0.1 *
    has_personal`` (the user's own past success breaks near-ties with the global layer).

    Same interface as :class:`Ranker`; scores lie in [-0.6, 1.1]; threshold from settings
    (``rerank.heuristic_threshold`` unless ``rerank.trigger_threshold`` is set).
    """

    name = "heuristic"
    model_version = "heuristic"

    def __init__(self, trigger_threshold: float = 0.8) -> None:
        self.trigger_threshold = float(trigger_threshold)
        self._w = np.zeros(N_FEATURES, dtype=np.float64)
        for feat, w in HEURISTIC_WEIGHTS.items():
            self._w[_COL[feat]] = w

    def score_matrix(self, x: np.ndarray) -> np.ndarray:
        """Weighted sum of two columns of an ``(n, F)`` feature matrix → ``(n,)`` float64."""
        return np.asarray(x, dtype=np.float64) @ self._w

    def confidence(self, score: float) -> float:
        """The score clipped to [0, 1]."""
        return min(max(score, 0.0), 1.0)


def resolve_ranker_artifact(settings: RerankSettings) -> Path | None:
    """``rerank.artifact``, or the dir ``artifacts_dir/LATEST`` names; None when untrained."""
    if settings.artifact is not None:
        return Path(settings.artifact)
    latest = Path(settings.artifacts_dir) / "LATEST"
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    return Path(settings.artifacts_dir) / name if name else None


def load_ranker(settings: RerankSettings, num_threads: int = 1) -> Ranker | HeuristicRanker:
    """The trained ranker the settings point at, else the :class:`HeuristicRanker` (logged).

    Raises:
        FileNotFoundError / ValueError: ``rerank.artifact`` is set explicitly but missing or
            invalid (an explicit choice is never silently replaced).
    """
    path = resolve_ranker_artifact(settings)
    if path is None or (settings.artifact is None and not (path / RANKER_META_FILE).exists()):
        log.warning(
            "no trained ranker under %s (run `qrw train ranker`); using the heuristic ranker",
            settings.artifacts_dir,
        )
        threshold = settings.trigger_threshold
        return HeuristicRanker(settings.heuristic_threshold if threshold is None else threshold)
    return Ranker.load(path, trigger_threshold=settings.trigger_threshold, num_threads=num_threads)


@dataclass(frozen=True)
class TriggerDecision:
    """Whether to rewrite, and why.

    Attributes:
        rewrite: True = hand the best candidate to NLU instead of the query.
        reason: ``"triggered"``, ``"no_candidates"``, ``"already_succeeds"``,
            ``"succeeds_globally"``, ``"same_as_query"`` or ``"below_threshold"``.
    """

    rewrite: bool
    reason: str


def succeeds_for_user(user_success_count: int, min_success_count: int = 1) -> bool:
    """Whether a query already succeeds for this user: its successful uses in the user's
    personal history reach ``min_success_count`` (``catalog.personal_min_count``; at least 1).
    The ``already_succeeds`` rule of :func:`trigger` and of the catalog gate
    (:class:`rewrite.online.CatalogGateStage`)."""
    return user_success_count >= max(min_success_count, 1)


def trigger(
    query: str,
    best_text: str | None,
    best_score: float,
    threshold: float,
    user_success_count: int,
    min_success_count: int = 1,
    query_in_catalog: bool = False,
) -> TriggerDecision:
    """The trigger decision for the top-ranked candidate.

    Checked in this order: no candidate → ``no_candidates``; the query already succeeds for
    this user (``user_success_count >= min_success_count``, i.e. the normalized query is in the
    user's personal history; ``catalog.personal_min_count``) → ``already_succeeds``; the query
    is itself a global catalog entry, i.e. it historically succeeds for many users
    (``query_in_catalog``) → ``succeeds_globally`` (a working request is never rewritten into
    another wording: on DSTC2 such rewrites, "what's the phone number" → "phone number", were
    the online layer's losses); the best candidate is the query itself → ``same_as_query``;
    ``best_score < threshold`` (or NaN) → ``below_threshold``; else rewrite (``triggered``).

    Args:
        query: normalized query.
        best_text: text of the top-ranked candidate, None when there is none.
        best_score: its ranker score (same scale as ``threshold``).
        threshold: the ranker's trigger threshold.
        user_success_count: the user's successful uses of the query itself (0 unknown).
        min_success_count: count from which the query counts as succeeding (>= 1).
        query_in_catalog: the normalized query is an entry of the global catalog.
    """
    if best_text is None:
        return TriggerDecision(False, "no_candidates")
    if succeeds_for_user(user_success_count, min_success_count):
        return TriggerDecision(False, "already_succeeds")
    if query_in_catalog:
        return TriggerDecision(False, "succeeds_globally")
    if best_text == query:
        return TriggerDecision(False, "same_as_query")
    if not best_score >= threshold:  # also catches NaN
        return TriggerDecision(False, "below_threshold")
    return TriggerDecision(True, "triggered")
