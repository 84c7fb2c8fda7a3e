"""Batch inference of the span rephrase detector on ONNX Runtime (int8 or fp32) or torch.

:meth:`SpanDetector.load` reads an artifact written by
:func:`offline.detector.train.train_span_detector`. :meth:`SpanDetector.predict` renders the
examples with the artifact's :class:`~offline.detector.span_model.Renderer` (the same code as
training), sorts them by token length, runs batches with dynamic padding, decodes spans with
:func:`~offline.detector.span_model.decode` and restores the input order. Throughput is
measured in **candidate pairs per second**: a candidate pair is one (context turn, current
turn) the model scores, so an example with three context turns counts three.

ONNX Runtime sessions use ``intra_op_num_threads`` (default 2) and a single inter-op thread;
the int8 graph is the dynamically quantized one (onnxruntime docs, "Quantize ONNX models").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offline.detector.examples import NO_REPHRASE, DetectorExample, Prediction
from offline.detector.render import (
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    FastWordpiece,
    RenderConfig,
    Rendered,
    Renderer,
    decode,
    pad_batch,
)

log = logging.getLogger(__name__)

BACKENDS = ("onnx-int8", "onnx", "torch")
ONNX_FILES = {"onnx-int8": "model.int8.onnx", "onnx": "model.onnx"}
TRAIN_COMMAND = "qrw train detector"

Runner = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
"""Padded batch (see :func:`~offline.detector.span_model.pad_batch`) -> (start, end) logits,
each ``(batch, seq) float32``."""


def span_metrics(
    examples: Sequence[DetectorExample], predictions: Sequence[Prediction]
) -> dict[str, float]:
    """Label accuracy, exact-span accuracy and rephrase-pair precision / recall / F1.

    Same definitions as :mod:`offline.detector.metrics`: a predicted pair is correct when its
    label equals the gold label (not -1); exact-span accuracy counts an example right when
    both say -1, or the labels match and the predicted span is exactly that utterance.

    Raises:
        ValueError: lengths differ.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    n = len(examples)
    gold = sum(ex.label != NO_REPHRASE for ex in examples)
    predicted = sum(p.label != NO_REPHRASE for p in predictions)
    same = exact = correct = 0
    for ex, p in zip(examples, predictions, strict=True):
        if p.label == ex.label:
            same += 1
            correct += p.label != NO_REPHRASE
            exact += p.label == NO_REPHRASE or p.exact_span
    prec = correct / predicted if predicted else 0.0
    rec = correct / gold if gold else 0.0
    return {
        "label_accuracy": same / n if n else 0.0,
        "exact_span_accuracy": exact / n if n else 0.0,
        "pair_precision": prec,
        "pair_recall": rec,
        "pair_f1": 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0,
    }


@dataclass
class InferenceStats:
    """Timing of the last :meth:`SpanDetector.predict` call.

    Attributes:
        examples: examples predicted; pairs: candidate pairs (context turns) scored.
        seconds: wall time of the whole call (rendering, batches, decoding), seconds.
        cpu_seconds: CPU time of the process during the call (all threads), seconds; on a
            shared machine ``pairs / cpu_seconds`` shows the cost independent of contention.
        pairs_per_s: ``pairs / seconds``.
        batch_ms: wall time of each batch's model run (padding + forward), milliseconds.
        padded_tokens: tokens run through the model including padding.
    """

    examples: int = 0
    pairs: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    pairs_per_s: float = 0.0
    batch_ms: list[float] = field(default_factory=list)
    padded_tokens: int = 0


