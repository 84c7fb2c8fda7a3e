"""A shallower or static DPR query tower, distilled from a teacher artifact's query tower.

The online path encodes one short utterance per request, and the 6-layer MiniLM query tower is
the largest share of its latency. A query tower may be smaller than the passage tower as long
as its vectors stay in the passage tower's space, so we keep the teacher's passage tower (and
therefore every index built with it) and train a student of the first ``layers`` MiniLM layers
to reproduce the teacher's query vectors (embedding distillation, as in Reimers & Gurevych,
"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", EMNLP 2020:
MSE between student and teacher vectors). Training texts are the utterances the job saw
(ASR output with its errors) plus the catalog; teacher targets come from the teacher's fp32
ONNX tower, so the teacher needs no torch weights.

The student artifact is a normal DPR artifact (``query.onnx``, ``query.int8.onnx``,
``passage.onnx`` copied from the teacher, tokenizer, ``dpr.json`` with ``query_layers``,
``distilled_from`` and the held-out cosine to the teacher); its ``encoder_id`` is new, so the
nightly job re-indexes with it and the service never mixes it with another index.

A **static** student (``DistillConfig(static=True)``, ``qrw train dpr --query-static``) has no
transformer at all: one vector per wordpiece, a query being the mean of its wordpieces' vectors
(:class:`rewrite.encoder.StaticEmbeddingBag`). The table starts as Model2Vec does (Tulkens &
van Dongen 2024: each token's vector is the teacher's embedding of ``[CLS] token [SEP]``; no
PCA, which would leave the passage tower's space) and is then trained with the same MSE on the
logged utterances (a torch ``EmbeddingBag`` with sparse gradients, ``SparseAdam``). The artifact
holds ``query.static.npy`` (``(vocab, 384) float16``) instead of ``query.onnx``;
``dpr.json`` says ``query_tower: static`` and records the dev cosine to the teacher before
training (the Model2Vec-style start) and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from offline.dpr.augment import noisy_query_pairs
from offline.dpr.train import (
    PROBE_TEXTS,
    BiEncoder,
    DprTrainResult,
    Tower,
    _finish,
    _new_tmp,
    _tokenize,
    _versions,
    check_int8,
    code_version,
    embed,
    export_tower,
    write_latest,
)
from offline.trainutil import linear_warmup_decay, seed_everything
from rewrite.encoder import (
    DPR_META,
    INPUT_NAMES,
    OUTPUT_NAME,
    PASSAGE_ONNX,
    QUERY_ONNX,
    QUERY_STATIC,
    STATIC_TOWER,
    QueryEncoder,
    load_fast_tokenizer,
    read_dpr_meta,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Student size and training budget.

    Attributes:
        layers: transformer layers of the student (the first ``layers`` of MiniLM; 1..5);
            ignored when ``static``.
        static: a static student (one trained vector per wordpiece, no transformer); use
            :meth:`for_static` for its training budget.
        epochs: passes over the training texts.
        batch_size: texts per step.
        lr: AdamW peak learning rate (linear warm-up 10%, linear decay).
        dev_fraction: texts held out to measure the student's cosine to the teacher.
        max_texts: cap on distinct training texts (most frequent first).
        noisy_copies: label-free noisy copies of every training text added as further
            training texts (:func:`offline.dpr.augment.noisy_query_pairs`: Metaphone or
            edit-distance word swaps, letter edits; the teacher's vector of the noisy copy is
            the target), so misrecognised words get trained rows too; dev texts get none.
        seed: everything random.
        threads: torch intra-op threads.
        quantize_int8: also write ``query.int8.onnx`` when it keeps mean cosine >= 0.99.
    """

    layers: int = 2
    static: bool = False
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-4
    dev_fraction: float = 0.05
    max_texts: int = 60_000
    noisy_copies: int = 0
    seed: int = 13
    threads: int = 2
    quantize_int8: bool = True

    def __post_init__(self) -> None:
        if not self.static and not 1 <= self.layers <= 5:
            raise ValueError(f"layers must be 1..5 (got {self.layers})")

    @staticmethod
    def for_static(**overrides: Any) -> DistillConfig:
        """The static student's budget: more epochs at a larger step size than a transformer
        student needs (each text updates only its own wordpieces' rows)."""
        values: dict[str, Any] = dict(
            static=True,
            layers=0,
            epochs=20,
            batch_size=128,
            lr=1e-2,
            noisy_copies=2,
            quantize_int8=False,
        )
        values.update(overrides)
        return DistillConfig(**values)


