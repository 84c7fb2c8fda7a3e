"""Dense retrieval over the global catalog index.

:class:`GlobalIndex` is the online searcher of the FAISS index that the nightly job builds
(:mod:`offline.index`) from the catalog, modelled on Pyserini's ``FaissSearcher`` (Lin et al.,
"Pyserini", SIGIR 2021): a FAISS index file, an id sidecar that maps FAISS id i to row i of the
catalog, and result dataclasses (here :class:`RetrievedCandidate` with the catalog metadata the
reranker needs). An index folder holds

- ``index.faiss``: ``faiss.IndexFlatIP`` (exact), ``faiss.IndexHNSWFlat`` (Malkov & Yashunin,
  "Efficient and robust approximate nearest neighbor search using Hierarchical Navigable Small
  World graphs", TPAMI 2018) or an inverted file: ``faiss.IndexRefine`` over
  ``faiss.IndexIVFPQFastScan`` (``ivf_pq_refine``: ``IVF<nlist>,PQ<m>x4fs,Refine(SQ6)``, 4-bit
  PQ codes scanned with SIMD, the best ``k_factor * k`` re-scored with 6-bit scalar-quantized
  vectors) or ``faiss.IndexIVFScalarQuantizer`` (``ivf_sq8``: ``IVF<nlist>,SQ8``), with inner
  product over L2-normalised passage vectors, so the score is the cosine (approximately, for
  the quantized kinds);
- ``catalog.parquet``: the id sidecar, columns :data:`CATALOG_COLUMNS` (plus, optionally,
  :data:`DEVICE_TYPES_COLUMN`);
- ``index.json``: :class:`IndexInfo` — format, version, ``encoder_id``, dim, n, kind and the
  SHA-256 of both files.

:meth:`GlobalIndex.load` refuses an index whose files do not match their recorded checksums
(:class:`IndexCorruptError`) or that was built with another encoder or dimension
(:class:`IndexMismatchError`), so the service never searches with vectors of the wrong model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rewrite import ivflists, libc
from rewrite.hashing import stable_hash64
from rewrite.ivflists import IVFDATA_FILE
from rewrite.lexical import LexicalChannel

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
CATALOG_FILE = "catalog.parquet"
#: The catalog's columns as the service reads them, memory-mapped (:class:`CatalogColumns`);
#: written by the index build since 2026-12-07 and recorded in ``index.json``'s ``sha256``
#: (an older folder without it is read from ``catalog.parquet``).
COLUMNS_FILE = "catalog.arrow"
INDEX_META = "index.json"
#: 2 (since 2026-12-08): an ``ivf_pq_refine`` folder keeps its inverted lists in
#: ``index.ivfdata`` (:mod:`rewrite.ivflists`) and ``index.faiss`` holds empty ones, so code
#: that reads only format 1 refuses it instead of searching empty lists. Format 1 folders
#: (lists inside ``index.faiss``) still load.
INDEX_FORMAT = 2
READABLE_FORMATS = (1, 2)
CATALOG_COLUMNS = ("text", "frequency", "n_users", "success_rate", "domain", "intent", "last_seen")
#: Per-entry device-type counts: the device types the utterance was said on (most turns
#: first, at most ``catalog.max_device_types``) with turns and successful turns on each.
#: Optional when reading (catalogs written before it load without device-type data).
DEVICE_TYPES_COLUMN = "device_types"
DEVICE_TYPES_TYPE = pa.list_(
    pa.struct([("device_type", pa.string()), ("turns", pa.int64()), ("successes", pa.int64())])
)
#: ``catalog.parquet``: the global catalog written by the nightly job and the index's id
#: sidecar (row i = FAISS id i).
CATALOG_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("frequency", pa.int64()),
        ("n_users", pa.int64()),
        ("success_rate", pa.float64()),
        ("domain", pa.string()),
        ("intent", pa.string()),
        ("last_seen", pa.float64()),
        (DEVICE_TYPES_COLUMN, DEVICE_TYPES_TYPE),
    ]
)
#: Inverted-file kinds (``dpr.ivf_kind``; built by :func:`offline.index.make_faiss_index`).
IVF_KINDS = ("ivf_pq_refine", "ivf_sq8")
KINDS = ("flat", "hnsw", *IVF_KINDS)
_HASH_CHUNK = 65_536  # catalog texts hashed per step at load
_DEVICE_BATCH = 65_536  # catalog rows of `device_types` converted per step at load
#: How ``catalog.arrow``'s ``hash_sorted`` column was made (its schema metadata
#: ``text_hash``); a file without this value has hashes no other process can use.
TEXT_HASH = "blake2b-64-le-signed"


def _text_hash(text: str) -> int:
    """64-bit hash of a catalog text for membership: BLAKE2b
    (:func:`rewrite.hashing.stable_hash64`, signed), the same in every process. The build
    writes the sorted hashes into ``catalog.arrow`` and the service maps them; until
    2026-12-08 this was Python's ``hash``, seeded per process, so an index built by one
    process answered "not in the catalog" for its own texts in every other (the trigger's
    ``succeeds_globally`` and the personal layer's catalog metadata silently lost; see
    :meth:`CatalogColumns.read`). A name of its own so tests can force collisions."""
    return stable_hash64(text, signed=True)


_CATALOG_EMPTY: dict[str, Any] = {
    "text": "",
    "frequency": 0,
    "n_users": 0,
    "success_rate": 0.0,
    "domain": "",
    "intent": "",
    "last_seen": -1.0,
}


@dataclass(frozen=True)
class DeviceTypeStat:
    """How a catalog utterance fared on one device type (nightly job, :mod:`offline.catalog`).

    Attributes:
        device_type: normalized device type (:func:`rewrite.normalize.normalize_device_type`).
        turns: turns with the utterance on that device type (all users).
        successes: those of them that succeeded (<= ``turns``).
    """

    device_type: str
    turns: int
    successes: int


def device_types_from_rows(rows: Any) -> tuple[DeviceTypeStat, ...]:
    """``DeviceTypeStat`` tuple from Arrow/Parquet list-of-struct rows (dicts), dataclasses or
    None (= no device-type data)."""
    if not rows:
        return ()
    return tuple(
        r if isinstance(r, DeviceTypeStat) else DeviceTypeStat(**r) for r in rows if r is not None
    )


class StringColumn:
    """Read-only strings of an Arrow string array, fetched without Arrow scalars: the
    array's offsets as numpy and its data buffer as a ``memoryview`` (no copy), so ``take``
    of 20 rows costs ~8 us instead of ~22 us for 20 ``array[i].as_py()`` calls (the service
    reads text, domain and intent of every candidate).

    Args:
        array: a ``pa.string()`` or ``pa.large_string()`` array without nulls (fill them
            first); chunked arrays must be combined first.
    """

    def __init__(self, array: pa.Array) -> None:
        if array.null_count:
            raise ValueError("StringColumn needs an array without nulls")
        offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
        n = len(array)
        _validity, offsets, data = array.buffers()
        self._array = array  # keeps the buffers alive
        self._off: np.ndarray = np.zeros(1, dtype=offset_type)
        if n:  # the array may be a slice: its offsets start at array.offset
            skip = array.offset * np.dtype(offset_type).itemsize
            self._off = np.frombuffer(offsets, dtype=offset_type, count=n + 1, offset=skip)
        self._data = memoryview(data) if data is not None and data.size else memoryview(b"")

    def __len__(self) -> int:
        return len(self._off) - 1

    @property
    def array(self) -> pa.Array:
        """The Arrow array read (its buffers back this column)."""
        return self._array

    def __getitem__(self, i: int) -> str:
        return str(self._data[int(self._off[i]) : int(self._off[i + 1])], "utf-8")

    def take(self, rows: np.ndarray) -> list[str]:
        """Strings of ``rows`` (``(n,)`` int, each in ``[0, len)``)."""
        rows = np.asarray(rows, dtype=np.int64)
        data = self._data
        return [
            str(data[a:b], "utf-8")
            for a, b in zip(self._off[rows].tolist(), self._off[rows + 1].tolist(), strict=True)
        ]

    def slice_pylist(self, start: int, length: int) -> list[str]:
        """``length`` strings from ``start`` (fewer at the end) as a list."""
        return self._array.slice(start, length).to_pylist()


@dataclass(slots=True)
class RetrievedCandidate:
    """One rewrite candidate retrieved for a query (a plain slotted dataclass: the service
    builds ~20 per request, and a frozen one costs 2.5 instead of 1 us to construct; stages
    make new candidates rather than change them).

    Attributes:
        text: normalized catalog/personal utterance.
        layer: ``"global"`` or ``"personal"``.
        dense_score: inner product of L2-normalised vectors = cosine.
        frequency: global turns with this utterance (catalog).
        success_rate: global success rate (catalog).
        n_users: distinct users behind the catalog entry.
        personal_count: this user's successful uses (personal layer).
        personal_age_s: seconds since the user last used it successfully; -1 unknown.
        domain: NLU domain, if logged (``""`` also when the service's search left it in the
            index, ``nlu_labels=False``).
        intent: NLU intent, if logged (likewise).
        device_types: the catalog's per-device-type turns and successes of the text (empty
            when the logs named no device types or the text is not in the catalog — or when
            the service's :meth:`GlobalIndex.search` / :meth:`GlobalIndex.lookup` left them
            in the index, ``device_types=False``: then ``catalog_row`` says where).
        catalog_row: the candidate's row (= FAISS id) in the index that returned it; -1 when
            it did not come from a :class:`GlobalIndex`. Not part of equality.
    """

    text: str  # normalized catalog/personal utterance
    layer: str  # "global" | "personal"
    dense_score: float  # inner product of L2-normalised vectors = cosine
    frequency: int = 0  # global turns with this utterance (catalog)
    success_rate: float = 0.0  # global success rate (catalog)
    n_users: int = 0
    personal_count: int = 0  # this user's successful uses (personal layer)
    personal_age_s: float = -1  # seconds since the user last used it successfully; -1 unknown
    domain: str = ""
    intent: str = ""
    device_types: tuple[DeviceTypeStat, ...] = ()
    catalog_row: int = field(default=-1, compare=False)


class IndexMismatchError(ValueError):
    """The index does not fit the query encoder (``encoder_id`` or dimension differ) or its
    files disagree with ``index.json`` (entry count, index type)."""


class IndexCorruptError(ValueError):
    """An index file's SHA-256 differs from ``index.json``, or a file cannot be parsed."""


