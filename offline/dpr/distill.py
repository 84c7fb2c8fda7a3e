"""A shallower DPR query tower, distilled from a teacher artifact's query tower.

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
from tqdm.auto import tqdm

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
    PASSAGE_ONNX,
    QUERY_ONNX,
    QueryEncoder,
    load_fast_tokenizer,
    read_dpr_meta,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Student size and training budget.

    Attributes:
        layers: transformer layers of the student (the first ``layers`` of MiniLM; 1..5).
        epochs: passes over the training texts.
        batch_size: texts per step.
        lr: AdamW peak learning rate (linear warm-up 10%, linear decay).
        dev_fraction: texts held out to measure the student's cosine to the teacher.
        max_texts: cap on distinct training texts (most frequent first).
        seed: everything random.
        threads: torch intra-op threads.
        quantize_int8: also write ``query.int8.onnx`` when it keeps mean cosine >= 0.99.
    """

    layers: int = 2
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-4
    dev_fraction: float = 0.05
    max_texts: int = 60_000
    seed: int = 13
    threads: int = 2
    quantize_int8: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= 5:
            raise ValueError(f"layers must be 1..5 (got {self.layers})")


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
    """Train and export a ``config.layers``-layer query tower that imitates ``teacher``'s.

    Args:
        teacher: a DPR artifact folder (zero-shot or fine-tuned).
        texts: training utterances (duplicates are fine; the most frequent ``max_texts``
            distinct ones are used).
        out_root: where ``<content-hash>/`` goes.
        config: :class:`DistillConfig`.
        update_latest: point ``out_root/LATEST`` at the student.

    Returns:
        :class:`~offline.dpr.train.DprTrainResult`; ``meta["distill"]`` holds the dev cosine
        (mean, 1st percentile, min) of student vs teacher and the training time.

    Raises:
        FileNotFoundError: ``teacher`` is not a DPR artifact.
        ValueError: fewer than 100 distinct texts.
    """
    config = config or DistillConfig()
    tmeta = read_dpr_meta(teacher)
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
    max_length = int(tmeta.get("max_length", 32))
    t_enc = QueryEncoder.load(teacher, threads=config.threads, quantized=False, cache_size=0)
    target_train = t_enc.encode(train)  # (n, dim) float32, L2-normalised
    target_dev = t_enc.encode(dev)
    tok = load_fast_tokenizer(teacher, max_length)

    student = student_tower(config.layers)
    student.train()
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(max(1, total // 10), total))
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"distill {config.layers}-layer query tower", unit="step")
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
    cos = np.sum(embed(student, tok, dev) * target_dev, axis=1)

    tmp = _new_tmp(out)
    export_tower(student, tok, tmp / QUERY_ONNX)
    shutil.copy2(teacher / PASSAGE_ONNX, tmp / PASSAGE_ONNX)
    meta: dict[str, Any] = {
        key: tmeta[key] for key in ("name", "dim", "max_length", "base_model", "pooling")
    }
    meta.update(
        variant="distilled-query",
        zero_shot=False,
        encoder_id=out.name,
        code_version=code_version(),
        query_layers=config.layers,
        distilled_from=str(tmeta["encoder_id"]),
        teacher_variant=tmeta.get("variant", "fine-tuned"),
    )
    (tmp / DPR_META).write_text(json.dumps(meta))  # provisional: the encoders read it
    onnx_q = QueryEncoder.load(tmp, threads=config.threads, quantized=False, cache_size=0)
    onnx_cos = np.sum(onnx_q.encode(dev) * embed(student, tok, dev), axis=1)
    meta["distill"] = {
        "config": asdict(config),
        "train_texts": len(train),
        "dev_texts": len(dev),
        "dev_cosine_to_teacher": {
            "mean": round(float(cos.mean()), 4),
            "p1": round(float(np.percentile(cos, 1)), 4),
            "min": round(float(cos.min()), 4),
        },
        "onnx_min_cosine_to_torch": round(float(onnx_cos.min()), 6),
        "train_seconds": round(train_s, 1),
    }
    if config.quantize_int8:
        meta["int8"] = check_int8(tmp, list(dev[:256]) + list(PROBE_TEXTS), 0.99)
    meta["versions"] = _versions()
    if not _finish(tmp, out, meta):
        return DprTrainResult(out, True, read_dpr_meta(out))
    if update_latest:
        write_latest(out_root, out)
    log.info(
        "distilled %d-layer query tower: dev cosine to teacher mean %.4f (min %.4f) -> %s",
        config.layers,
        cos.mean(),
        cos.min(),
        out,
    )
    return DprTrainResult(out, False, meta, None)
