"""DPR query and passage encoders on ONNX Runtime (the torch-free online path).

A DPR artifact (written by ``qrw train dpr``, :mod:`offline.dpr.train`) is a folder
``artifacts/dpr/<content-hash>/`` holding

- ``query.onnx`` and ``passage.onnx``: the two towers of the bi-encoder (Karpukhin et al.,
  "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP 2020), each a BERT
  (all-MiniLM-L6-v2) with mean pooling over the attention mask and L2 normalisation inside the
  graph; inputs ``input_ids``, ``attention_mask`` ``(batch, seq) int64``, output
  ``embedding`` ``(batch, 384) float32``;
- optionally ``query.int8.onnx``: the query tower with int8 MatMul weights (ONNX Runtime dynamic
  quantization), present only when it kept cosine >= 0.99 to the fp32 tower on dev texts;
- or, in a *static* artifact (``dpr.json`` ``query_tower: static``, written by ``qrw train dpr
  --query-static``), ``query.static.npy`` instead of ``query.onnx``: one vector per wordpiece,
  ``(vocab, 384) float16``; the query vector is the mean of its wordpieces' rows
  (:class:`StaticEmbeddingBag`), with the passage tower unchanged;
- the tokenizer files (``tokenizer.json`` etc.);
- ``dpr.json``: metadata, among it ``encoder_id`` (= the content hash; it goes into
  ``index.json`` so an index is never searched with vectors of another encoder), ``dim``,
  ``max_length``, training metrics.

Tokenization uses the artifact's fast (Rust) tokenizer through the ``tokenizers`` library:
``transformers.AutoTokenizer`` returns the same ids (it wraps this tokenizer) but importing it
loads torch, which the online service must not do. The ``tokenizer.json`` holds the BERT
normalizer (lower-casing, accent stripping) and the ``[CLS] ... [SEP]`` template.

ONNX Runtime sessions run ``threads`` intra-op threads, one inter-op thread, and idle threads
sleep instead of spinning (``session.intra_op.allow_spinning = 0``), which matters on a machine
shared with other processes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

import numpy as np
from cachetools import LRUCache

log = logging.getLogger(__name__)

DPR_META = "dpr.json"
QUERY_ONNX = "query.onnx"
QUERY_INT8_ONNX = "query.int8.onnx"
QUERY_STATIC = "query.static.npy"
STATIC_TOWER = "static"
PASSAGE_ONNX = "passage.onnx"
TOKENIZER_FILE = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
TRAIN_COMMAND = "qrw train dpr"


class CacheInfo(NamedTuple):
    """Statistics of a tower's query-vector cache (the fields of ``functools``' cache info)."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class DprModelMissingError(FileNotFoundError):
    """No complete DPR artifact where the settings point (the message names the command)."""


def resolve_dpr_artifact(artifacts_dir: Path, artifact: Path | None = None) -> Path:
    """The DPR artifact folder to load: ``artifact`` if given, else the one ``LATEST`` names.

    Args:
        artifacts_dir: ``dpr.artifacts_dir`` (holds ``<hash>/`` folders and ``LATEST``).
        artifact: ``dpr.artifact``; a specific artifact folder, or None.

    Raises:
        DprModelMissingError: no ``dpr.json`` there (the message names ``qrw train dpr``).
    """
    if artifact is not None:
        path = Path(artifact)
    else:
        latest = Path(artifacts_dir) / "LATEST"
        name = latest.read_text().strip() if latest.exists() else ""
        path = Path(artifacts_dir) / name if name else Path(artifacts_dir)
    if not (path / DPR_META).exists():
        raise DprModelMissingError(
            f"no DPR encoder artifact at {path} (missing {DPR_META}); run `{TRAIN_COMMAND} "
            f"--run RUN_DIR` (fine-tuned) or `{TRAIN_COMMAND} --zero-shot` (base MiniLM) first"
        )
    return path