def onnx_session(path: Path, threads: int = 2, allow_spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, one inter-op thread.

    ``allow_spinning=False`` (ONNX Runtime's ``session.intra_op.allow_spinning = 0``) makes idle
    worker threads sleep instead of busy-waiting: on a machine shared with other jobs, spinning
    threads steal CPU from the one doing work (measured here on 2 busy cores: ~260 vs ~420
    pairs/s with 2 threads); on dedicated cores the difference is small.

    Raises:
        FileNotFoundError: no ONNX file at ``path``.
    """
    import onnxruntime as ort

    if not Path(path).exists():
        raise FileNotFoundError(f"ONNX model not found: {path}; run `{TRAIN_COMMAND}`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_runner(session: Any) -> Runner:
    """A :data:`Runner` over an ONNX Runtime session with the span model's inputs/outputs."""

    def run(b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        start, end = session.run(list(MODEL_OUTPUTS), {k: b[k] for k in MODEL_INPUTS})
        return np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32)

    return run


def torch_runner(model: Any) -> Runner:
    """A :data:`Runner` over a torch :class:`~offline.detector.span_model.SpanRephraseModel`."""
    import torch

    def run(b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            s, e = model(*(torch.from_numpy(b[k]) for k in MODEL_INPUTS))
        return s.numpy(), e.numpy()

    return run


class SpanDetector:
    """The trained span detector as an ``ExampleDetector`` (``name = "bert_span"``).

    Build with :meth:`load`. After each :meth:`predict`, :attr:`last_stats` holds its timing and
    :attr:`last_pairs_per_s` the candidate pairs scored per second.

    Args:
        renderer: the artifact's renderer.
        runner: padded batch -> logits (:data:`Runner`).
        backend: ``onnx-int8``, ``onnx`` or ``torch``.
        artifact: the artifact folder.
        meta: its ``detector.json``.
        batch_workers: batches run at the same time, each on its own Python thread (ONNX
            Runtime releases the GIL while it runs; one session serves concurrent runs); 1 =
            one batch after another. Decoding overlaps the next batches' forward passes.
    """

    name = "bert_span"

    def __init__(
        self,
        renderer: Renderer,
        runner: Runner,
        backend: str,
        artifact: Path,
        meta: dict[str, Any] | None = None,
        batch_workers: int = 1,
    ) -> None:
        self.renderer = renderer
        self._run = runner
        self.backend = backend
        self.artifact = Path(artifact)
        self.meta = meta or {}
        self.batch_workers = max(1, batch_workers)
        self.last_stats = InferenceStats()

    @property
    def runner(self) -> Runner:
        """The backend's padded batch -> logits function."""
        return self._run

    @property
    def last_pairs_per_s(self) -> float:
        """Candidate pairs per second of the last :meth:`predict` call (0.0 before any)."""
        return self.last_stats.pairs_per_s

    @classmethod
    def load(
        cls,
        artifact: Path,
        backend: str = "onnx-int8",
        threads: int = 2,
        allow_spinning: bool = False,
        batch_workers: int = 1,
    ) -> SpanDetector:
        """Load an artifact for inference.

        Args:
            artifact: folder with ``detector.json``, tokenizer, ``model.safetensors`` and the
                ONNX files.
            backend: ``onnx-int8`` (default; int8 MatMul weights), ``onnx`` (fp32) or ``torch``.
            threads: intra-op threads (ONNX Runtime ``intra_op_num_threads`` or
                ``torch.set_num_threads`` — the latter is process-wide).
            allow_spinning: let idle ONNX Runtime threads busy-wait (see :func:`onnx_session`).
            batch_workers: ONNX backends only: run this many batches concurrently, each with
                ``threads // batch_workers`` intra-op threads (at least 1); the torch backend
                always runs one batch at a time.

        Raises:
            FileNotFoundError: not a complete artifact (the message names ``qrw train
                detector``).
            ValueError: unknown backend.
        """
        artifact = Path(artifact)
        if backend not in BACKENDS:
            raise ValueError(f"unknown detector backend {backend!r}; use one of {BACKENDS}")
        meta_path = artifact / "detector.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no rephrase-detector artifact at {artifact} (missing detector.json); "
                f"run `{TRAIN_COMMAND}` first"
            )
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if "render" not in meta or not (artifact / "model.safetensors").exists():
            raise FileNotFoundError(
                f"{artifact} is a detector artifact of an older format "
                f"({meta.get('code_version', 'unknown')}); run `{TRAIN_COMMAND}` to retrain"
            )
        renderer = Renderer(FastWordpiece(artifact), RenderConfig.from_dict(meta["render"]))
        runner: Runner
        if backend == "torch":
            import torch

            from offline.detector.span_model import load_span_model

            torch.set_num_threads(threads)
            runner = torch_runner(load_span_model(artifact))
            batch_workers = 1
        else:
            path = artifact / ONNX_FILES[backend]
            batch_workers = max(1, batch_workers)
            per_run = max(1, threads // batch_workers)
            runner = onnx_runner(onnx_session(path, per_run, allow_spinning))
        log.info(
            "loaded span detector %s (%s, %d threads, %d concurrent batches)",
            artifact.name, backend, threads, batch_workers,
        )  # fmt: skip
        return cls(renderer, runner, backend, artifact, meta, batch_workers)

    def logits(self, rendered: Sequence[Rendered]) -> tuple[np.ndarray, np.ndarray]:
        """Raw start/end logits of one batch, each ``(batch, seq) float32`` (padded)."""
        return self._run(pad_batch(rendered, self.renderer.pad))

    def predict(
        self, examples: Sequence[DetectorExample], batch_size: int = 64
    ) -> list[Prediction]:
        """One :class:`Prediction` per example, in input order.

        Examples are rendered, sorted by token length and run in batches of ``batch_size`` with
        dynamic padding; timing goes to :attr:`last_stats`.
        """
        t0, cpu0 = time.perf_counter(), time.process_time()
        rendered = self.renderer.render_many(examples)
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))
        out: list[Prediction | None] = [None] * len(rendered)
        stats = InferenceStats(examples=len(examples))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

        def run(idx: list[int]) -> tuple[list[int], np.ndarray, np.ndarray, float]:
            tb = time.perf_counter()
            start, end = self.logits([rendered[j] for j in idx])
            return idx, start, end, (time.perf_counter() - tb) * 1000.0

        if self.batch_workers > 1 and len(chunks) > 1:
            pool = ThreadPoolExecutor(self.batch_workers, thread_name_prefix="span-batch")
            results: Iterable[tuple[list[int], np.ndarray, np.ndarray, float]] = pool.map(
                run, chunks
            )
        else:
            pool, results = None, map(run, chunks)
        try:
            for idx, start, end, ms in results:  # in batch order, whatever finished first
                stats.batch_ms.append(ms)
                stats.padded_tokens += int(start.size)
                chunk = [rendered[j] for j in idx]
                for j, p in zip(idx, decode(start, end, chunk), strict=True):
                    out[j] = p
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        stats.seconds = time.perf_counter() - t0
        stats.cpu_seconds = time.process_time() - cpu0
        stats.pairs = sum(len(ex.context) for ex in examples)
        stats.pairs_per_s = stats.pairs / stats.seconds if stats.seconds > 0 else 0.0
        self.last_stats = stats
        preds = [p for p in out if p is not None]
        assert len(preds) == len(examples)
        return preds


def logit_cosines(
    ref: tuple[np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray],
    rendered: Sequence[Rendered],
) -> np.ndarray:
    """Per-example cosine between two models' logits.

    For each example the start and end logits at its real (non-padding) positions are
    concatenated, for ``ref`` and ``got`` alike, and compared by cosine similarity.

    Returns:
        ``(batch,) float64`` cosines.
    """
    out = np.empty(len(rendered))
    for i, r in enumerate(rendered):
        k = len(r.input_ids)
        x = np.concatenate([ref[0][i, :k], ref[1][i, :k]]).astype(np.float64)
        y = np.concatenate([got[0][i, :k], got[1][i, :k]]).astype(np.float64)
        out[i] = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
    return out


def compare_runners(
    runners: dict[str, Runner],
    renderer: Renderer,
    examples: Sequence[DetectorExample],
    reference: str = "torch",
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Run every runner on ``examples`` and compare each with ``reference``.

    Returns:
        Per runner: span metrics against the gold labels (:func:`span_metrics`), plus for the
        non-reference runners ``cosine_mean`` / ``cosine_min`` (:func:`logit_cosines`),
        ``label_agreement`` (share of identical decoded labels) and ``max_abs_diff`` of logits.
    """
    rendered = [renderer.render(ex) for ex in examples]
    pad = int(getattr(renderer, "pad", 0))
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))
    preds: dict[str, list[Prediction]] = {name: [] for name in runners}
    cos: dict[str, list[float]] = {name: [] for name in runners}
    diff: dict[str, float] = dict.fromkeys(runners, 0.0)
    ordered = [examples[i] for i in order]
    for i in range(0, len(order), batch_size):
        chunk = [rendered[j] for j in order[i : i + batch_size]]
        b = pad_batch(chunk, pad)
        ref = runners[reference](b)
        for name, run in runners.items():
            got = ref if name == reference else run(b)
            preds[name] += decode(got[0], got[1], chunk)
            if name != reference:
                cos[name] += logit_cosines(ref, got, chunk).tolist()
                valid = b["attention_mask"].astype(bool)
                d = max(np.abs(ref[0] - got[0])[valid].max(), np.abs(ref[1] - got[1])[valid].max())
                diff[name] = max(diff[name], float(d))
    out: dict[str, dict[str, float]] = {}
    ref_labels = [p.label for p in preds[reference]]
    for name in runners:
        m = span_metrics(ordered, preds[name])
        if name != reference:
            labels = [p.label for p in preds[name]]
            m["label_agreement"] = float(
                np.mean([a == b for a, b in zip(ref_labels, labels, strict=True)])
            )
            m["cosine_mean"] = float(np.mean(cos[name]))
            m["cosine_min"] = float(np.min(cos[name]))
            m["max_abs_diff"] = diff[name]
        out[name] = {k: round(v, 6) for k, v in m.items()}
    return out


def backend_agreement(
    artifact: Path,
    model: Any,
    renderer: Renderer,
    examples: Sequence[DetectorExample],
    threads: int = 2,
    min_cosine: float = 0.99,
    max_accuracy_drop: float = 0.0,
) -> dict[str, Any]:
    """Check the exported ONNX graphs against the torch model (run at the end of training).

    Args:
        artifact: folder with ``model.onnx`` and ``model.int8.onnx``.
        model: the torch model they were exported from.
        renderer: the renderer used in training.
        examples: labelled check examples (dev).
        min_cosine: required mean logit cosine of int8 vs torch.
        max_accuracy_drop: exact-span accuracy int8 may lose against torch (0.0 = none).

    Returns:
        ``{"examples", "torch": {...}, "onnx": {...}, "onnx_int8": {...}, "int8_cosine_ok",
        "int8_accuracy_drop", "passed"}`` (see :func:`compare_runners`). ``passed`` = int8 mean
        cosine >= ``min_cosine`` and its exact-span accuracy is at most ``max_accuracy_drop``
        below torch's.
    """
    if not examples:
        return {"examples": 0, "passed": False}
    model.eval()
    runners = {
        "torch": torch_runner(model),
        "onnx": onnx_runner(onnx_session(Path(artifact) / "model.onnx", threads)),
        "onnx_int8": onnx_runner(onnx_session(Path(artifact) / "model.int8.onnx", threads)),
    }
    res: dict[str, Any] = dict(compare_runners(runners, renderer, examples))
    drop = res["torch"]["exact_span_accuracy"] - res["onnx_int8"]["exact_span_accuracy"]
    res["examples"] = len(examples)
    res["int8_cosine_ok"] = bool(res["onnx_int8"]["cosine_mean"] >= min_cosine)
    res["int8_accuracy_drop"] = round(float(drop), 6)
    res["passed"] = bool(res["int8_cosine_ok"] and drop <= max_accuracy_drop + 1e-12)
    return res