class StaticTower(nn.Module):
    """Torch twin of :class:`rewrite.encoder.StaticEmbeddingBag` for training: the
    mask-weighted mean of per-wordpiece rows, L2-normalised; ``(batch, dim)`` float32.

    Args:
        table: initial ``(vocab, dim)`` rows (e.g. :func:`teacher_token_vectors`).
    """

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        weights = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        self.bag = nn.EmbeddingBag.from_pretrained(weights, freeze=False, mode="sum", sparse=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        w = attention_mask.to(torch.float32)
        summed = self.bag(input_ids, per_sample_weights=w)
        return F.normalize(summed / w.sum(dim=1, keepdim=True).clamp_min(1.0), dim=1)

    def table(self) -> np.ndarray:
        """The trained rows, ``(vocab, dim)`` float32 (a copy)."""
        return self.bag.weight.detach().numpy().copy()


def teacher_token_vectors(teacher: QueryEncoder, batch_size: int = 512) -> np.ndarray:
    """Model2Vec's starting point: each wordpiece's vector is the teacher's embedding of the
    3-token text ``[CLS] piece [SEP]`` (L2-normalised), then centred — the mean over the
    vocabulary, a component every such text shares, is subtracted from every row and given to
    the ``[CLS]`` and ``[SEP]`` rows instead (Model2Vec centres with PCA); ``(vocab, dim)``
    float32. On held-out simulated utterances the mean of these rows has cosine 0.55 to the
    teacher's query vector (0.39 uncentred); training takes it to ~0.9.

    Args:
        teacher: an ONNX query tower (:class:`rewrite.encoder.QueryEncoder`, not static).
        batch_size: wordpieces per ONNX Runtime call.
    """
    tok = teacher.tokenizer
    vocab = int(tok.get_vocab_size())
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError("the teacher's tokenizer has no [CLS]/[SEP] tokens")
    out = np.empty((vocab, teacher.dim), dtype=np.float32)
    for start in range(0, vocab, batch_size):
        piece = np.arange(start, min(vocab, start + batch_size), dtype=np.int64)
        ids = np.stack([np.full_like(piece, cls_id), piece, np.full_like(piece, sep_id)], axis=1)
        feeds = dict(zip(INPUT_NAMES, (ids, np.ones_like(ids)), strict=True))
        (vecs,) = teacher.session.run([OUTPUT_NAME], feeds)
        vecs = np.asarray(vecs, dtype=np.float32)
        out[start : start + len(piece)] = vecs / np.maximum(
            np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12
        )
    common = out.mean(axis=0)
    out -= common
    out[[cls_id, sep_id]] = common
    return out


def student_tower(layers: int) -> Tower:
    """MiniLM's embeddings and first ``layers`` layers (weights copied, offline)."""
    full = BiEncoder.from_base().query
    bert = full.bert
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    return Tower(bert)


def distill_query_tower(
    teacher: Path,
    texts: Sequence[str],
    out_root: Path = Path("artifacts/dpr"),
    config: DistillConfig | None = None,
    update_latest: bool = True,
) -> DprTrainResult:
    """Train and export a ``config.layers``-layer (or static) query tower that imitates
    ``teacher``'s.

    Args:
        teacher: a DPR artifact folder (zero-shot or fine-tuned).
        texts: training utterances (duplicates are fine; the most frequent ``max_texts``
            distinct ones are used).
        out_root: where ``<content-hash>/`` goes.
        config: :class:`DistillConfig`.
        update_latest: point ``out_root/LATEST`` at the student.

    Returns:
        :class:`~offline.dpr.train.DprTrainResult`; ``meta["distill"]`` holds the dev cosine
        (mean, 1st percentile, min) of student vs teacher before and after training and the
        training time.

    Raises:
        FileNotFoundError: ``teacher`` is not a DPR artifact.
        ValueError: fewer than 100 distinct texts; a static teacher.
    """
    config = config or DistillConfig()
    tmeta = read_dpr_meta(teacher)
    if tmeta.get("query_tower") == STATIC_TOWER:
        raise ValueError(f"{teacher} has a static query tower; distil from a transformer one")
    counts: dict[str, int] = {}
    for t in texts:
        t = t.strip()
        if t:
            counts[t] = counts.get(t, 0) + 1
    distinct = sorted(counts, key=lambda t: (-counts[t], t))[: config.max_texts]
    if len(distinct) < 100:
        raise ValueError(f"need >= 100 distinct texts to distill (got {len(distinct)})")
    h = hashlib.sha256()
    h.update(f"distill {code_version()} teacher={tmeta['encoder_id']}".encode())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    h.update("\n".join(distinct).encode())
    out = Path(out_root) / h.hexdigest()[:16]
    if (out / DPR_META).exists():
        log.info("distilled DPR artifact exists: %s", out)
        if update_latest:
            write_latest(out_root, out)
        return DprTrainResult(out, True, read_dpr_meta(out))

    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(distinct))
    n_dev = max(50, int(len(distinct) * config.dev_fraction))
    dev = [distinct[i] for i in order[:n_dev]]
    train = [distinct[i] for i in order[n_dev:]]
    if config.noisy_copies:
        seen = set(distinct)
        noisy = noisy_query_pairs(train, config.noisy_copies, config.seed, exclude_queries=dev)
        train += sorted({p.query for p in noisy} - seen)
    t_enc = QueryEncoder.load(teacher, threads=config.threads, quantized=False, cache_size=0)
    target_train = t_enc.encode(train)  # (n, dim) float32, L2-normalised
    target_dev = t_enc.encode(dev)
    # the teacher's tokenizer, truncated to its max_length, padding batches (the tower's own
    # tokenizer pads nothing: rewrite.encoder.load_fast_tokenizer)
    tok = load_fast_tokenizer(teacher, int(t_enc.meta.get("max_length", 32)))

    t0 = time.perf_counter()
    student: nn.Module
    opt: torch.optim.Optimizer
    if config.static:
        student = StaticTower(teacher_token_vectors(t_enc))
        opt = torch.optim.SparseAdam(list(student.parameters()), lr=config.lr)
        kind = "static"
    else:
        student = student_tower(config.layers)
        opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.01)
        kind = f"{config.layers}-layer"
    init_s = time.perf_counter() - t0
    init_cos = np.sum(embed(student, tok, dev) * target_dev, axis=1)
    student.train()
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(max(1, total // 10), total))
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"distill {kind} query tower", unit="step")
    for _ in range(config.epochs):
        perm = rng.permutation(len(train))
        for s in range(steps_per_epoch):
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            ids, mask = _tokenize(tok, [train[i] for i in idx])
            pred = student(ids, mask)
            target = torch.from_numpy(target_train[idx])
            loss = ((pred - target) ** 2).sum(dim=1).mean()  # = 2 - 2 cos for unit vectors
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    train_s = time.perf_counter() - t0
    student.eval()
    student_dev = embed(student, tok, dev)
    cos = np.sum(student_dev * target_dev, axis=1)

    tmp = _new_tmp(out)
    if isinstance(student, StaticTower):
        np.save(tmp / QUERY_STATIC, student.table().astype(np.float16), allow_pickle=False)
    else:
        export_tower(student, tok, tmp / QUERY_ONNX)
    shutil.copy2(teacher / PASSAGE_ONNX, tmp / PASSAGE_ONNX)
    meta: dict[str, Any] = {
        key: tmeta[key] for key in ("name", "dim", "max_length", "base_model", "pooling")
    }
    meta.update(
        variant="static-query" if config.static else "distilled-query",
        zero_shot=False,
        encoder_id=out.name,
        code_version=code_version(),
        query_layers=0 if config.static else config.layers,
        distilled_from=str(tmeta["encoder_id"]),
        teacher_variant=tmeta.get("variant", "fine-tuned"),
    )
    if config.static:
        meta["query_tower"] = STATIC_TOWER
    (tmp / DPR_META).write_text(json.dumps(meta))  # provisional: the encoders read it
    onnx_q = QueryEncoder.load(tmp, threads=config.threads, quantized=False, cache_size=0)
    onnx_cos = np.sum(onnx_q.encode(dev) * student_dev, axis=1)
    meta["distill"] = {
        "config": asdict(config),
        "train_texts": len(train),
        "dev_texts": len(dev),
        "dev_cosine_to_teacher": _cosine_summary(cos),
        "dev_cosine_to_teacher_before_training": _cosine_summary(init_cos),
        # the served tower (ONNX graph, or the float16 static table) against the torch student
        "onnx_min_cosine_to_torch": round(float(onnx_cos.min()), 6),
        "init_seconds": round(init_s, 1),
        "train_seconds": round(train_s, 1),
    }
    if config.quantize_int8 and not config.static:
        meta["int8"] = check_int8(tmp, list(dev[:256]) + list(PROBE_TEXTS), 0.99)
    meta["versions"] = _versions()
    if not _finish(tmp, out, meta):
        return DprTrainResult(out, True, read_dpr_meta(out))
    if update_latest:
        write_latest(out_root, out)
    log.info(
        "distilled %s query tower: dev cosine to teacher mean %.4f (min %.4f) -> %s",
        kind,
        cos.mean(),
        cos.min(),
        out,
    )
    return DprTrainResult(out, False, meta, None)


def _cosine_summary(cos: np.ndarray) -> dict[str, float]:
    return {
        "mean": round(float(cos.mean()), 4),
        "p1": round(float(np.percentile(cos, 1)), 4),
        "min": round(float(cos.min()), 4),
    }
