"""Batch inference of the span rephrase detector on ONNX Runtime (or torch).

``SpanDetector.load(artifact_dir, backend)`` reads an artifact written by
:func:`offline.detector.train.train_span_detector`. ``predict`` renders the examples, sorts
them by length, runs batches with dynamic padding, decodes spans with
:func:`offline.detector.span_model.decode` and restores the input order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offline.detector.examples import DetectorExample, Prediction
from offline.detector.span_model import RenderConfig, Rendered, Renderer, decode, pad_batch

log = logging.getLogger(__name__)

BACKENDS = ("onnx-int8", "onnx", "torch")


class SpanDetector:
    """The trained span detector as an ``ExampleDetector`` (``name = "bert_span"``).

    Use :meth:`load`. Attributes after :meth:`predict`: ``last_pairs_per_s`` (candidate
    pairs — context turns — scored per second).
    """

    name = "bert_span"

    def __init__(self, renderer: Renderer, runner: Any, backend: str, artifact: Path) -> None:
        self.renderer = renderer
        self._run = runner
        self.backend = backend
        self.artifact = artifact
        self.last_pairs_per_s = 0.0

    @classmethod
    def load(cls, artifact: Path, backend: str = "onnx-int8", threads: int = 2) -> SpanDetector:
        """Load an artifact.

        Args:
            artifact: folder with ``detector.json``, ``encoder/``, ``heads.pt``, ONNX files.
            backend: ``onnx-int8`` (default), ``onnx`` (fp32) or ``torch``.
            threads: intra-op threads.

        Raises:
            FileNotFoundError: not an artifact (run ``qrw train detector``).
            ValueError: unknown backend.
        """
        artifact = Path(artifact)
        meta_path = artifact / "detector.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no detector artifact at {artifact}; run `qrw train detector`")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        meta = json.loads(meta_path.read_text())
        render = RenderConfig.from_dict(meta["config"]["render"])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(artifact / "encoder", local_files_only=True)
        renderer = Renderer(tok, render)
        if backend == "torch":
            import torch

            from offline.detector.train import load_tokenizer_and_model

            torch.set_num_threads(threads)
            _, model = load_tokenizer_and_model(artifact / "encoder")
            model.eval()
            runner: Any = _torch_runner(model)
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            name = "model.int8.onnx" if backend == "onnx-int8" else "model.onnx"
            session = ort.InferenceSession(
                str(artifact / name), opts, providers=["CPUExecutionProvider"]
            )
            runner = _onnx_runner(session)
        return cls(renderer, runner, backend, artifact)

    def logits(self, rendered: Sequence[Rendered]) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(batch, seq) float32`` start/end logits of one padded batch."""
        b = pad_batch(rendered)
        result: tuple[np.ndarray, np.ndarray] = self._run(b)
        return result

    def predict(
        self, examples: Sequence[DetectorExample], batch_size: int = 64
    ) -> list[Prediction]:
        """One :class:`Prediction` per example, in input order."""
        t0 = time.perf_counter()
        rendered = [self.renderer.render(ex) for ex in examples]
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))
        out: list[Prediction | None] = [None] * len(rendered)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            chunk = [rendered[j] for j in idx]
            start, end = self.logits(chunk)
            for j, p in zip(idx, decode(start, end, chunk), strict=True):
                out[j] = p
        secs = time.perf_counter() - t0
        pairs = sum(len(ex.context) for ex in examples)
        self.last_pairs_per_s = pairs / secs if secs > 0 else 0.0
        return [p for p in out if p is not None]


def _onnx_runner(session: Any) -> Any:
    def run(b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feeds = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        start, end = session.run(["start_logits", "end_logits"], feeds)
        return start, end

    return run


def _torch_runner(model: Any) -> Any:
    import torch

    def run(b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            s, e = model(
                torch.from_numpy(b["input_ids"]),
                torch.from_numpy(b["attention_mask"]),
                torch.from_numpy(b["token_type_ids"]),
            )
        return s.numpy(), e.numpy()

    return run


def backend_agreement(
    artifact: Path, model: Any, renderer: Renderer, examples: Sequence[DetectorExample]
) -> dict[str, float]:
    """Agreement of the ONNX fp32 and int8 graphs with the torch model on ``examples``.

    Returns:
        ``{"<backend>_cosine": mean per-example cosine of concatenated start/end logits
        (valid positions), "<backend>_label_agreement": share of identical decoded labels}``.
    """
    import onnxruntime as ort
    import torch

    if not examples:
        return {}
    rendered = [renderer.render(ex) for ex in examples]
    b = pad_batch(rendered)
    model.eval()
    with torch.no_grad():
        s, e = model(*(torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask",
                                                          "token_type_ids")))  # fmt: skip
    ref = (s.numpy(), e.numpy())
    ref_labels = [p.label for p in decode(ref[0], ref[1], rendered)]
    out: dict[str, float] = {}
    for name, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        sess = ort.InferenceSession(str(artifact / file), providers=["CPUExecutionProvider"])
        got = _onnx_runner(sess)(b)
        cos = []
        for i, r in enumerate(rendered):
            k = len(r.input_ids)
            x = np.concatenate([ref[0][i, :k], ref[1][i, :k]])
            y = np.concatenate([got[0][i, :k], got[1][i, :k]])
            cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12)))
        labels = [p.label for p in decode(got[0], got[1], rendered)]
        out[f"{name}_cosine"] = round(float(np.mean(cos)), 5)
        out[f"{name}_label_agreement"] = round(
            float(np.mean([a == c for a, c in zip(ref_labels, labels, strict=True)])), 5
        )
    return out
