"""FAISS global index: exact IndexFlatIP vs HNSW, latency / memory / recall.

Data (``--data``):

- ``random`` (default): ``--n`` (default 200,000; the 1M figures below) random L2-normalised
  ``--dim``-d vectors (uniform on the sphere). The worst case for a graph index: no structure,
  every point about equally far.
- ``lowrank``: vectors on a random ``--rank``-dimensional subspace (closer to real sentence
  embeddings, whose intrinsic dimension is far below 384).
- ``texts``: real DPR embeddings of the utterances in ``--texts`` files (passage tower of
  ``--artifact``, default ``artifacts/dpr/LATEST``), ``--queries`` texts held out as queries.
- ``--from-index DIR``: an existing HNSW index folder (e.g. bench/bench_online.py's synthetic
  1M one), so a 1M build is paid once; its vectors are read back from the index.

Synthetic queries are ``--queries`` database entries plus Gaussian noise, re-normalised (cosine
~``1/sqrt(1 + noise^2)`` = 0.8 to their source at ``--noise 0.75``: one clearly best entry, like
a misrecognised utterance and its fix). Exact top-``--k`` (``IndexFlatIP``) is the ground truth.

Printed per configuration: build time (s), resident memory added by the index (MB, from
``/proc/self/statm``), single-query search latency p50/p99 (ms; one query per call, FAISS with
``--threads`` OpenMP threads = the online setting) at k = ``--k``, and for HNSW recall@1 (top-1
= exact top-1) and recall@k (share of the exact top-k found) per ``efSearch``. Flat latency is
measured on prefixes of the database (``--flat-sizes``) to place the flat/HNSW threshold. The
script ends with the settings the measurements suggest:

- ``flat_max_entries``: the largest flat size with p50 <= ``--budget-ms`` (0.5 ms: retrieval's
  share of the 2 ms online p50 target);
- ``hnsw_m`` / ``hnsw_ef_search``: the fastest measured (M, efSearch) with recall@1 >=
  ``--target-recall`` (0.95; real embeddings have near-duplicates, so exact top-1 agreement
  saturates below 1 while the reranker sees the whole top-k).

The HNSW index built here is cached under ``--cache`` (git-ignored ``data/bench/``), keyed by
n, dim, seed, M and efConstruction, so later runs skip the build; ``--no-cache`` rebuilds. The
default run (200k) takes ~4 minutes on 2 shared cores, most of it the HNSW build. A 1M HNSW
build (M=32, efConstruction 80, random vectors) took 1,667 s there, so measure 1M with
``--from-index`` on the index bench/bench_online.py caches, or ``--n 1000000`` once (cached).
:func:`synthetic_index_dir` writes a complete index folder for service benchmarks.

Measured (2 cores shared with other jobs; single-query latency at k=10, 1 thread)::

    index                                  build     memory    p50 ms  p99 ms  recall@1
    flat 5k / 10k / 20k                    0 s       7-29 MB   0.11 / 0.28 / 1.1   1.0
    flat 50k / 200k / 1M                   <=1.4 s   73-1465   3.6 / 15 / 84       1.0
    HNSW M=32 efC=80 ef=64, 1M random      1,667 s   1,725 MB  0.75    5.0     0.35
    HNSW same index, ef=16                                     0.22    1.5     0.12
    HNSW M=32 efC=80 ef=64, 200k low-rank  158 s     344 MB    0.33    8.3     1.00
    HNSW M=32 efC=80 ef=64, 29k real DPR   4.7 s     43 MB     0.11    0.18    0.976

Uniform random 384-d vectors are the worst case (recall@1 0.35 at efSearch 64, 0.76 at 256);
real sentence embeddings and low-rank data reach 0.98-1.0 at efSearch 64 (the low-rank row
was measured before 2026-12-06, when a seed mix-up put the queries' noise outside the data's
subspace, an easier task than today's ``--data lowrank``). Chosen defaults:
``flat_max_entries`` 10,000 (flat p50 <= 0.3 ms; at 20k the vectors no longer fit in cache),
``hnsw_m`` 32, ``hnsw_ef_search`` 64.

Inverted files (the job's kinds above ``dpr.ivf_min_entries``; nlist = 4 sqrt(n) = 4,000 at
1M until 2026-12-06), 1M vectors, k=10, 1 thread, 1,000 queries; AVX2-only EPYC, 2026-12-06
(``--m '' --flat-sizes '' --nprobe 16,32,64 --queries 1000``). Memory = serialized index
size::

    random          kind            build  memory   nprobe 16       32             64
                                                    p50 ms / recall@1
                    ivf_sq8          60 s  380 MB   0.43 / 0.651    0.71 / 0.770   1.26 / 0.878
                    ivf_pq_refine    63 s  337 MB   0.27 / 0.651    0.30 / 0.770   0.41 / 0.878
    lowrank (32)    ivf_sq8          82 s  380 MB   0.45 / 0.594    0.74 / 0.734   1.31 / 0.837
                    ivf_pq_refine   106 s  337 MB   0.26 / 0.591    0.31 / 0.728   0.39 / 0.828

(``ivf_pq_refine`` at k_factor 8; k_factor 4 saves 0.01-0.03 ms and loses 0.005-0.02 of
recall@10.) ``ivf_pq_refine`` scans 4-bit PQ codes with SIMD and re-scores the best
``k_factor * k`` with 6-bit vectors, so its cost grows slowly with nprobe, where ``ivf_sq8``
decodes every vector of every probed list. Hence ``dpr.ivf_kind`` ``ivf_pq_refine`` and
``dpr.ivf_nprobe`` 64 (more recall than ``ivf_sq8`` at 32 in about half the time).

Then the list count (``--ivf-kinds ivf_pq_refine --nlist 4000,1000 --nprobe 24,40,64
--k-factors 8 --queries 1000``, with and without ``--data lowrank``; AVX-512 Xeon,
2026-12-06)::

    p50 ms / recall@1        nprobe 24        40               64               build
    random   nlist 4,000     0.36 / 0.719     0.41 / 0.809     0.48 / 0.878     36 s
             nlist 1,000     0.30 / 0.845     0.40 / 0.906     0.54 / 0.949      8 s
    lowrank  nlist 4,000     0.36 / 0.668     0.40 / 0.765     0.47 / 0.828     34 s
             nlist 1,000     0.31 / 0.794     0.41 / 0.887     0.53 / 0.931      8 s

With fast-scan lists the flat coarse quantizer is not cheap: 4,000 centroids x 384 floats
(6 MB) are read per query, 0.22 of a 0.46 ms search. sqrt(n) lists scan more codes per probe
but rank 4x fewer centroids, so at equal time they find more (0.906 against 0.809 at 0.40 ms)
and at nprobe 40 beat the former default (4,000 lists, nprobe 64) on recall and time alike;
the build is 4x faster. Hence ``offline.index.ivf_nlist`` = sqrt(n) and ``dpr.ivf_nprobe``
40 (memory 330 instead of 337 MB). Earlier,
on an AVX-512 machine (2026-11-23), ``ivf_sq8`` against HNSW at 1M random vectors: a quarter
of the memory, a 13x faster build, half the latency at nprobe 32 and more than twice the
recall@1, hence ``ivf_min_entries`` 200,000.

Usage::

    python bench/bench_index.py                                  # 200k random, ~4 min
    python bench/bench_index.py --n 200000 --m 16,32 --data lowrank
    python bench/bench_index.py --from-index var/bench/online-index/n1000000-s0-<key>
    python bench/bench_index.py --data texts --texts ../shared/data/slurp/lm.txt runs/sim/*.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from offline.index import EF_CONSTRUCTION, make_faiss_index, write_index_dir  # noqa: E402
from rewrite.config import DprSettings  # noqa: E402

log = logging.getLogger("bench_index")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process, MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def subspace_basis(rng: np.random.Generator, rank: int, dim: int) -> np.ndarray:
    """``(rank, dim)`` float32 random basis of a ``rank``-dimensional subspace (the first draw
    from ``rng``), scaled by ``1 / sqrt(rank)``; shared by :func:`unit_rows` and
    :func:`make_queries`, so queries perturb within the data's own subspace."""
    return rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)