@dataclass(frozen=True)
class IndexInfo:
    """What ``index.json`` holds.

    Attributes:
        version: the published version the index belongs to ("" when built outside publish).
        encoder_id: ``encoder_id`` of the passage encoder (DPR artifact content hash).
        dim: the indexed vectors' size (the query tower's plus the lexical channel's, if
            ``params["lexical"]``); n: entries (= catalog rows); kind: one of :data:`KINDS`.
        sha256: hex SHA-256 of ``index.faiss`` and ``catalog.parquet``.
        params: build/search parameters (``hnsw_m``, ``ef_construction``, ``ef_search``;
            ``nlist``, ``nprobe``; ``lexical``: :meth:`LexicalChannel.to_params`).
        format: :data:`INDEX_FORMAT`.
        built_unix: build time, seconds since the epoch.
    """

    version: str
    encoder_id: str
    dim: int
    n: int
    kind: str
    sha256: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    format: int = INDEX_FORMAT
    built_unix: float = 0.0

    def to_json(self) -> str:
        """Pretty JSON (the content of ``index.json``)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def read(directory: Path) -> IndexInfo:
        """``index.json`` of an index folder.

        Raises:
            FileNotFoundError: no ``index.json`` (not a complete index folder).
            IndexCorruptError: it is not valid JSON or lacks a field.
        """
        path = Path(directory) / INDEX_META
        if not path.exists():
            raise FileNotFoundError(f"no FAISS index at {directory} (missing {INDEX_META})")
        try:
            raw = json.loads(path.read_text())
            return IndexInfo(**raw)
        except (ValueError, TypeError) as err:
            raise IndexCorruptError(f"unreadable {path}: {err}") from err


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_files(info: IndexInfo) -> tuple[str, ...]:
    """The data files of an index folder: ``index.faiss``, ``catalog.parquet`` and, when
    ``index.json`` records them, ``catalog.arrow`` and ``index.ivfdata``."""
    extra = tuple(name for name in (COLUMNS_FILE, IVFDATA_FILE) if name in info.sha256)
    return (INDEX_FILE, CATALOG_FILE, *extra)


def verify_index_dir(directory: Path, expected_encoder_id: str | None = None) -> IndexInfo:
    """Check an index folder without loading it: ``index.json`` readable, both files present
    with the recorded SHA-256, and (if given) the expected ``encoder_id``.

    Raises:
        FileNotFoundError: ``index.json`` or a data file is missing.
        IndexCorruptError: a checksum differs or ``index.json`` is unreadable.
        IndexMismatchError: ``encoder_id`` differs from ``expected_encoder_id``, or another
            index format.
    """
    directory = Path(directory)
    info = IndexInfo.read(directory)
    if info.format not in READABLE_FORMATS:
        raise IndexMismatchError(
            f"index at {directory} has format {info.format}; this code reads {READABLE_FORMATS}"
        )
    if expected_encoder_id is not None and info.encoder_id != expected_encoder_id:
        raise IndexMismatchError(
            f"index at {directory} was built with encoder {info.encoder_id!r}, but the query "
            f"encoder is {expected_encoder_id!r}; rebuild the index with this encoder "
            "(or load the matching DPR artifact)"
        )
    for name in data_files(info):
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"index folder {directory} lacks {name}")
        want = info.sha256.get(name)
        got = sha256_file(path)
        if want != got:
            raise IndexCorruptError(
                f"{path} is corrupt: sha256 {got[:16]}… differs from index.json ({str(want)[:16]}…)"
            )
    return info


class CatalogColumns:
    """The catalog as the service reads it: columnar, about 140 bytes per entry at 1M entries
    (instead of ~450 as Python lists and a text -> id dict) — strings in Arrow buffers read
    through :class:`StringColumn`, numbers as numpy arrays, membership by a sorted array of
    64-bit text hashes, device-type counts in flat CSR-like arrays.

    Built from ``catalog.parquet`` (:meth:`from_table`: fills nulls, hashes every text), or
    read from ``catalog.arrow`` (:meth:`read`), the same columns written by the index build
    (:meth:`write`) as one uncompressed Arrow IPC record batch, **memory-mapped**: nothing is
    decoded or hashed at load, and the pages live in the page cache, shared by every service
    process that maps the file (:mod:`rewrite.processes`) instead of copied into each. The
    text hashes are :func:`_text_hash` (stable across processes; schema metadata
    ``text_hash`` = :data:`TEXT_HASH`).

    Attributes:
        text, domain, intent: :class:`StringColumn` of ``n`` strings ("" for nulls).
        frequency, n_users: ``(n,)`` int64; success_rate, last_seen: ``(n,)`` float64.
        hash_order: ``(n,)`` int64, the rows sorted by their text's 64-bit hash;
            hash_sorted: ``(n,)`` int64, those hashes in that order.
        dt_off: ``(n + 1,)`` int32 (int64 past 2**31 entries) offsets into the device-type
            arrays (row i owns ``[dt_off[i], dt_off[i + 1])``), or None when no entry has a
            device type; dt_code: ``(m,)`` uint8 (int32 past 256 types) into ``dt_vocab``;
            dt_turns, dt_ok: ``(m,)`` int32 turns and successful turns.
        mapped: True when the arrays are views of a memory-mapped ``catalog.arrow``
            (except the two hash arrays of a file :meth:`read` had to rehash).
    """

    text: StringColumn
    domain: StringColumn
    intent: StringColumn
    frequency: np.ndarray
    n_users: np.ndarray
    success_rate: np.ndarray
    last_seen: np.ndarray
    hash_order: np.ndarray
    hash_sorted: np.ndarray

    def __init__(self) -> None:
        self.mapped = False
        self.dt_off: np.ndarray | None = None
        self.dt_vocab: list[str] = []
        self.dt_code = np.zeros(0, dtype=np.uint8)
        self.dt_turns = np.zeros(0, dtype=np.int32)
        self.dt_ok = np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.text)

    @classmethod
    def from_table(
        cls, catalog: pa.Table, device_types: Iterable[pa.Array] | None = None
    ) -> CatalogColumns:
        """Columns of a catalog table in :data:`CATALOG_SCHEMA` (``device_types`` may come
        apart, as batches of that column in row order, or be left in the table)."""
        out = cls()
        filled = {c: pc.fill_null(catalog.column(c), _CATALOG_EMPTY[c]) for c in CATALOG_COLUMNS}
        out.text = StringColumn(filled["text"].combine_chunks())
        out.domain = StringColumn(filled["domain"].combine_chunks())
        out.intent = StringColumn(filled["intent"].combine_chunks())
        out.frequency = filled["frequency"].to_numpy()
        out.n_users = filled["n_users"].to_numpy()
        out.success_rate = filled["success_rate"].to_numpy()
        out.last_seen = filled["last_seen"].to_numpy()
        if device_types is None and DEVICE_TYPES_COLUMN in catalog.column_names:
            device_types = catalog.column(DEVICE_TYPES_COLUMN).chunks
        out._load_device_types(device_types or ())
        out._hash_texts()
        return out

    def _hash_texts(self) -> None:
        """Set ``hash_order`` / ``hash_sorted`` from the text column (:func:`_text_hash`)."""
        n = len(self.text)
        hashes = np.empty(n, dtype=np.int64)
        for start in range(0, n, _HASH_CHUNK):  # chunks: no 1M-string list at load
            chunk = self.text.slice_pylist(start, _HASH_CHUNK)
            hashes[start : start + len(chunk)] = [_text_hash(t) for t in chunk]
        self.hash_order = np.argsort(hashes, kind="stable")
        self.hash_sorted = hashes[self.hash_order]

    def _load_device_types(self, chunks: Iterable[pa.Array]) -> None:
        """Device-type counts in flat arrays (CSR-like: row i owns ``[off[i], off[i+1])`` of
        ``dt_code`` (uint8 into ``dt_vocab``) / ``dt_turns`` / ``dt_ok`` (int32)): 4 bytes
        per entry plus 9 per (entry, device type), ~22 MB at 1M entries with two device types
        each; nothing kept when no entry has any, so a catalog without device types costs no
        memory.

        Args:
            chunks: the ``device_types`` column in row order, as list-of-struct arrays (read
                in batches by :meth:`load`: converting 2M structs at once left ~190 MB of freed
                Arrow memory resident).
        """
        code_of: dict[str, int] = {}
        lengths: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        turns: list[np.ndarray] = []
        oks: list[np.ndarray] = []
        for lists in chunks:
            lengths.append(
                pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
            )
            flat = pc.list_flatten(lists)
            if not len(flat):
                continue
            types = pc.fill_null(flat.field("device_type"), "")
            for t in pc.unique(types).to_pylist():
                code_of.setdefault(str(t), len(code_of))
            vocab = pa.array(list(code_of), pa.string())
            codes.append(pc.index_in(types, value_set=vocab).to_numpy(zero_copy_only=False))
            # counts beyond int32 are clipped (shares and rates of such entries barely move)
            for out, name in ((turns, "turns"), (oks, "successes")):
                col = pc.fill_null(flat.field(name), 0).to_numpy(zero_copy_only=False)
                out.append(np.clip(col, 0, 2**31 - 1).astype(np.int32))
        if not codes:
            return
        self.dt_vocab = list(code_of)
        code_type = np.uint8 if len(self.dt_vocab) <= 256 else np.int32
        self.dt_code = np.concatenate(codes).astype(code_type)
        self.dt_turns = np.concatenate(turns)
        self.dt_ok = np.concatenate(oks)
        n_entries = np.concatenate(lengths)
        off = np.zeros(len(n_entries) + 1, dtype=np.int64)
        np.cumsum(n_entries, out=off[1:])
        self.dt_off = off.astype(np.int32) if off[-1] < 2**31 else off

    def to_batch(self) -> pa.RecordBatch:
        """One Arrow record batch of ``n`` rows: the columns, ``hash_order``, ``hash_sorted``
        and (when any entry has one) ``device_types`` as list<struct<code, turns, ok>>; the
        device-type vocabulary in the schema metadata."""
        arrays: dict[str, pa.Array] = {
            "text": self.text.array,
            "domain": self.domain.array,
            "intent": self.intent.array,
            "frequency": pa.array(self.frequency, pa.int64()),
            "n_users": pa.array(self.n_users, pa.int64()),
            "success_rate": pa.array(self.success_rate, pa.float64()),
            "last_seen": pa.array(self.last_seen, pa.float64()),
            "hash_order": pa.array(self.hash_order, pa.int64()),
            "hash_sorted": pa.array(self.hash_sorted, pa.int64()),
        }
        if self.dt_off is not None:
            entries = pa.StructArray.from_arrays(
                [pa.array(self.dt_code), pa.array(self.dt_turns), pa.array(self.dt_ok)],
                names=["code", "turns", "ok"],
            )
            make = pa.ListArray if self.dt_off.dtype == np.int32 else pa.LargeListArray
            arrays[DEVICE_TYPES_COLUMN] = make.from_arrays(pa.array(self.dt_off), entries)
        meta = {"device_vocab": json.dumps(self.dt_vocab), "text_hash": TEXT_HASH}
        return pa.RecordBatch.from_pydict(arrays, metadata=meta)

    def write(self, path: Path) -> None:
        """Write :meth:`to_batch` as an uncompressed Arrow IPC file (memory-mappable)."""
        batch = self.to_batch()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)

    @classmethod
    def read(cls, path: Path) -> CatalogColumns:
        """Map a file written by :meth:`write` (zero-copy: every array is a view of the map).

        Raises:
            IndexCorruptError: not such a file (unreadable, not one batch, a column missing
                or of another type, nulls).
        """
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            if reader.num_record_batches != 1:
                raise ValueError(f"{reader.num_record_batches} record batches, not 1")
            batch = reader.get_batch(0)
            out = cls()
            out.mapped = True
            col = batch.column
            out.text = StringColumn(col("text"))
            out.domain = StringColumn(col("domain"))
            out.intent = StringColumn(col("intent"))

            def numbers(name: str, kind: Any) -> np.ndarray:
                arr = col(name)
                if arr.type != kind:
                    raise ValueError(f"column {name} is {arr.type}, not {kind}")
                return np.asarray(arr.to_numpy(zero_copy_only=True))

            out.frequency = numbers("frequency", pa.int64())
            out.n_users = numbers("n_users", pa.int64())
            out.success_rate = numbers("success_rate", pa.float64())
            out.last_seen = numbers("last_seen", pa.float64())
            out.hash_order = numbers("hash_order", pa.int64())
            out.hash_sorted = numbers("hash_sorted", pa.int64())
            meta = batch.schema.metadata or {}
            if meta.get(b"text_hash") != TEXT_HASH.encode():
                # written before the hashes were stable: the build process's per-process
                # `hash()` values, useless here; hash the mapped texts again (~1 s and 16 MB
                # per 1M entries) rather than answer "not in the catalog" for every text
                log.warning(
                    "%s has text hashes of another process (built before 2026-12-08); "
                    "rehashing its %d texts at load - rebuild the index to map them",
                    path,
                    batch.num_rows,
                )
                out._hash_texts()
            out.dt_vocab = [str(t) for t in json.loads(meta.get(b"device_vocab", b"[]"))]
            if DEVICE_TYPES_COLUMN in batch.schema.names:
                lists = col(DEVICE_TYPES_COLUMN)
                if lists.null_count:
                    raise ValueError("device_types has nulls")
                out.dt_off = np.asarray(lists.offsets.to_numpy(zero_copy_only=True))
                flat = lists.values
                out.dt_code = np.asarray(flat.field("code").to_numpy(zero_copy_only=True))
                out.dt_turns = np.asarray(flat.field("turns").to_numpy(zero_copy_only=True))
                out.dt_ok = np.asarray(flat.field("ok").to_numpy(zero_copy_only=True))
                if out.dt_off[0] != 0 or len(out.dt_off) != batch.num_rows + 1:
                    raise ValueError("device_types offsets do not start at 0")
        except (pa.ArrowException, KeyError, ValueError, TypeError, OSError) as err:
            raise IndexCorruptError(f"cannot read {path}: {err}") from err
        return out


def faiss_threads_on_this_thread(threads: int) -> None:
    """Set FAISS's OpenMP thread count for searches made on the calling thread (an OpenMP
    setting is per thread: without it a worker thread's search runs a team on every core);
    a no-op when it is already ``threads``."""
    import faiss

    if faiss.omp_get_max_threads() != threads:
        faiss.omp_set_num_threads(threads)


class GlobalIndex:
    """The global catalog index: FAISS search plus catalog metadata per hit.

    Build with :meth:`load`. Thread-safe for concurrent :meth:`search` calls (FAISS search is
    read-only; the parameters are set at load).

    Attributes:
        info: the :class:`IndexInfo` of the folder; directory: where it was loaded from.
    """

    def __init__(
        self,
        index: Any,
        catalog: pa.Table | CatalogColumns,
        info: IndexInfo,
        directory: Path,
        device_types: Iterable[pa.Array] | None = None,
    ):
        self.index = index
        self.info = info
        self.directory = directory
        #: FAISS OpenMP threads per search, set on each searching thread (:meth:`search`);
        #: None = leave the thread's own setting (:meth:`load` sets it)
        self.search_threads: int | None = None
        try:
            self.lexical = LexicalChannel.from_params(info.params.get("lexical"))
        except (TypeError, ValueError) as err:
            raise IndexCorruptError(f"index at {directory}: bad lexical channel: {err}") from err
        if self.lexical is not None and info.dim <= self.lexical.dims:
            raise IndexMismatchError(
                f"index at {directory}: dimension {info.dim} leaves no room for a "
                f"{self.lexical.dims}-d lexical channel"
            )
        if self.lexical is not None and info.kind == "ivf_sq8":
            import faiss

            # search reads hits' stored vectors back (their dense cosines); an inverted file
            # needs an id -> (list, offset) map for that (8 bytes per entry)
            faiss.extract_index_ivf(index).make_direct_map()
        cols = (
            catalog
            if isinstance(catalog, CatalogColumns)
            else CatalogColumns.from_table(catalog, device_types)
        )
        #: the catalog's columns (:class:`CatalogColumns`; ``mapped`` when read from
        #: ``catalog.arrow`` through the page cache)
        self.columns = cols
        self._text, self._domain, self._intent = cols.text, cols.domain, cols.intent
        self._frequency, self._n_users = cols.frequency, cols.n_users
        self._success, self._last_seen = cols.success_rate, cols.last_seen
        self._hash_order, self._hash_sorted = cols.hash_order, cols.hash_sorted
        self._dt_off, self._dt_vocab = cols.dt_off, cols.dt_vocab
        self._dt_code_of = {t: i for i, t in enumerate(cols.dt_vocab)}
        self._dt_code, self._dt_turns, self._dt_ok = cols.dt_code, cols.dt_turns, cols.dt_ok

    def device_types(self, i: int) -> tuple[DeviceTypeStat, ...]:
        """Per-device-type turns and successes of FAISS id ``i`` (empty when unknown)."""
        off = self._dt_off
        if off is None:
            return ()
        a, b = int(off[i]), int(off[i + 1])
        vocab = self._dt_vocab
        return tuple(
            DeviceTypeStat(vocab[c], t, k)
            for c, t, k in zip(
                self._dt_code[a:b].tolist(),
                self._dt_turns[a:b].tolist(),
                self._dt_ok[a:b].tolist(),
                strict=True,
            )
        )

    def _id_of(self, text: str) -> int | None:
        """Catalog row of ``text`` (binary search over the sorted hashes, then a text
        comparison of the rows with that hash), or None."""
        h = _text_hash(text)
        pos = int(np.searchsorted(self._hash_sorted, h))
        while pos < len(self._hash_sorted) and self._hash_sorted[pos] == h:
            i = int(self._hash_order[pos])
            if self._text[i] == text:
                return i
            pos += 1
        return None

    def rows_of(self, texts: Sequence[str]) -> np.ndarray:
        """Catalog rows of ``texts``: ``(n,)`` int64, -1 where a text is not in the catalog.
        One binary search over the sorted 64-bit text hashes for all texts and one text
        comparison each; a text whose first hash hit is another text (a shared hash) is
        looked up on its own (:meth:`_id_of` walks the rows with that hash)."""
        n = len(texts)
        out = np.full(n, -1, dtype=np.int64)
        size = len(self._hash_sorted)
        if not n or not size:
            return out
        hashes = np.fromiter((_text_hash(t) for t in texts), dtype=np.int64, count=n)
        pos = np.minimum(np.searchsorted(self._hash_sorted, hashes), size - 1)
        hit = np.flatnonzero(self._hash_sorted[pos] == hashes)
        rows = self._hash_order[pos[hit]]
        for j, row, text in zip(hit.tolist(), rows.tolist(), self._text.take(rows), strict=True):
            if text == texts[j]:
                out[j] = row
            else:
                found = self._id_of(texts[j])
                out[j] = -1 if found is None else found
        return out

    @property
    def dim(self) -> int:
        """Size of the query vectors :meth:`search` takes (the query tower's): the index's
        dimension less its lexical channel's, if any."""
        return self.info.dim - (self.lexical.dims if self.lexical is not None else 0)

    @property
    def encoder_id(self) -> str:
        """``encoder_id`` the passage vectors were made with."""
        return self.info.encoder_id

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        return self.info.kind

    def __len__(self) -> int:
        return self.info.n

    def __contains__(self, text: object) -> bool:
        """Whether ``text`` (normalized) is a catalog entry (a dict lookup, no object built)."""
        return isinstance(text, str) and self._id_of(text) is not None

    def lookup(
        self, text: str, device_types: bool = True, nlu_labels: bool = True
    ) -> RetrievedCandidate | None:
        """Catalog metadata of an exact (normalized) text as a ``layer="global"`` candidate with
        ``dense_score`` 0.0 (no query involved), or None when the text is not in the catalog.
        ``device_types=False`` / ``nlu_labels=False``: leave the device-type counts / the
        domain and intent in the index (see :meth:`search`)."""
        i = self._id_of(text)  # one text: the scalar hash search (cheaper than rows_of)
        if i is None:
            return None
        return self._candidates(np.asarray([i]), [0.0], device_types, nlu_labels)[0]

    def lookup_many(
        self, texts: Sequence[str], device_types: bool = True, nlu_labels: bool = True
    ) -> list[RetrievedCandidate | None]:
        """:meth:`lookup` of several texts with one hash search and one metadata gather
        (the personal layer looks up a user's top history entries together):
        :meth:`candidates_at` of :meth:`rows_of`."""
        return self.candidates_at(self.rows_of(texts), device_types, nlu_labels)

    def candidates_at(
        self, rows: np.ndarray, device_types: bool = True, nlu_labels: bool = True
    ) -> list[RetrievedCandidate | None]:
        """Catalog metadata of ``rows`` (``(n,)`` int, -1 = none, as :meth:`rows_of` gives)
        as ``layer="global"`` candidates with ``dense_score`` 0.0, None at -1; flags as
        :meth:`lookup`."""
        rows = np.asarray(rows, dtype=np.int64)
        found = rows >= 0
        cands = iter(
            self._candidates(rows[found], [0.0] * int(found.sum()), device_types, nlu_labels)
        )
        return [next(cands) if f else None for f in found.tolist()]

    def _candidates(
        self,
        rows: np.ndarray,
        scores: list[float],
        device_types: bool = True,
        nlu_labels: bool = True,
    ) -> list[RetrievedCandidate]:
        """Candidates of catalog ``rows`` (``(n,)`` int64, FAISS ids) with their dense scores
        (Python floats), the metadata of all rows gathered with one numpy / string-column call
        per column (numbers as Python ints and floats via ``tolist``); ``nlu_labels=False``
        leaves domain and intent ``""`` (two string columns not decoded)."""
        texts = self._text.take(rows)
        domains = self._domain.take(rows) if nlu_labels else [""] * len(texts)
        intents = self._intent.take(rows) if nlu_labels else domains
        freq = self._frequency[rows].tolist()
        rate = self._success[rows].tolist()
        users = self._n_users[rows].tolist()
        ids = rows.tolist()
        return [
            RetrievedCandidate(
                texts[j],
                "global",
                scores[j],
                freq[j],
                rate[j],
                users[j],
                domain=domains[j],
                intent=intents[j],
                device_types=self.device_types(i) if device_types else (),
                catalog_row=i,
            )
            for j, i in enumerate(ids)
        ]

    def device_features(
        self, rows: np.ndarray, success_rates: np.ndarray, device_types: Sequence[str]
    ) -> np.ndarray:
        """The ranker's ``(device_share, device_success_rate)`` of catalog rows, from the
        index's device-type arrays (no per-candidate objects; the same values
        :func:`rewrite.rerank.feature_matrices` computes from ``device_types`` tuples, given
        that a row lists each device type once, as the catalog writes it).

        Args:
            rows: ``(n,)`` int catalog rows (FAISS ids).
            success_rates: ``(n,)`` the rows' overall success rates (the smoothing prior).
            device_types: ``n`` normalized device types of the requests the rows answer;
                ``""`` unknown.

        Returns:
            ``(n, 2)`` float64: share of the row's turns on its device type (0 when none),
            and its success rate there smoothed towards the overall rate with
            :data:`rewrite.rerank.DEVICE_PRIOR_TURNS` pseudo-turns; ``(-1, overall rate)``
            for rows without device types or with an unknown device type.
        """
        from rewrite.rerank import DEVICE_PRIOR_TURNS

        rows = np.asarray(rows, dtype=np.int64)
        rates = np.asarray(success_rates, dtype=np.float64)
        out = np.empty((len(rows), 2), dtype=np.float64)
        out[:, 0], out[:, 1] = -1.0, rates
        off = self._dt_off
        if off is None or not len(rows):
            return out
        known = np.asarray([bool(d) for d in device_types])
        starts, ends = off[rows].astype(np.int64), off[rows + 1].astype(np.int64)
        counts = ends - starts
        has = (counts > 0) & known
        if not has.any():
            return out
        code_of = self._dt_code_of
        codes = np.asarray([code_of.get(d, -1) for d in device_types], dtype=np.int64)
        # positions of every (row, device type) entry of the rows, grouped by row
        seg = np.repeat(np.arange(len(rows)), counts)
        pos = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        turns = self._dt_turns[pos].astype(np.float64)  # clipped >= 0 at load
        total = np.bincount(seg, weights=turns, minlength=len(rows))
        mine = self._dt_code[pos] == codes[seg]
        mine_turns = np.bincount(seg, weights=np.where(mine, turns, 0.0), minlength=len(rows))
        oks = np.minimum(self._dt_ok[pos].astype(np.float64), turns)
        mine_ok = np.bincount(seg, weights=np.where(mine, oks, 0.0), minlength=len(rows))
        share = np.divide(mine_turns, total, out=np.zeros(len(rows)), where=total > 0)
        rate = (mine_ok + DEVICE_PRIOR_TURNS * rates) / (mine_turns + DEVICE_PRIOR_TURNS)
        out[has, 0], out[has, 1] = share[has], rate[has]
        return out

    def text(self, i: int) -> str:
        """Catalog text of FAISS id ``i``."""
        return self._text[i]

    def last_seen(self, i: int) -> float:
        """Catalog ``last_seen`` (epoch seconds) of FAISS id ``i``."""
        return float(self._last_seen[i])

    @classmethod
    def load(
        cls,
        directory: Path,
        expected_encoder_id: str | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        threads: int | None = 1,
        verify: bool = True,
        refine_k_factor: int | None = None,
        mmap: bool = False,
    ) -> GlobalIndex:
        """Load and check an index folder.

        Args:
            directory: folder with ``index.faiss``, ``catalog.parquet``, ``index.json`` (and,
                when recorded there, ``catalog.arrow`` and ``index.ivfdata``: the inverted
                lists of a format-2 ``ivf_pq_refine`` folder, always served from a read-only
                shared mapping, :func:`rewrite.ivflists.map_ivf_lists`).
            expected_encoder_id: the query encoder's ``encoder_id``; None = do not check.
            ef_search: HNSW search breadth (default: the value recorded at build).
            nprobe: IVF lists searched per query (default: the value recorded at build).
            threads: FAISS OpenMP threads per search (the online service uses 1 and
                parallelises over requests); None = leave each thread's setting. OpenMP's
                thread count is a per-thread setting, and a thread started later (the
                service's online workers) starts from the machine's default (every core), so
                :meth:`search` applies it on the thread that searches, not only here.
            verify: check SHA-256 of the data files (reads them once more; ~1 s per GB).
            refine_k_factor: ``ivf_pq_refine``: PQ candidates re-scored per result, as a
                multiple of k (default: the value recorded at build).
            mmap: map the index file's flat codes instead of reading them into memory
                (FAISS ``IO_FLAG_MMAP_IFC``: the flat and HNSW vectors, the refine codes of
                ``ivf_pq_refine``; inverted lists inside ``index.faiss``, format 1, are read
                into memory as before). The file must then not
                change while the index is in use (index folders never are rewritten). The
                pages that loading read through the mapping and copied (inverted lists, HNSW
                links, headers) are then released from this process's page tables
                (:func:`rewrite.libc.release_file_pages`), so only the codes searches read
                count in its memory.

        Raises:
            FileNotFoundError: a file is missing.
            IndexCorruptError: checksum mismatch, or a file cannot be parsed.
            IndexMismatchError: ``encoder_id``, dimension, entry count or kind disagree.
        """
        import faiss
        import pyarrow.parquet as pq

        directory = Path(directory)
        if verify:
            info = verify_index_dir(directory, expected_encoder_id)
        else:
            info = IndexInfo.read(directory)
            if info.format not in READABLE_FORMATS:
                raise IndexMismatchError(f"index at {directory} has format {info.format}")
            if expected_encoder_id is not None and info.encoder_id != expected_encoder_id:
                raise IndexMismatchError(
                    f"index at {directory} was built with encoder {info.encoder_id!r}, "
                    f"not {expected_encoder_id!r}"
                )
        if threads is not None:
            faiss.omp_set_num_threads(int(threads))
        try:
            flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
            index: Any = faiss.read_index(str(directory / INDEX_FILE), flags)
        except RuntimeError as err:
            raise IndexCorruptError(f"cannot read {directory / INDEX_FILE}: {err}") from err
        catalog: pa.Table | CatalogColumns
        device_types = None
        if COLUMNS_FILE in info.sha256:
            if not (directory / COLUMNS_FILE).exists():
                raise FileNotFoundError(f"index folder {directory} lacks {COLUMNS_FILE}")
            catalog = CatalogColumns.read(directory / COLUMNS_FILE)
            n_rows = len(catalog)
        else:
            try:
                parquet = pq.ParquetFile(directory / CATALOG_FILE)
                columns = [c for c in parquet.schema_arrow.names if c != DEVICE_TYPES_COLUMN]
                catalog = parquet.read(columns=columns)
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses
                raise IndexCorruptError(f"cannot read {directory / CATALOG_FILE}: {err}") from err
            n_rows = catalog.num_rows
            if DEVICE_TYPES_COLUMN in parquet.schema_arrow.names:
                device_types = (
                    b.column(0)
                    for b in parquet.iter_batches(
                        batch_size=_DEVICE_BATCH, columns=[DEVICE_TYPES_COLUMN]
                    )
                )
        if index.d != info.dim:
            raise IndexMismatchError(
                f"{directory / INDEX_FILE} has dimension {index.d}, index.json says {info.dim}"
            )
        if index.ntotal != info.n or n_rows != info.n:
            raise IndexMismatchError(
                f"index at {directory}: {index.ntotal} vectors, {n_rows} catalog rows, "
                f"index.json says {info.n}"
            )
        kind_of: dict[str, Any] = {
            "flat": faiss.IndexFlatIP,
            "hnsw": faiss.IndexHNSWFlat,
            "ivf_pq_refine": faiss.IndexRefine,
            "ivf_sq8": faiss.IndexIVFScalarQuantizer,
        }
        if info.kind not in KINDS or type(index) is not kind_of[info.kind]:
            raise IndexMismatchError(
                f"index at {directory} is {type(index).__name__}, index.json says {info.kind!r}"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexMismatchError(f"index at {directory} does not use inner product")
        if info.kind == "ivf_pq_refine" and not isinstance(
            faiss.downcast_index(index.base_index), faiss.IndexIVFPQFastScan
        ):
            raise IndexMismatchError(f"index at {directory} does not refine an IVF fast-scan PQ")
        if IVFDATA_FILE in info.sha256:
            lists = directory / IVFDATA_FILE
            if not lists.exists():
                raise FileNotFoundError(f"index folder {directory} lacks {IVFDATA_FILE}")
            try:
                ivflists.map_ivf_lists(index, lists)
            except (ivflists.IvfListsError, RuntimeError) as err:
                raise IndexCorruptError(f"cannot map {lists}: {err}") from err
        if info.kind == "hnsw":
            index.hnsw.efSearch = int(ef_search or info.params.get("ef_search", 64))
        elif info.kind in IVF_KINDS:
            faiss.extract_index_ivf(index).nprobe = int(nprobe or info.params.get("nprobe", 32))
        if info.kind == "ivf_pq_refine":
            index.k_factor = float(refine_k_factor or info.params.get("refine_k_factor", 8))
        if mmap:
            released = libc.release_file_pages(directory / INDEX_FILE)
            log.debug("released %d bytes of %s's mapping", released, directory / INDEX_FILE)
        if isinstance(catalog, pa.Table):
            missing = [c for c in CATALOG_COLUMNS if c not in catalog.column_names]
            if missing:
                raise IndexCorruptError(f"{directory / CATALOG_FILE} lacks columns {missing}")
        log.info(
            "global index loaded from %s: %s, n=%d, dim=%d, encoder %s",
            directory,
            info.kind,
            info.n,
            info.dim,
            info.encoder_id,
        )
        try:
            out = cls(index, catalog, info, directory, device_types)
            out.search_threads = None if threads is None else int(threads)
        except (pa.ArrowInvalid, OSError) as err:
            raise IndexCorruptError(f"cannot read {directory / CATALOG_FILE}: {err}") from err
        del catalog
        pa.default_memory_pool().release_unused()  # the pool keeps freed pages otherwise
        return out

    @property
    def nprobe(self) -> int | None:
        """IVF lists searched per query; None for the flat and HNSW kinds."""
        if self.info.kind not in IVF_KINDS:
            return None
        import faiss

        return int(faiss.extract_index_ivf(self.index).nprobe)

    def search(
        self,
        query_vecs: np.ndarray,
        k: int,
        device_types: bool = True,
        texts: Sequence[str] | None = None,
        nlu_labels: bool = True,
    ) -> list[list[RetrievedCandidate]]:
        """Top-``k`` catalog entries per query by inner product: the cosine, or with a lexical
        channel (:mod:`rewrite.lexical`, ``self.lexical``) by ``w * cosine + (1 - w) * n-gram
        cosine + beta * prior``. Either way each candidate's ``dense_score`` is its dense
        cosine (with a channel, from the dense block of the hit's stored vector).

        Args:
            query_vecs: ``(n, dim)`` float32, L2-normalised query vectors (a ``(dim,)`` vector
                is taken as one query).
            k: results per query (fewer when the catalog is smaller).
            texts: the ``n`` normalized query texts; required when the index has a lexical
                channel (their n-grams are appended to the vectors), ignored otherwise.
            device_types: fill each candidate's ``device_types`` tuple; False leaves them in
                the index (``catalog_row`` points there) for :meth:`device_features` — the
                online service's choice: building the tuples was ~13 % of the time its
                worker threads held the GIL under load.
            nlu_labels: fill each candidate's ``domain`` and ``intent``; False leaves them
                ``""`` (``catalog_row`` says where they are) — the online service's choice:
                neither the ranker nor the response reads them, and decoding strings from the
                catalog was 6.6 % of the time the service held the GIL under load (four of
                a request's seven string-column reads were these two columns).

        Returns:
            Per query, candidates best first, ``layer="global"``, catalog metadata filled.

        Raises:
            ValueError: wrong shape, ``k < 1``, or a lexical channel without one text per
                query.
        """
        x = np.asarray(query_vecs, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"query vectors must be (n, {self.dim}), got {x.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.lexical is not None and (texts is None or len(texts) != x.shape[0]):
            raise ValueError(
                f"index at {self.directory} has a lexical channel: search needs one query "
                f"text per vector ({x.shape[0]} vectors, "
                f"{'no' if texts is None else len(texts)} texts)"
            )
        if self.info.n == 0 or x.shape[0] == 0:
            return [[] for _ in range(x.shape[0])]
        if self.lexical is not None and texts is not None:  # texts: checked above
            x = self.lexical.query_vectors(x, texts)
        if self.search_threads is not None:
            faiss_threads_on_this_thread(self.search_threads)
        scores, ids = self.index.search(np.ascontiguousarray(x), min(k, self.info.n))
        found = ids >= 0  # FAISS pads with -1 when fewer than k entries are reachable
        rows, hit_scores = ids[found].astype(np.int64), scores[found]
        if self.lexical is not None and len(rows):
            # ranked by the hybrid score; each candidate carries its dense cosine (the scale
            # of the personal layer's scores and of the ranker's `dense_cosine`): the dense
            # block of its indexed vector (as the index stores it: exact for flat and HNSW,
            # the 6- / 8-bit codes for the IVF kinds) against the query's, over w
            stored = self.index.reconstruct_batch(rows)
            query_of = np.nonzero(found)[0]
            dense = np.einsum("ij,ij->i", stored[:, : self.dim], x[query_of, : self.dim])
            hit_scores = dense / self.lexical.dense_weight
        flat = self._candidates(rows, hit_scores.tolist(), device_types, nlu_labels)
        out: list[list[RetrievedCandidate]] = []
        at = 0
        for n_found in found.sum(axis=1).tolist():
            out.append(flat[at : at + n_found])
            at += n_found
        return out
