"""Build the FAISS global index from the catalog (the nightly job's index stage).

:func:`encode_and_index` encodes every catalog text with the DPR passage tower
(:class:`rewrite.encoder.PassageEncoder`, L2-normalised 384-d vectors) and writes an index
folder that :class:`rewrite.retrieval.GlobalIndex` loads:

- ``index.faiss``: exact ``faiss.IndexFlatIP`` up to ``dpr.flat_max_entries`` entries,
  ``faiss.IndexHNSWFlat`` (inner product, ``M = dpr.hnsw_m``, ``efConstruction`` =
  :data:`EF_CONSTRUCTION`, ``efSearch = dpr.hnsw_ef_search``) up to ``dpr.ivf_min_entries``,
  and an inverted file above (``dpr.ivf_kind``; a flat coarse quantizer of :func:`ivf_nlist`
  centroids trained by k-means, ``nprobe = dpr.ivf_nprobe`` lists searched; Jégou et al.,
  "Product quantization for nearest neighbor search", TPAMI 2011):

  - ``ivf_pq_refine`` (default): ``IVF<nlist>,PQ<dim/4>x4fs,Refine(SQ6)`` — the lists hold
    4-bit product-quantization codes scanned with SIMD lookup tables held in registers
    (``faiss.IndexIVFPQFastScan``; André, Kermarrec & Le Scouarnec, "Cache locality is not
    enough: high-performance nearest neighbor search with product quantization fast scan",
    VLDB 2015), and the ``dpr.ivf_refine_k_factor * k`` best of them are re-scored with
    6-bit scalar-quantized vectors (``faiss.IndexRefine`` over ``faiss.IndexScalarQuantizer``),
    48 + 288 bytes per 384-d vector;
  - ``ivf_sq8``: ``IVF<nlist>,SQ8`` (``faiss.IndexIVFScalarQuantizer``, 8-bit scalar-quantized
    vectors, 384 bytes each, every vector of the probed lists decoded and scored).

  Measured at 1M entries (``bench/bench_index.py``, one thread, k = 10, refine k_factor 8):
  ``ivf_pq_refine`` finds the same top-1 as ``ivf_sq8`` (recall@1 equal on random vectors,
  0.006-0.009 lower on low-rank ones) in 2.3-2.4x less time at nprobe 32 and 3.1-3.4x at 64,
  in 337 instead of 380 MB. FAISS id i = catalog row i.
  Thresholds and parameters were chosen with ``bench/bench_index.py``.
  With ``dpr.lexical.enabled`` (default) the indexed vectors carry the lexical channel
  (:mod:`rewrite.lexical`, :func:`lexical_passage_vectors`): 384 + 128 = 512 dimensions of
  ``[w * dense, (1 - w) * hashed char n-grams, beta * log-frequency prior]``, its settings in
  ``index.json`` ``params["lexical"]``; queries get the matching ``[dense, n-grams, 1]``.
- ``catalog.parquet``: the id sidecar (:data:`rewrite.retrieval.CATALOG_COLUMNS`, in id order;
  duplicate texts dropped, missing metadata filled with defaults);
- ``catalog.arrow``: the same catalog as the service reads it
  (:class:`rewrite.retrieval.CatalogColumns`: nulls filled, text hashes sorted, device-type
  counts flattened), one uncompressed Arrow IPC batch the service memory-maps;
- ``index.json`` (:class:`rewrite.retrieval.IndexInfo`), written last, so a folder without it is
  incomplete. Files are written under temporary names and renamed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rewrite import ivflists
from rewrite.config import DprSettings
from rewrite.encoder import PassageEncoder
from rewrite.ivflists import IVFDATA_FILE
from rewrite.lexical import LexicalChannel
from rewrite.retrieval import (
    CATALOG_FILE,
    CATALOG_SCHEMA,
    COLUMNS_FILE,
    INDEX_FILE,
    INDEX_META,
    IVF_KINDS,
    CatalogColumns,
    IndexInfo,
    sha256_file,
)

log = logging.getLogger(__name__)

#: Rows per Parquet row group of ``catalog.parquet`` (bounded decode memory at load).
CATALOG_ROW_GROUP = 65_536

EF_CONSTRUCTION = 80
"""HNSW ``efConstruction`` (build-time search breadth; bench/bench_index.py)."""

_DEFAULTS: dict[str, Any] = {
    "frequency": 0,
    "n_users": 0,
    "success_rate": 0.0,
    "domain": "",
    "intent": "",
    "last_seen": -1.0,
    "device_types": None,  # no device-type data
}


def normalize_catalog(table: pa.Table) -> pa.Table:
    """The catalog in :data:`CATALOG_SCHEMA`: columns cast, nulls and missing metadata columns
    filled with defaults (``last_seen`` -1 = unknown; a timestamp column becomes epoch
    seconds; ``device_types`` null = no device-type data), empty texts and repeated texts
    (after the first) dropped.

    Raises:
        ValueError: no ``text`` column.
    """
    if "text" not in table.column_names:
        raise ValueError(f"catalog has no 'text' column (columns: {table.column_names})")
    n = table.num_rows
    cols: dict[str, pa.Array] = {}
    for fld in CATALOG_SCHEMA:
        if fld.name not in table.column_names:
            cols[fld.name] = pa.array([_DEFAULTS[fld.name]] * n, type=fld.type)
            continue
        col = table.column(fld.name)
        if fld.name == "last_seen" and pa.types.is_timestamp(col.type):
            col = pc.divide(pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64()), 1e6)
        col = pc.cast(col, fld.type)
        if fld.name != "text" and _DEFAULTS[fld.name] is not None:
            col = pc.fill_null(col, pa.scalar(_DEFAULTS[fld.name], type=fld.type))
        cols[fld.name] = col
    out = pa.table(cols, schema=CATALOG_SCHEMA)
    texts = out.column("text").to_pylist()
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        if t and t not in seen:
            seen.add(t)
            keep.append(i)
    if len(keep) != n:
        log.warning("catalog: dropped %d empty or repeated texts of %d", n - len(keep), n)
        out = out.take(pa.array(keep, type=pa.int64()))
    return out


IVF_TRAIN_PER_LIST = 40
"""k-means training points per IVF list (FAISS warns below 39)."""


def choose_kind(
    n: int,
    flat_max_entries: int,
    ivf_min_entries: int | None = None,
    ivf_kind: str = "ivf_pq_refine",
) -> str:
    """``"flat"`` (exact IndexFlatIP) when ``n <= flat_max_entries``, ``ivf_kind``
    (``"ivf_pq_refine"`` or ``"ivf_sq8"``) when ``ivf_min_entries`` is set and
    ``n > ivf_min_entries``, else ``"hnsw"``.

    Raises:
        ValueError: ``ivf_kind`` is not an inverted-file kind.
    """
    if ivf_kind not in IVF_KINDS:
        raise ValueError(f"ivf_kind must be one of {IVF_KINDS}, got {ivf_kind!r}")
    if n <= flat_max_entries:
        return "flat"
    if ivf_min_entries is not None and n > ivf_min_entries:
        return ivf_kind
    return "hnsw"


def pq_subquantizers(dim: int) -> int:
    """Sub-quantizers of the fast-scan PQ: ``dim / 4`` (4 dimensions per 4-bit code, 96 for
    384-d) when 4 divides ``dim``, else ``dim / 2`` when 2 does, else ``dim``."""
    for per_code in (4, 2):
        if dim % per_code == 0:
            return dim // per_code
    return dim


def ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: ``sqrt(n)`` (1,000 at 1M), at least 1 and at most
    ``n // IVF_TRAIN_PER_LIST`` so k-means has enough points.

    FAISS's guideline of 4-16 sqrt(n) assumes the coarse quantizer is cheap next to the list
    scan; with 4-bit fast-scan lists it is not: at 1M entries, 4,000 flat centroids cost 0.22
    of a 0.46 ms search (one query, one thread). Measured (``bench/bench_index.py --nlist
    4000,1000``, 1M vectors, 1,000 queries, 2026-12-06, AVX-512 Xeon): sqrt(n) lists at
    nprobe 40 reach recall@1 0.906 / 0.887 (random / low-rank) in 0.40-0.41 ms against 0.878 /
    0.828 in 0.47-0.48 ms for 4 sqrt(n) at nprobe 64, and build 4x faster (8 instead of
    34-36 s)."""
    return max(1, min(int(np.sqrt(max(n, 1))), n // IVF_TRAIN_PER_LIST))


def make_faiss_index(
    vectors: np.ndarray,
    kind: str,
    hnsw_m: int = 32,
    ef_construction: int = EF_CONSTRUCTION,
    ef_search: int = 64,
    nprobe: int = 32,
    seed: int = 0,
    refine_k_factor: int = 8,
    nlist: int | None = None,
) -> Any:
    """A FAISS inner-product index over ``vectors`` (``(n, dim)`` float32, L2-normalised).

    The inverted-file kinds (``ivf_pq_refine``, ``ivf_sq8``; see the module docstring) train
    their coarse quantizer (k-means, ``nlist`` lists, default :func:`ivf_nlist`; a benchmark
    may ask for others) and codebooks on at most
    ``IVF_TRAIN_PER_LIST * nlist`` rows drawn with ``seed``, so a rebuild is deterministic;
    ``refine_k_factor``: ``ivf_pq_refine`` re-scores this many times ``k`` PQ candidates.

    Raises:
        ValueError: unknown ``kind`` or a non-2-D input.
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be (n, dim), got {x.shape}")
    dim = x.shape[1]
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    elif kind in IVF_KINDS:
        nlist = nlist or ivf_nlist(len(x))
        spec = (
            f"IVF{nlist},SQ8"
            if kind == "ivf_sq8"
            else f"IVF{nlist},PQ{pq_subquantizers(dim)}x4fs,Refine(SQ6)"
        )
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        sample = x
        if len(x) > IVF_TRAIN_PER_LIST * nlist:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(len(x), IVF_TRAIN_PER_LIST * nlist, replace=False))
            sample = x[rows]
        ivf.cp.seed = seed
        if kind == "ivf_pq_refine":
            base: Any = faiss.downcast_index(index.base_index)
            base.pq.cp.seed = seed
            index.k_factor = refine_k_factor
        index.train(sample)
        ivf.nprobe = nprobe
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat | hnsw | {' | '.join(IVF_KINDS)})")
    if len(x):
        index.add(x)
    return index


def _replace_into(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_index_dir(
    vectors: np.ndarray,
    catalog: pa.Table,
    out_dir: Path,
    encoder_id: str,
    settings: DprSettings,
    version: str = "",
    ef_construction: int = EF_CONSTRUCTION,
    threads: int | None = None,
) -> IndexInfo:
    """Index ``vectors`` (row i = catalog row i) and write the index folder.

    Args:
        vectors: ``(n, dim)`` float32, L2-normalised passage vectors.
        catalog: the catalog in :data:`CATALOG_SCHEMA` (see :func:`normalize_catalog`), n rows.
        out_dir: the index folder (created; an older index there is replaced).
        encoder_id: the passage encoder's ``encoder_id``.
        settings: ``dpr`` settings (``flat_max_entries``, ``hnsw_m``, ``hnsw_ef_search``,
            ``ivf_min_entries``, ``ivf_kind``, ``ivf_nprobe``, ``ivf_refine_k_factor``).
        version: the published version this index belongs to.
        threads: FAISS OpenMP threads for the build (None = FAISS default).

    Raises:
        ValueError: row counts differ.
    """
    import faiss

    if len(vectors) != catalog.num_rows:
        raise ValueError(f"{len(vectors)} vectors for {catalog.num_rows} catalog rows")
    lexical = settings.lexical.channel()
    if lexical is not None and vectors.ndim == 2:
        vectors = lexical_passage_vectors(lexical, vectors, catalog)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_META).unlink(missing_ok=True)  # incomplete until index.json is back
    if threads is not None:
        faiss.omp_set_num_threads(int(threads))
    n = len(vectors)
    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    kind = choose_kind(n, settings.flat_max_entries, settings.ivf_min_entries, settings.ivf_kind)
    t0 = time.perf_counter()
    index = make_faiss_index(
        vectors,
        kind,
        settings.hnsw_m,
        ef_construction,
        settings.hnsw_ef_search,
        nprobe=settings.ivf_nprobe,
        refine_k_factor=settings.ivf_refine_k_factor,
    )
    build_s = time.perf_counter() - t0
    pid = os.getpid()
    tmp_index = out_dir / f".{INDEX_FILE}.tmp-{pid}"
    tmp_cat = out_dir / f".{CATALOG_FILE}.tmp-{pid}"
    tmp_lists = out_dir / f".{IVFDATA_FILE}.tmp-{pid}"
    lists_file = kind == "ivf_pq_refine"  # index format 2: the fast-scan lists apart
    if lists_file:
        # the lists go to a file of their own that the service maps (rewrite.ivflists);
        # index.faiss keeps empty ones (the in-memory lists are not needed after this)
        ivflists.write_ivf_lists(index, tmp_lists)
        empty = ivflists.empty_lists_like(index)
        faiss.extract_index_ivf(index).replace_invlists(empty, True)
        empty.thisown = False
    faiss.write_index(index, str(tmp_index))
    # row groups of 64k rows: the service reads `device_types` batch by batch (GlobalIndex.load)
    table = catalog.cast(CATALOG_SCHEMA)
    pq.write_table(table, tmp_cat, row_group_size=CATALOG_ROW_GROUP)
    # the same table as the service's mapped columns: no decode or hashing at load, pages
    # shared by the service processes
    tmp_cols = out_dir / f".{COLUMNS_FILE}.tmp-{pid}"
    CatalogColumns.from_table(table).write(tmp_cols)
    _replace_into(tmp_index, out_dir / INDEX_FILE)
    _replace_into(tmp_cat, out_dir / CATALOG_FILE)
    _replace_into(tmp_cols, out_dir / COLUMNS_FILE)
    if lists_file:
        _replace_into(tmp_lists, out_dir / IVFDATA_FILE)
    else:  # an older ivf_pq_refine index in this folder leaves no stale lists behind
        (out_dir / IVFDATA_FILE).unlink(missing_ok=True)
    params: dict[str, Any] = {"build_seconds": round(build_s, 3)}
    if kind == "hnsw":
        params.update(
            hnsw_m=settings.hnsw_m,
            ef_construction=ef_construction,
            ef_search=settings.hnsw_ef_search,
        )
    elif kind in IVF_KINDS:
        params.update(nlist=int(faiss.extract_index_ivf(index).nlist), nprobe=settings.ivf_nprobe)
        if kind == "ivf_pq_refine":
            params.update(refine_k_factor=settings.ivf_refine_k_factor)
    if lexical is not None:
        params.update(lexical=lexical.to_params())
    info = IndexInfo(
        version=version,
        encoder_id=encoder_id,
        dim=dim,
        n=n,
        kind=kind,
        sha256={
            name: sha256_file(out_dir / name)
            for name in (INDEX_FILE, CATALOG_FILE, COLUMNS_FILE)
            + ((IVFDATA_FILE,) if lists_file else ())
        },
        params=params,
        built_unix=round(time.time(), 3),
    )
    tmp_meta = out_dir / f".{INDEX_META}.tmp-{pid}"
    tmp_meta.write_text(info.to_json())
    _replace_into(tmp_meta, out_dir / INDEX_META)
    log.info("index written to %s: %s, n=%d, %.2f s build", out_dir, kind, n, build_s)
    return info


def lexical_passage_vectors(
    lexical: LexicalChannel, vectors: np.ndarray, catalog: pa.Table, chunk: int = 65_536
) -> np.ndarray:
    """The index's passage vectors with the lexical channel (:mod:`rewrite.lexical`) appended.

    Args:
        lexical: the channel.
        vectors: ``(n, d)`` float32, L2-normalised dense passage vectors (row i = catalog row i).
        catalog: the n-row catalog (``text``, ``frequency``).
        chunk: rows hashed per step (bounds the temporary n-gram arrays).

    Returns:
        ``(n, d + lexical.dims)`` float32 (see :meth:`LexicalChannel.passage_vectors`; the
        prior is normalised by the whole catalog's largest frequency).
    """
    n = len(vectors)
    texts = pc.fill_null(catalog.column("text"), "")
    freq = pc.fill_null(catalog.column("frequency"), 0).to_numpy().astype(np.float64)
    out = np.empty((n, vectors.shape[1] + lexical.dims), dtype=np.float32)
    top = float(freq.max()) if n else 0.0
    for s in range(0, n, chunk):
        rows = slice(s, min(n, s + chunk))
        out[rows] = lexical.passage_vectors(
            vectors[rows], texts.slice(s, chunk).to_pylist(), freq[rows], max_frequency=top
        )
    return out


def encode_catalog(
    encoder: PassageEncoder, texts: list[str], chunk: int = 1024, progress: bool = True
) -> np.ndarray:
    """Passage vectors of ``texts``: ``(len(texts), dim)`` float32, L2-normalised."""
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    bar = tqdm(total=len(texts), desc="encode catalog", unit="text", disable=not progress)
    for s in range(0, len(texts), chunk):
        out[s : s + chunk] = encoder.encode(texts[s : s + chunk])
        bar.update(min(chunk, len(texts) - s))
    bar.close()
    return out


def encode_and_index(
    catalog: Path | pa.Table,
    encoder: PassageEncoder,
    out_dir: Path,
    settings: DprSettings,
    version: str = "",
    progress: bool = True,
) -> tuple[IndexInfo, list[str], np.ndarray]:
    """Encode the catalog with the passage tower and write the index folder.

    Args:
        catalog: ``catalog.parquet`` path or its table (columns ``text, frequency, n_users,
            success_rate, domain, intent, last_seen``; only ``text`` is required).
        encoder: the DPR passage encoder; its ``encoder_id`` goes into ``index.json``.
        out_dir: the index folder.
        settings: ``dpr`` settings.
        version: the published version id.
        progress: tqdm progress bar while encoding.

    Returns:
        The :class:`IndexInfo` written to ``index.json``, the indexed texts (row i = FAISS id
        i; normalized catalog, repeats dropped) and their ``(n, dim)`` float32 L2-normalised
        passage vectors (the exact vectors, also for a quantized index).

    Raises:
        FileNotFoundError: no catalog file; ValueError: no ``text`` column.
    """
    if isinstance(catalog, pa.Table):
        table = catalog
    else:
        if not Path(catalog).exists():
            raise FileNotFoundError(f"catalog not found: {catalog}")
        table = pq.read_table(catalog)
    table = normalize_catalog(table)
    texts: list[str] = table.column("text").to_pylist()
    t0 = time.perf_counter()
    vectors = encode_catalog(encoder, texts, progress=progress)
    log.info("encoded %d catalog texts in %.1f s", len(texts), time.perf_counter() - t0)
    if not len(texts):
        vectors = np.zeros((0, encoder.dim), dtype=np.float32)
    info = write_index_dir(vectors, table, out_dir, encoder.encoder_id, settings, version)
    return info, texts, vectors
