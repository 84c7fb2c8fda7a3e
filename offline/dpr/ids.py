"""Identity of DPR encoder artifacts, without torch.

The content hash names an artifact folder (``artifacts/dpr/<hash>/``); the nightly job looks
up the zero-shot artifact by it (:func:`zero_shot_dir`) and imports :mod:`offline.dpr.train`
(torch, transformers: ~3 s of imports) only when that artifact has to be exported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from offline.trainutil import minilm_version

if TYPE_CHECKING:
    from offline.dpr.data import DprDataset
    from offline.dpr.train import DprTrainConfig

CODE_VERSION = "dpr-v1"
"""Bump when the towers, pooling, export or training semantics change (the hash of
``offline/dpr/train.py`` and ``rewrite/encoder.py`` also changes the version)."""

BASE_MODEL = "all-MiniLM-L6-v2"

MAX_LENGTH = 32
"""Default tokens per text (``[CLS]``/``[SEP]`` included) of both towers."""

_SOURCES = (
    Path(__file__).resolve().parent / "train.py",
    Path(__file__).resolve().parents[2] / "rewrite" / "encoder.py",
)


def code_version() -> str:
    """:data:`CODE_VERSION` plus a short hash of :mod:`offline.dpr.train` and
    :mod:`rewrite.encoder` (their source bytes)."""
    h = hashlib.sha256()
    for source in _SOURCES:
        h.update(source.read_bytes())
    return f"{CODE_VERSION}+{h.hexdigest()[:12]}"


def _hasher() -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(code_version().encode())
    h.update(f"{BASE_MODEL}=={minilm_version()}".encode())
    return h


def zero_shot_id(max_length: int = MAX_LENGTH) -> str:
    """Content hash (16 hex digits) of the zero-shot artifact: code version, base model and
    ``max_length`` only, so it is the same on every machine."""
    h = _hasher()
    h.update(f"zero-shot max_length={max_length}".encode())
    return h.hexdigest()[:16]


def zero_shot_dir(out_root: Path, max_length: int = MAX_LENGTH) -> Path:
    """Where :func:`offline.dpr.train.export_zero_shot` writes (or has written) the zero-shot
    artifact for ``max_length`` under ``out_root``; it may not exist yet."""
    return Path(out_root) / zero_shot_id(max_length)


def content_hash(config: DprTrainConfig, data: DprDataset | None) -> str:
    """16 hex digits of SHA-256 over code version, base model, config and data (None = the
    zero-shot artifact, :func:`zero_shot_id`, which depends on ``max_length`` only)."""
    if data is None:
        return zero_shot_id(config.max_length)
    h = _hasher()
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(data.fingerprint().encode())
    return h.hexdigest()[:16]