def unit_rows(
    n: int, dim: int, seed: int, rank: int | None = None, chunk: int = 100_000
) -> np.ndarray:
    """``(n, dim)`` float32 rows, L2-normalised (generated in chunks).

    ``rank`` None: isotropic Gaussian rows (uniform on the sphere; the worst case for graph
    indexes: no structure, every point about equally far). ``rank`` r: ``normalize(z @ A)`` with
    ``z ~ N(0, I_r)`` and a fixed random ``(r, dim)`` ``A``, i.e. vectors on an r-dimensional
    subspace, closer to real sentence embeddings, whose intrinsic dimension is far below 384.
    """
    rng = np.random.default_rng(seed)
    basis = None if rank is None else subspace_basis(rng, rank, dim)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        if basis is None:
            x = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            x = rng.standard_normal((m, basis.shape[0]), dtype=np.float32) @ basis
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_queries(
    db: np.ndarray,
    n: int,
    noise: float,
    seed: int,
    rank: int | None = None,
    data_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` perturbed database rows (re-normalised) and their source row ids; with ``rank``
    the noise lies in the data's subspace: the basis of :func:`unit_rows` with ``data_seed``
    (the seed the database was generated with), coefficients drawn from ``seed``."""
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(len(db), size=n, replace=False)
    if rank is None:
        g = rng.standard_normal((n, db.shape[1]), dtype=np.float32) / np.sqrt(db.shape[1])
    else:
        data_rng = np.random.default_rng(seed if data_seed is None else data_seed)
        g = rng.standard_normal((n, rank), dtype=np.float32) @ subspace_basis(
            data_rng, rank, db.shape[1]
        )
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = db[src] + noise * g
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), src


def read_texts(paths: Sequence[str]) -> list[str]:
    """Unique normalized utterances of text files (one per line) or turn logs / JSONL
    (``utterance`` or ``text`` field), in first-seen order."""
    import json

    from rewrite.normalize import normalize_utterance

    seen: dict[str, None] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            text = line
            if line.startswith("{"):
                row = json.loads(line)
                text = row.get("utterance") or row.get("text") or ""
            norm = normalize_utterance(text)
            if norm:
                seen.setdefault(norm, None)
    return list(seen)


def text_vectors(
    paths: Sequence[str], n_queries: int, artifact: str | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Real sentence embeddings: the DPR artifact's passage vectors of the texts in ``paths``
    (``n_queries`` random texts held out) and its query vectors of the held-out texts."""
    from rewrite.config import load_settings
    from rewrite.encoder import PassageEncoder, QueryEncoder, resolve_dpr_artifact

    texts = read_texts(paths)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(texts), size=n_queries, replace=False).tolist())
    dpr = load_settings().dpr
    art = (
        Path(artifact) if artifact else resolve_dpr_artifact(Path(dpr.artifacts_dir), dpr.artifact)
    )
    t = time.perf_counter()
    db = PassageEncoder.load(art, threads=2).encode(
        [x for i, x in enumerate(texts) if i not in held]
    )
    q = QueryEncoder.load(art, threads=2).encode([texts[i] for i in sorted(held)])
    print(f"encoded {len(texts)} texts with {art.name} in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)  # fmt: skip
    return db, q


def latencies_ms(index: Any, queries: np.ndarray, k: int, warmup: int = 5) -> np.ndarray:
    """Wall time of one ``index.search`` per query (ms)."""
    for q in queries[:warmup]:
        index.search(q[None, :], k)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        index.search(q[None, :], k)
        out[i] = (time.perf_counter() - t) * 1e3
    return out


@dataclass
class Row:
    """One line of the result table."""

    kind: str
    n: int
    params: str
    build_s: float
    mem_mb: float
    p50_ms: float
    p99_ms: float
    recall1: float = 1.0
    recallk: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def _cache_key(n: int, dim: int, seed: int, m: int, efc: int) -> str:
    return hashlib.sha256(f"{n}-{dim}-{seed}-{m}-{efc}".encode()).hexdigest()[:12]


def hnsw_index(
    db: np.ndarray, m: int, efc: int, seed: int, cache: Path | None
) -> tuple[Any, float, float, bool]:
    """Build (or load from ``cache``) an HNSW index. Returns (index, build_s, mem_mb, cached)."""
    import faiss

    path = None
    if cache is not None:
        path = cache / f"hnsw-{len(db)}-{_cache_key(len(db), db.shape[1], seed, m, efc)}.faiss"
        if path.exists():
            r0 = rss_mb()
            index = faiss.read_index(str(path))
            return index, float("nan"), rss_mb() - r0, True
    r0 = rss_mb()
    t = time.perf_counter()
    index = make_faiss_index(db, "hnsw", hnsw_m=m, ef_construction=efc)
    build_s = time.perf_counter() - t
    mem = rss_mb() - r0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(path))
    return index, build_s, mem, False


def hnsw_rows(
    index: Any,
    label: str,
    build_s: float,
    mem: float,
    queries: np.ndarray,
    gt: np.ndarray,
    args: Any,
) -> list[Row]:
    """Latency and recall of one HNSW index for every ``efSearch`` in ``args.ef``."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = []
    for ef in args.ef:
        index.hnsw.efSearch = ef
        lat = latencies_ms(index, queries, args.k)
        _, ids = index.search(queries, args.k)
        r1 = float(np.mean(ids[:, 0] == gt[:, 0]))
        rk = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, gt, strict=True)]))
        p50, p99 = np.percentile(lat, [50, 99]).tolist()
        m = index.hnsw.nb_neighbors(1)  # M (level > 0 has M links; level 0 has 2M)
        rows.append(
            Row("hnsw", index.ntotal, f"{label} ef={ef}", build_s, mem, p50, p99, r1, rk,
                {"m": m, "ef": ef})
        )  # fmt: skip
    return rows


def ivf_rows(db: np.ndarray, queries: np.ndarray, gt: np.ndarray, args: Any) -> list[Row]:
    """Build each inverted-file kind in ``args.ivf_kinds`` the way the job does
    (:func:`offline.index.make_faiss_index`: ``IVF<ivf_nlist(n)>,SQ8`` or
    ``IVF<ivf_nlist(n)>,PQ<dim/4>x4fs,Refine(SQ6)``) and measure latency and recall for every
    ``nprobe`` in ``args.nprobe`` (and, for ``ivf_pq_refine``, every k_factor in
    ``args.k_factors``). Memory is the serialized index size (what ``faiss.read_index`` holds in
    the service; a freshly built index also keeps its lists' growth slack)."""
    import faiss

    rows = []
    for kind, nlist in itertools.product(args.ivf_kinds, args.nlist or [None]):
        faiss.omp_set_num_threads(args.build_threads)
        t = time.perf_counter()
        index = make_faiss_index(db, kind, nprobe=args.nprobe[0], nlist=nlist)
        build_s = time.perf_counter() - t
        mem = faiss.serialize_index(index).nbytes / 2**20
        ivf = faiss.extract_index_ivf(index)
        print(f"{kind} nlist={ivf.nlist}: build {build_s:.1f} s, {mem:.0f} MB", file=sys.stderr)
        faiss.omp_set_num_threads(args.threads)
        k_factors = args.k_factors if kind == "ivf_pq_refine" else [0]
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            for k_factor in k_factors:
                if k_factor:
                    index.k_factor = k_factor
                lat = latencies_ms(index, queries, args.k)
                _, ids = index.search(queries, args.k)
                r1 = float(np.mean(ids[:, 0] == gt[:, 0]))
                rk = float(
                    np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, gt, strict=True)])
                )
                p50, p99 = np.percentile(lat, [50, 99]).tolist()
                label = f"nlist={ivf.nlist} nprobe={nprobe}"
                label += f" kf={k_factor}" if k_factor else ""
                extra = {"nlist": int(ivf.nlist), "nprobe": nprobe, "k_factor": k_factor}
                rows.append(Row(kind, index.ntotal, label, build_s, mem, p50, p99, r1, rk, extra))
        del index, ivf
    return rows


def load_index_dir(directory: Path) -> tuple[Any, np.ndarray, float, float]:
    """An existing HNSW index folder (e.g. bench/bench_online.py's synthetic 1M one): the
    index, its stored vectors ``(n, dim)``, its recorded build seconds and the RSS it added."""
    import json

    import faiss

    r0 = rss_mb()
    index = faiss.read_index(str(Path(directory) / "index.faiss"))
    mem = rss_mb() - r0
    if not isinstance(index, faiss.IndexHNSWFlat):
        raise SystemExit(f"{directory} holds {type(index).__name__}, not IndexHNSWFlat")
    storage = faiss.downcast_index(index.storage)
    n, d = index.ntotal, index.d
    db = faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d)
    meta = json.loads((Path(directory) / "index.json").read_text())
    return index, db, float(meta.get("params", {}).get("build_seconds", float("nan"))), mem


def run(args: argparse.Namespace) -> list[Row]:
    """All measurements; prints progress to stderr."""
    import faiss

    rows: list[Row] = []
    t0 = time.perf_counter()
    rank = args.rank if args.data == "lowrank" else None
    loaded = None
    if args.from_index:
        loaded = load_index_dir(Path(args.from_index))
        db = loaded[1]
        args.n, args.dim = db.shape
        queries, _src = make_queries(db, args.queries, args.noise, args.seed + 7)
    elif args.data == "texts":
        db, queries = text_vectors(args.texts, args.queries, args.artifact, args.seed)
        args.n, args.dim = db.shape
    else:
        db = unit_rows(args.n, args.dim, args.seed, rank)
        queries, _src = make_queries(db, args.queries, args.noise, args.seed + 7, rank, args.seed)
    print(
        f"data: {args.data} {args.n} x {args.dim} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )

    faiss.omp_set_num_threads(args.build_threads)
    full = faiss.IndexFlatIP(args.dim)
    full.add(db)
    _, gt = full.search(queries, args.k)  # batched exact ground truth
    del full

    faiss.omp_set_num_threads(args.threads)
    for size in sorted({min(s, args.n) for s in args.flat_sizes}):
        r0 = rss_mb()
        t = time.perf_counter()
        flat = make_faiss_index(db[:size], "flat")
        build_s = time.perf_counter() - t
        mem = rss_mb() - r0
        nq = args.queries if size <= 200_000 else args.flat_queries
        lat = latencies_ms(flat, queries[:nq], args.k)
        rows.append(Row("flat", size, "-", build_s, mem, *np.percentile(lat, [50, 99]).tolist()))
        print(f"flat n={size}: p50 {rows[-1].p50_ms:.2f} ms", file=sys.stderr)
        del flat

    if args.nprobe:
        rows += ivf_rows(db, queries, gt, args)
    if loaded is not None:
        index, _, build_s, mem = loaded
        label = f"{Path(args.from_index).name}"
        return rows + hnsw_rows(index, label, build_s, mem, queries, gt, args)
    cache = None if args.no_cache or args.data == "texts" else Path(args.cache)
    for m in args.m:
        faiss.omp_set_num_threads(args.build_threads)
        seed_key = args.seed if rank is None else args.seed * 1000 + rank
        index, build_s, mem, cached = hnsw_index(db, m, args.ef_construction, seed_key, cache)
        print(f"hnsw M={m}: build {build_s:.1f} s{' (cached)' if cached else ''}", file=sys.stderr)
        label = f"M={m} efC={args.ef_construction}"
        rows += hnsw_rows(index, label, build_s, mem, queries, gt, args)
        del index
    return rows


def recommend(rows: Sequence[Row], budget_ms: float, target_recall: float) -> dict[str, Any]:
    """Settings from the measurements (see the module docstring)."""
    flat_ok = [r.n for r in rows if r.kind == "flat" and r.p50_ms <= budget_ms]
    hnsw = [r for r in rows if r.kind == "hnsw" and r.recall1 >= target_recall]
    best = min(hnsw, key=lambda r: (r.p50_ms, r.extra["ef"])) if hnsw else None
    return {
        "flat_max_entries": max(flat_ok) if flat_ok else None,
        "hnsw_m": best.extra["m"] if best else None,
        "hnsw_ef_search": best.extra["ef"] if best else None,
        "flat_p50_budget_ms": budget_ms,
        "target_recall@1": target_recall,
    }


def print_table(rows: Sequence[Row], k: int) -> None:
    """The result table on stdout."""
    head = (
        f"{'kind':13} {'n':>9} {'params':30} {'build_s':>8} {'mem_MB':>8} {'p50_ms':>7} "
        f"{'p99_ms':>7} {'recall@1':>8} {f'recall@{k}':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.kind:13} {r.n:>9} {r.params:30} {r.build_s:>8.1f} {r.mem_mb:>8.0f} "
            f"{r.p50_ms:>7.3f} {r.p99_ms:>7.3f} {r.recall1:>8.3f} {r.recallk:>9.3f}"
        )


def synthetic_index_dir(
    out_dir: Path,
    n: int,
    dim: int = 384,
    seed: int = 0,
    settings: DprSettings | None = None,
    encoder_id: str = "synthetic",
) -> Path:
    """A complete index folder (random unit vectors, texts ``"synthetic utterance <i>"``) for
    service benchmarks; reused when ``out_dir/index.json`` exists with the same n and dim."""
    import json

    import pyarrow as pa

    from offline.index import normalize_catalog

    meta = Path(out_dir) / "index.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("n") == n and info.get("dim") == dim:
            return Path(out_dir)
    db = unit_rows(n, dim, seed)
    catalog = normalize_catalog(
        pa.table(
            {
                "text": [f"synthetic utterance {i}" for i in range(n)],
                "frequency": np.full(n, 5, dtype=np.int64),
                "n_users": np.full(n, 3, dtype=np.int64),
                "success_rate": np.full(n, 0.9),
            }
        )
    )
    write_index_dir(db, catalog, Path(out_dir), encoder_id, settings or DprSettings())
    return Path(out_dir)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="database entries")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--data", choices=("random", "lowrank", "texts"), default="random")
    p.add_argument("--texts", nargs="*", default=[], help="--data texts: text/JSONL files")
    p.add_argument("--artifact", default=None, help="--data texts: DPR artifact (default LATEST)")
    p.add_argument("--from-index", default=None, help="measure an existing HNSW index folder")
    p.add_argument("--rank", type=int, default=32, help="subspace dimension of --data lowrank")
    p.add_argument("--queries", type=int, default=500, help="queries for latency and recall")
    p.add_argument("--flat-queries", type=int, default=100, help="queries for flat > 200k")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.75, help="query perturbation (see doc)")
    p.add_argument(
        "--flat-sizes", type=_ints, default=[10_000, 50_000, 100_000, 200_000, 1_000_000]
    )
    p.add_argument("--m", type=_ints, default=[32], help="HNSW M values")
    p.add_argument("--ef", type=_ints, default=[16, 32, 64, 128, 256], help="efSearch values")
    p.add_argument("--ef-construction", type=int, default=EF_CONSTRUCTION)
    p.add_argument(
        "--nprobe", type=_ints, default=[8, 16, 32, 64], help="IVF nprobe values ('' = skip)"
    )
    p.add_argument(
        "--nlist", type=_ints, default=[], help="IVF list counts ('' = the job's sqrt(n))"
    )
    p.add_argument(
        "--ivf-kinds",
        type=lambda v: [k for k in v.split(",") if k],
        default=["ivf_sq8", "ivf_pq_refine"],
        help="inverted-file kinds to build (comma-separated)",
    )
    p.add_argument(
        "--k-factors", type=_ints, default=[4, 8], help="ivf_pq_refine refine k_factor values"
    )
    p.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    p.add_argument("--build-threads", type=int, default=2, help="FAISS threads while building")
    p.add_argument("--budget-ms", type=float, default=0.5, help="flat p50 budget (ms)")
    p.add_argument("--target-recall", type=float, default=0.95, help="HNSW recall@1 target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(ROOT / "data" / "bench"), help="HNSW index cache")
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args)
    print_table(rows, args.k)
    rec = recommend(rows, args.budget_ms, args.target_recall)
    print(f"\nrecommended: {rec}")
    print(f"total {time.perf_counter() - t0:.0f} s, peak-ish RSS now {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