def read_dpr_meta(artifact_dir: Path) -> dict[str, Any]:
    """``dpr.json`` of an artifact.

    Raises:
        DprModelMissingError: the file is missing.
    """
    path = Path(artifact_dir) / DPR_META
    if not path.exists():
        raise DprModelMissingError(
            f"no DPR encoder artifact at {artifact_dir} (missing {DPR_META}); "
            f"run `{TRAIN_COMMAND}` first"
        )
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def onnx_session(path: Path | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, 1 inter-op, no spinning,
    warnings off. ``path``: an ONNX file, or a serialized model's bytes (the ranker's trees,
    :class:`rewrite.rerank.OnnxTreeScorer`).

    Raises:
        FileNotFoundError: no ONNX file at ``path``.
    """
    import onnxruntime as ort

    if not isinstance(path, bytes) and not Path(path).exists():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


class StaticEmbeddingBag:
    """A static query tower: the mean of per-wordpiece vectors, no transformer at run time.

    Model2Vec (Tulkens & van Dongen, "Model2Vec: Distill a Small Fast Model from any Sentence
    Transformer", 2024) makes a sentence encoder static by giving every vocabulary token the
    teacher's vector of that token alone; :mod:`offline.dpr.distill` starts from such vectors
    and then trains them to reproduce the teacher's query vectors on logged utterances. The
    result costs a tokenization, a gather and a mean (0.08 ms p50 per query on one AVX2 core,
    ``bench/bench_encoders.py --static``) instead of a 6-layer MiniLM pass (1.5-8 ms).

    It answers ONNX Runtime's ``session.run`` call, so :class:`QueryEncoder` serves it like
    an ONNX graph: inputs ``input_ids``, ``attention_mask`` ``(batch, seq) int64``, output
    ``(batch, dim) float32`` — the mask-weighted mean of the rows (not yet L2-normalised;
    the encoder normalises).

    Attributes:
        table: ``(vocab, dim)`` float16 (or float32), read-only.
    """

    def __init__(self, table: np.ndarray) -> None:
        if table.ndim != 2 or table.shape[0] == 0:
            raise ValueError(f"a static tower is a (vocab, dim) table (got {table.shape})")
        if not np.all(np.isfinite(table)):
            raise ValueError("the static tower's table holds NaN or infinite values")
        # a plain ndarray view of a memmap: the same mapped pages, without np.memmap's
        # Python-level __getitem__ / __array_finalize__ on every lookup (~4 us a call)
        table = np.asarray(table)
        table.setflags(write=False)
        self.table = table

    @classmethod
    def load(cls, path: Path, vocab_size: int) -> StaticEmbeddingBag:
        """Map ``query.static.npy`` (no pickles; read-only, ``numpy.load(mmap_mode="r")``) for a
        tokenizer of ``vocab_size`` wordpieces.

        Raises:
            FileNotFoundError: no file at ``path``; ValueError: not a finite 2-d table, or not
            one row per wordpiece.
        """
        if not Path(path).exists():
            raise FileNotFoundError(f"static query tower not found: {path}")
        # mapped, not read: the table's pages stay in the page cache, shared by every service
        # process (rewrite.processes) that loads the same artifact
        bag = cls(np.load(path, allow_pickle=False, mmap_mode="r"))
        if bag.vocab_size != vocab_size:
            raise ValueError(
                f"{path} has {bag.vocab_size} rows for a vocabulary of {vocab_size} wordpieces"
            )
        return bag

    @property
    def vocab_size(self) -> int:
        """Rows of the table (= the tokenizer's vocabulary size)."""
        return int(self.table.shape[0])

    #: A row's vector depends on its own tokens only, bit for bit (no padding or batch
    #: effects), so :meth:`_OnnxTower.encode_cached` may encode a micro-batch in one call.
    batch_invariant = True

    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``[(batch, dim) float32]``: per row, the mean of ``table[input_ids]`` over the
        positions where ``attention_mask`` is 1 (``output_names`` is ignored: one output).

        The masked rows are zeroed and summed along the sequence axis, which numpy does in
        token order for each row on its own (the reduced axis is not the contiguous one), and
        adding a zeroed padding row leaves a sum unchanged, so a row gets the same bits alone
        or padded in any batch (``batch_invariant``).

        Raises:
            IndexError: an id outside the vocabulary.
        """
        ids = np.asarray(feeds["input_ids"])
        mask = np.asarray(feeds["attention_mask"]) != 0
        if ids.shape[0] == 1 and mask.all():  # a lone text (the service's common case)
            # the same additions in the same order as below (token order along the seq
            # axis, float32), without the masking: the same bits, ~40 % less time
            one = self.table[ids[0]].astype(np.float32)  # (seq, dim)
            return [(one.sum(axis=0) / np.float32(max(ids.shape[1], 1)))[None, :]]
        rows = self.table[ids].astype(np.float32)  # (batch, seq, dim)
        rows *= mask[:, :, None]
        counts = np.maximum(mask.sum(axis=1, keepdims=True), 1).astype(np.float32)
        return [rows.sum(axis=1) / counts]


def load_fast_tokenizer(artifact_dir: Path, max_length: int, padding: bool = True) -> Any:
    """The artifact's ``tokenizers.Tokenizer`` with truncation to ``max_length`` tokens
    (``[CLS]``/``[SEP]`` included) and, with ``padding``, padding to the longest text of a
    batch (right side, ``[PAD]``'s id). Without it a batch's encodings keep their lengths
    (:func:`pad_token_ids` pads them the same way): the query towers tokenize a lone text per
    request, for which the tokenizer's padding step costs ~9 of ~24 us and pads nothing.

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in the artifact.
    """
    from tokenizers import Tokenizer

    path = Path(artifact_dir) / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no fast tokenizer ({TOKENIZER_FILE}) in {artifact_dir}")
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    if padding:
        tok.enable_padding(pad_id=pad_token_id(tok), pad_token="[PAD]")
    else:  # also a padding setting saved in the file
        tok.no_padding()
    return tok


def pad_token_id(tokenizer: Any) -> int:
    """Id of ``[PAD]`` in a ``tokenizers.Tokenizer`` (0 when it has none)."""
    pad_id = tokenizer.token_to_id("[PAD]")
    return 0 if pad_id is None else int(pad_id)


def pad_token_ids(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch padded on the right to the longest, as the tokenizer's own padding
    does (:func:`load_fast_tokenizer`).

    Args:
        ids: per text, its token ids (``[CLS]``/``[SEP]`` included).
        pad_id: :func:`pad_token_id`.

    Returns:
        ``(input_ids, attention_mask)``: ``(len(ids), longest)`` int64 each; the mask is 1 on
        tokens, 0 on padding.
    """
    width = max((len(row) for row in ids), default=0)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


class _OnnxTower:
    """One tower of a DPR artifact on ONNX Runtime (shared code of the two encoders)."""

    onnx_file = QUERY_ONNX

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        meta: dict[str, Any],
        artifact_dir: Path,
        onnx_path: Path,
        batch_size: int = 64,
        cache_size: int = 4096,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.meta = meta
        self.artifact_dir = artifact_dir
        self.onnx_path = onnx_path
        self.encoder_id: str = str(meta["encoder_id"])
        self.dim: int = int(meta["dim"])
        self.batch_size = batch_size
        self._cache: LRUCache[str, np.ndarray] | None = (
            LRUCache(maxsize=cache_size) if cache_size > 0 else None
        )
        self._cache_lock = threading.Lock()
        self._hits = self._misses = 0
        self._pad_id = pad_token_id(tokenizer)

    @classmethod
    def _pick_onnx(cls, artifact_dir: Path, meta: dict[str, Any], quantized: bool | None) -> Path:
        return artifact_dir / cls.onnx_file

    @classmethod
    def load(
        cls,
        artifact_dir: Path,
        threads: int = 1,
        max_length: int | None = None,
        quantized: bool | None = None,
        cache_size: int = 4096,
    ) -> Self:
        """Open the tower of a DPR artifact.

        Args:
            artifact_dir: the artifact folder (see :func:`resolve_dpr_artifact`).
            threads: ONNX Runtime intra-op threads.
            max_length: tokens per text (default: the artifact's training ``max_length``).
            quantized: query tower only; True = ``query.int8.onnx`` (error if absent), False =
                fp32, None = int8 when the artifact has it (it passed the cosine check). A static
                query tower has one precision: None and False load it, True is an error.
            cache_size: LRU cache entries for single-text :meth:`encode` calls (0 = none).

        Raises:
            DprModelMissingError: no ``dpr.json``; FileNotFoundError: an ONNX, static-table or
            tokenizer file is missing; ValueError: a static table that does not fit the
            tokenizer's vocabulary.
        """
        artifact_dir = Path(artifact_dir)
        meta = read_dpr_meta(artifact_dir)
        length = int(max_length or meta.get("max_length", 32))
        onnx_path = cls._pick_onnx(artifact_dir, meta, quantized)
        tokenizer = load_fast_tokenizer(artifact_dir, length, padding=False)
        session: Any
        if onnx_path.name == QUERY_STATIC:
            session = StaticEmbeddingBag.load(onnx_path, tokenizer.get_vocab_size())
        else:
            session = onnx_session(onnx_path, threads)
        log.info("%s loaded from %s (encoder_id %s)", cls.__name__, onnx_path, meta["encoder_id"])
        return cls(session, tokenizer, meta, artifact_dir, onnx_path, cache_size=cache_size)

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        # one text: plain encode (encode_batch dispatches to the tokenizers thread pool) and
        # nothing to pad; a batch is padded here (the tokenizer has no padding configured)
        if len(texts) == 1:
            ids = np.asarray([self.tokenizer.encode(texts[0]).ids], dtype=np.int64)
            mask = np.ones_like(ids)
        else:
            encs = self.tokenizer.encode_batch(list(texts))
            ids, mask = pad_token_ids([e.ids for e in encs], self._pad_id)
        (out,) = self.session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})
        vecs = np.asarray(out, dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: ``(len(texts), dim)`` float32, L2-normalised rows.

        Inputs are sorted by length and run in batches of ``batch_size`` with padding to the
        batch's longest text, then put back in input order. No cache (see
        :meth:`encode_cached`).
        """
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if n == 1:
            return self._run(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        order = sorted(range(n), key=lambda i: len(texts[i]))
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._run([texts[i] for i in idx])
        return out

    def encode_cached(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` through the LRU cache of query vectors (``cache_size`` entries;
        cachetools ``LRUCache`` behind a lock, so threads may share it). Voice traffic
        repeats, and the online service encodes every request (or a micro-batch of them) here.

        Each distinct text not in the cache is encoded on its own, never padded into a batch
        with others: the int8 towers quantize activations dynamically, with one scale per
        input tensor, so a text's vector would depend on which other requests shared its
        micro-batch (measured: heuristic ranker scores moved by 0.004). One text per call
        keeps every answer independent of concurrent traffic. A static tower
        (:class:`StaticEmbeddingBag`, ``batch_invariant``) gives each text the same vector
        alone or padded in a batch, so its missing texts are encoded in one call.

        Returns:
            ``(len(texts), dim)`` float32, L2-normalised rows (a new array; the cache keeps
            read-only copies).
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for i, text in enumerate(texts):
                vec = None if self._cache is None else self._cache.get(text)
                if vec is None:
                    missing.setdefault(text, []).append(i)
                else:
                    out[i] = vec
            self._hits += len(texts) - sum(len(v) for v in missing.values())
            self._misses += len(missing)
        if not missing:
            return out
        if getattr(self.session, "batch_invariant", False):
            vecs = list(self._run(list(missing)))
        else:
            vecs = [self._run([text])[0] for text in missing]
        for (text, rows), vec in zip(missing.items(), vecs, strict=True):
            if self._cache is not None:
                vec = vec.copy()  # a row of its own, not a view that keeps the batch alive
                vec.setflags(write=False)
                with self._cache_lock:
                    self._cache[text] = vec
            out[rows] = vec
        return out

    def cache_info(self) -> CacheInfo:
        """Hits, misses (distinct texts encoded), size and capacity of the query-vector
        cache."""
        with self._cache_lock:
            size = 0 if self._cache is None else len(self._cache)
            cap = 0 if self._cache is None else int(self._cache.maxsize)
            return CacheInfo(self._hits, self._misses, cap, size)


class QueryEncoder(_OnnxTower):
    """The DPR query tower on ONNX Runtime (online: one utterance per request), or the static
    tower of an artifact whose ``dpr.json`` says ``query_tower: static``
    (:class:`StaticEmbeddingBag`, numpy only).

    Attributes:
        encoder_id: content hash of the artifact (must equal the index's ``encoder_id``).
        dim: embedding size (384).

    Use :meth:`load`; :meth:`encode` returns ``(n, dim)`` float32 L2-normalised rows.
    """

    onnx_file = QUERY_ONNX

    @classmethod
    def _pick_onnx(cls, artifact_dir: Path, meta: dict[str, Any], quantized: bool | None) -> Path:
        if meta.get("query_tower") == STATIC_TOWER:
            if quantized is True:
                raise FileNotFoundError(
                    f"{artifact_dir} has a static query tower (no int8 variant); use "
                    "dpr.query_precision auto or fp32"
                )
            return artifact_dir / QUERY_STATIC
        int8 = artifact_dir / QUERY_INT8_ONNX
        if quantized is True and not int8.exists():
            raise FileNotFoundError(f"no int8 query tower in {artifact_dir}")
        if quantized is None:
            quantized = int8.exists() and bool(meta.get("int8", {}).get("passed", False))
        return int8 if quantized else artifact_dir / QUERY_ONNX


class PassageEncoder(_OnnxTower):
    """The DPR passage tower on ONNX Runtime (offline: catalog and personal-history vectors).

    Same API as :class:`QueryEncoder`; always the fp32 graph.
    """

    onnx_file = PASSAGE_ONNX
