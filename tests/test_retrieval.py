"""The FAISS global index: build (flat vs HNSW by size), search with catalog metadata, and the
checks that refuse a corrupt or mismatched index."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline.index import (
    choose_kind,
    encode_and_index,
    ivf_nlist,
    normalize_catalog,
    pq_subquantizers,
    write_index_dir,
)
from rewrite import libc, retrieval
from rewrite.config import DprSettings, LexicalSettings, Settings
from rewrite.hashing import stable_hash64
from rewrite.online import history_lookup
from rewrite.personal import UNKNOWN_ROW, PersonalHistory
from rewrite.retrieval import (
    CATALOG_FILE,
    COLUMNS_FILE,
    DEVICE_TYPES_TYPE,
    INDEX_FILE,
    INDEX_META,
    DeviceTypeStat,
    GlobalIndex,
    IndexCorruptError,
    IndexInfo,
    IndexMismatchError,
    RetrievedCandidate,
    StringColumn,
    sha256_file,
)

DIM = 32
ENCODER = "enc-test-0001"
#: random vectors, no query texts: these tests index without the lexical channel
#: (tests/test_lexical.py covers it)
DENSE_ONLY = LexicalSettings(enabled=False)


def catalog_table(n: int) -> pa.Table:
    if n == 0:
        return normalize_catalog(pa.table({"text": pa.array([], type=pa.string())}))
    return normalize_catalog(
        pa.Table.from_pylist(
            [
                {
                    "text": f"utterance {i}",
                    "frequency": 10 + i,
                    "n_users": 2 + i % 5,
                    "success_rate": 0.5 + (i % 50) / 100,
                    "domain": f"d{i % 3}",
                    "intent": f"i{i % 7}",
                    "last_seen": 1.7e9 + i,
                }
                for i in range(n)
            ]
        )
    )


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(
    tmp: Path,
    n: int,
    flat_max: int = 1000,
    ivf_min: int = 100_000,
    ivf_kind: str = "ivf_pq_refine",
    **kw: object,
) -> tuple[Path, np.ndarray]:
    vecs = unit_vectors(n)
    settings = DprSettings(
        flat_max_entries=flat_max,
        hnsw_m=16,
        hnsw_ef_search=64,
        ivf_min_entries=ivf_min,
        ivf_kind=ivf_kind,  # type: ignore[arg-type]
        lexical=DENSE_ONLY,
    )
    write_index_dir(vecs, catalog_table(n), tmp, ENCODER, settings, version="v1", **kw)  # type: ignore[arg-type]
    return tmp, vecs


def near(v: np.ndarray, seed: int, noise: float = 0.1) -> np.ndarray:
    q = v + noise * np.random.default_rng(seed).standard_normal(v.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=-1, keepdims=True)).astype(np.float32)


def test_choose_kind_by_size() -> None:
    assert choose_kind(0, 100) == "flat"
    assert choose_kind(100, 100) == "flat"
    assert choose_kind(101, 100) == "hnsw"
    assert choose_kind(101, 100, ivf_min_entries=200) == "hnsw"
    assert choose_kind(200, 100, ivf_min_entries=200) == "hnsw"
    assert choose_kind(201, 100, ivf_min_entries=200) == "ivf_pq_refine"
    assert choose_kind(201, 100, ivf_min_entries=200, ivf_kind="ivf_sq8") == "ivf_sq8"
    with pytest.raises(ValueError, match="ivf_kind"):
        choose_kind(201, 100, ivf_min_entries=200, ivf_kind="ivf_flat")
    assert ivf_nlist(1_000_000) == 1000 and ivf_nlist(3000) == 54 and ivf_nlist(10) == 1
    assert pq_subquantizers(384) == 96 and pq_subquantizers(32) == 8 and pq_subquantizers(6) == 3
    assert pq_subquantizers(7) == 7


@pytest.mark.parametrize("kind", ["ivf_pq_refine", "ivf_sq8"])
def test_ivf_index_builds_loads_and_finds_neighbours(tmp_path: Path, kind: str) -> None:
    """Above ``ivf_min_entries`` the job builds the configured inverted file
    (``IVF<nlist>,PQ<dim/4>x4fs,Refine(SQ6)`` or ``IVF<nlist>,SQ8``): the service loads it with
    the recorded (or a given) nprobe and refine k_factor, finds each query's source entry first
    with a cosine close to the exact one (quantized vectors), and a rebuild is byte-identical
    (seeded k-means for the coarse quantizer and the PQ codebooks)."""
    import faiss

    n = 3000
    directory, vecs = build(tmp_path / "a", n, flat_max=100, ivf_min=1000, ivf_kind=kind)
    info = json.loads((directory / INDEX_META).read_text())
    assert info["kind"] == kind and info["params"]["nlist"] == 54
    assert info["params"]["nprobe"] == 40
    index = GlobalIndex.load(directory, expected_encoder_id=ENCODER)
    assert index.nprobe == 40
    ivf = faiss.extract_index_ivf(index.index)
    if kind == "ivf_pq_refine":
        assert type(index.index) is faiss.IndexRefine and info["params"]["refine_k_factor"] == 8
        base = faiss.downcast_index(index.index.base_index)
        assert type(base) is faiss.IndexIVFPQFastScan and base.pq.M == DIM // 4
        assert base.pq.nbits == 4 and index.index.k_factor == 8
        tuned = GlobalIndex.load(directory, nprobe=5, refine_k_factor=2)
        assert tuned.nprobe == 5 and tuned.index.k_factor == 2
    else:
        assert type(index.index) is faiss.IndexIVFScalarQuantizer and ivf.nprobe == 40
        assert "refine_k_factor" not in info["params"]
        assert GlobalIndex.load(directory, nprobe=5).nprobe == 5
    rows = list(range(0, n, 97))
    queries = near(vecs[rows], seed=2)
    for row, q, res in zip(rows, queries, index.search(queries, k=5), strict=True):
        assert res[0].text == f"utterance {row}" and res[0].frequency == 10 + row
        assert res[0].dense_score == pytest.approx(float(vecs[row] @ q), abs=0.02)
    again, _ = build(tmp_path / "b", n, flat_max=100, ivf_min=1000, ivf_kind=kind)
    assert (again / INDEX_FILE).read_bytes() == (directory / INDEX_FILE).read_bytes()


def _maps_of(path: Path) -> list[str]:
    return [
        line
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str(path.resolve()))
    ]


def test_ivf_lists_are_served_from_a_shared_read_only_mapping(tmp_path: Path) -> None:
    """``ivf_pq_refine`` keeps its fast-scan lists in ``index.ivfdata`` (format 2), served from
    a read-only shared mapping (FAISS ``OnDiskInvertedLists``): a search returns exactly what
    the same index with its lists in memory returns, list by list (sizes that are no multiple
    of the 32-entry block, empty ones, batches and lone queries), the file is unchanged by
    loading and searching, and ``index.faiss`` holds no list data."""
    import faiss

    from offline.index import make_faiss_index
    from rewrite.ivflists import IVFDATA_FILE, read_table

    n = 3000
    directory, vecs = build(tmp_path / "a", n, flat_max=100, ivf_min=1000)
    info = json.loads((directory / INDEX_META).read_text())
    assert info["format"] == 2 and IVFDATA_FILE in info["sha256"]
    index = GlobalIndex.load(directory)
    ivf = faiss.downcast_index(index.index.base_index)
    assert type(faiss.downcast_InvertedLists(ivf.invlists)) is faiss.OnDiskInvertedLists
    maps = _maps_of(directory / IVFDATA_FILE)
    assert maps and all(line.split()[1] == "r--s" for line in maps)  # read-only, shared
    # the same build with its lists in memory (the build is deterministic)
    memory = make_faiss_index(unit_vectors(n), "ivf_pq_refine", nprobe=40)
    mem_ivf = faiss.downcast_index(memory.base_index)
    sizes = [mem_ivf.invlists.list_size(i) for i in range(mem_ivf.nlist)]
    assert [ivf.invlists.list_size(i) for i in range(ivf.nlist)] == sizes
    assert any(s % 32 for s in sizes) and sum(sizes) == n
    assert read_table(directory / IVFDATA_FILE)[3][:, 0].tolist() == sizes
    queries = np.concatenate([near(vecs[::37], seed=5), unit_vectors(50, seed=9)])
    for nprobe in (1, 5, ivf.nlist):  # one list at a time, a few, every list
        ivf.nprobe = mem_ivf.nprobe = nprobe
        for batch in (queries, queries[:1]):
            got_d, got_i = index.index.search(batch, 10)
            want_d, want_i = memory.search(batch, 10)
            np.testing.assert_array_equal(got_i, want_i)
            np.testing.assert_array_equal(got_d, want_d)
    assert sha256_file(directory / IVFDATA_FILE) == info["sha256"][IVFDATA_FILE]
    faiss.write_index(memory, str(tmp_path / "full.faiss"))  # lists inside: codes and ids more
    full = (tmp_path / "full.faiss").stat().st_size
    assert full - (directory / INDEX_FILE).stat().st_size >= n * (8 + mem_ivf.M2 // 2)
    del index, ivf
    import gc

    gc.collect()
    assert _maps_of(directory / IVFDATA_FILE) == []  # unmapped with its index


def test_a_format_1_ivf_folder_still_loads_and_a_bad_lists_file_is_refused(
    tmp_path: Path,
) -> None:
    """A folder of the previous format (lists inside ``index.faiss``, no ``index.ivfdata``)
    loads and searches as before; a lists file that is missing, not one, or that disagrees
    with the index is refused with a clear error, also when checksums are not verified."""
    import faiss

    from offline.index import make_faiss_index
    from rewrite.ivflists import IVFDATA_FILE

    n = 3000
    directory, vecs = build(tmp_path / "a", n, flat_max=100, ivf_min=1000)
    new = GlobalIndex.load(directory)
    old = tmp_path / "old"
    old.mkdir()
    for name in (CATALOG_FILE, COLUMNS_FILE):
        (old / name).write_bytes((directory / name).read_bytes())
    faiss.write_index(
        make_faiss_index(unit_vectors(n), "ivf_pq_refine", nprobe=40), str(old / INDEX_FILE)
    )
    meta = json.loads((directory / INDEX_META).read_text())
    del meta["sha256"][IVFDATA_FILE]
    meta["sha256"][INDEX_FILE] = sha256_file(old / INDEX_FILE)
    (old / INDEX_META).write_text(json.dumps({**meta, "format": 1}))
    loaded = GlobalIndex.load(old)
    base = faiss.downcast_index(loaded.index.base_index)
    assert type(faiss.downcast_InvertedLists(base.invlists)) is faiss.BlockInvertedLists
    queries = near(vecs[::50], seed=4)
    assert loaded.search(queries, k=5) == new.search(queries, k=5)

    lists = directory / IVFDATA_FILE
    good = lists.read_bytes()
    lists.write_bytes(b"not a lists file" + good[16:])
    with pytest.raises(IndexCorruptError, match="not an inverted-lists file"):
        GlobalIndex.load(directory, verify=False)
    with pytest.raises(IndexCorruptError, match=f"{IVFDATA_FILE} is corrupt"):
        GlobalIndex.load(directory)
    # a list whose capacity stops inside its last block (the kernels read whole blocks)
    nlist = int(np.frombuffer(good[8:16], dtype="<i8")[0])
    table = np.frombuffer(good[32 : 32 + nlist * 24], dtype="<i8").reshape(nlist, 3).copy()
    cut = int(np.flatnonzero(table[:, 0] % 32)[0])
    table[cut, 1] = table[cut, 0]
    lists.write_bytes(good[:32] + table.tobytes() + good[32 + nlist * 24 :])
    with pytest.raises(IndexCorruptError, match="not whole blocks"):
        GlobalIndex.load(directory, verify=False)
    lists.write_bytes(good[: len(good) // 2])  # lists past its end
    with pytest.raises(IndexCorruptError, match="outside the file"):
        GlobalIndex.load(directory, verify=False)
    other, _ = build(tmp_path / "b", 2000, flat_max=100, ivf_min=1000)  # other list count
    lists.write_bytes((other / IVFDATA_FILE).read_bytes())
    with pytest.raises(IndexCorruptError, match="lists of"):
        GlobalIndex.load(directory, verify=False)
    lists.unlink()
    with pytest.raises(FileNotFoundError, match=IVFDATA_FILE):
        GlobalIndex.load(directory, verify=False)


def test_search_runs_faiss_on_the_configured_threads_of_any_thread(tmp_path: Path) -> None:
    """OpenMP's thread count is per thread, and a thread started after :meth:`load` (the
    service's online workers) starts from the machine's default: every search applies
    ``threads`` on the thread that searches, so a worker's batch does not fan out over every
    core. ``threads=None`` leaves the thread's own setting alone."""
    import threading

    import faiss

    directory, vecs = build(tmp_path / "a", 3000, flat_max=100, ivf_min=1000)
    seen: dict[str, int] = {}

    def worker(index: GlobalIndex, name: str) -> None:
        faiss.omp_set_num_threads(3)  # a fresh thread's default on a 3-core machine
        index.search(near(vecs[:4], seed=3), k=5)
        seen[name] = faiss.omp_get_max_threads()

    for name, index in (
        ("one", GlobalIndex.load(directory, threads=1)),
        ("two", GlobalIndex.load(directory, threads=2)),
        ("unset", GlobalIndex.load(directory, threads=None)),
    ):
        t = threading.Thread(target=worker, args=(index, name))
        t.start()
        t.join()
    assert seen == {"one": 1, "two": 2, "unset": 3}


def test_ivf_refine_rescores_the_fast_scan_candidates(tmp_path: Path) -> None:
    """The refine step is what ranks: with k_factor 1 the order is the 4-bit PQ's (coarse),
    with the default 8 the top-1 agrees with exact search on almost every query and the top-10
    far more often than PQ's, and the scores are the 6-bit vectors' inner products (close to
    the exact cosine). All lists probed, so only the codes differ."""
    n = 3000
    directory, vecs = build(tmp_path, n, flat_max=100, ivf_min=1000)
    queries = near(vecs[:200], seed=3)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]

    def overlap(index: GlobalIndex, k: int) -> float:
        found = [[int(c.text.split()[1]) for c in res] for res in index.search(queries, k=k)]
        return float(
            np.mean([len(set(f) & set(e[:k])) / k for f, e in zip(found, exact, strict=True)])
        )

    refined = GlobalIndex.load(directory, nprobe=54)  # every list
    coarse = GlobalIndex.load(directory, nprobe=54, refine_k_factor=1)
    assert overlap(refined, 1) >= 0.97 and overlap(refined, 1) > overlap(coarse, 1)
    assert overlap(refined, 10) > overlap(coarse, 10) + 0.2
    one_list = GlobalIndex.load(directory, nprobe=1)  # nprobe reaches the wrapped IVF
    assert overlap(one_list, 10) < overlap(refined, 10) - 0.2
    for c in refined.search(queries[:1], k=3)[0]:
        row = int(c.text.split()[1])
        assert c.dense_score == pytest.approx(float(vecs[row] @ queries[0]), abs=0.02)


def test_ivf_refine_over_another_base_is_refused(tmp_path: Path) -> None:
    """An ``index.json`` that says ``ivf_pq_refine`` over an index file whose refined base is
    not a fast-scan PQ inverted file (e.g. a hand-built ``IVF,Flat``) is refused."""
    import faiss

    directory, vecs = build(tmp_path, 3000, flat_max=100, ivf_min=1000)
    other = faiss.index_factory(DIM, "IVF75,Flat,Refine(SQ6)", faiss.METRIC_INNER_PRODUCT)
    other.train(vecs)
    other.add(vecs)
    faiss.write_index(other, str(directory / INDEX_FILE))
    meta = json.loads((directory / INDEX_META).read_text())
    meta["sha256"][INDEX_FILE] = sha256_file(directory / INDEX_FILE)
    (directory / INDEX_META).write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="fast-scan"):
        GlobalIndex.load(directory)
    meta["kind"] = "ivf_sq8"
    (directory / INDEX_META).write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="IndexRefine"):
        GlobalIndex.load(directory)


def test_catalog_membership_by_hash_finds_every_entry(tmp_path: Path) -> None:
    """``in`` and ``lookup`` (sorted 64-bit hashes + a text check) find every catalog text,
    its own row's metadata, and nothing else (prefixes, case, other types)."""
    directory, _ = build(tmp_path, 500, flat_max=1000)
    index = GlobalIndex.load(directory)
    for i in range(500):
        text = f"utterance {i}"
        assert text in index
        hit = index.lookup(text)
        assert hit is not None and hit.frequency == 10 + i and hit.intent == f"i{i % 7}"
    for other in ("utterance", "Utterance 1", "utterance 500", "", None, 3):
        assert other not in index
    assert index.lookup("utterance 5000") is None


def test_lookup_many_equals_one_lookup_per_text_and_walks_hash_collisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lookup_many`` (one hash search and one metadata gather for all texts) answers as
    :meth:`GlobalIndex.lookup` text by text, in order, None outside the catalog; a text whose
    hash is shared with other rows is still found by walking them."""
    directory, _ = build(tmp_path, 300, flat_max=1000)
    index = GlobalIndex.load(directory)
    texts = ["utterance 7", "nope", "utterance 299", "utterance 7", "", "utterance 0"]
    many = index.lookup_many(texts)
    assert many == [index.lookup(t) for t in texts]
    assert [c is None for c in many] == [False, True, False, False, True, False]
    assert many[0] is not None and many[0].catalog_row == 7 and many[0].frequency == 17
    assert index.lookup_many([]) == []
    # force collisions: every row gets the same hash, so each search lands on the first
    # row of the run and has to walk to its own text
    index._hash_sorted = np.zeros_like(index._hash_sorted)
    monkeypatch.setattr(retrieval, "_text_hash", lambda _text: 0)
    found = index.lookup_many(["utterance 250", "utterance 3", "missing"])
    assert [c.catalog_row if c else None for c in found] == [250, 3, None]


def test_history_lookup_searches_the_catalog_once_per_history_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The personal stage's catalog lookup (:func:`rewrite.online.history_lookup`) answers as
    ``lookup_many`` (device types and NLU labels left in the index), remembers each entry's
    catalog row in the history's ``catalog_rows`` (-1 for a text outside the catalog), counted
    in its ``nbytes``, and later requests with the same cached history search the catalog only
    for entries not looked up yet."""
    directory, _ = build(tmp_path, 300, flat_max=1000)
    index = GlobalIndex.load(directory)
    searched: list[list[str]] = []
    real = index.rows_of

    def spy(texts: Sequence[str]) -> np.ndarray:
        searched.append(list(texts))
        return real(texts)

    texts = ("utterance 7", "nope", "utterance 299", "utterance 3")
    expected = index.lookup_many(list(texts[:3]), device_types=False, nlu_labels=False)
    monkeypatch.setattr(index, "rows_of", spy)
    hist = PersonalHistory(
        "u", "v1", texts, np.ones(4, dtype=np.int64), np.zeros(4, dtype=np.float64)
    )
    assert hist.catalog_rows.tolist() == [UNKNOWN_ROW] * 4
    assert hist.nbytes == dataclasses.replace(hist).nbytes > 4 * 8 * 3
    assert history_lookup(hist, index, [0, 1, 2])(list(texts[:3])) == expected
    assert searched == [list(texts[:3])]
    assert hist.catalog_rows.tolist() == [7, -1, 299, UNKNOWN_ROW]
    # another request, same cached history: nothing searched again (also not the text outside
    # the catalog), a repeat answered twice, only the new entry searched
    again = history_lookup(hist, index, [1, 0])(["nope", "utterance 7", "utterance 7"])
    assert again == [None, expected[0], expected[0]] and len(searched) == 1
    both = history_lookup(hist, index, [3, 0])(["utterance 3", "utterance 7"])
    assert searched[-1] == ["utterance 3"] and [c.catalog_row for c in both if c] == [3, 7]
    # a new history object (another version, or re-read) starts with nothing remembered
    assert dataclasses.replace(hist).catalog_rows.tolist() == [UNKNOWN_ROW] * 4
    with pytest.raises(KeyError):
        history_lookup(hist, index, [0])(["utterance 3"])


def test_without_nlu_labels_candidates_differ_only_in_domain_and_intent(tmp_path: Path) -> None:
    """``nlu_labels=False`` (the service's search and history lookups) leaves domain and
    intent in the index and changes nothing else: same candidates, order, scores, metadata and
    catalog rows."""
    directory, vecs = build(tmp_path, 300, flat_max=1000)
    index = GlobalIndex.load(directory)
    queries = near(vecs[[5, 77, 210]], seed=4)
    full = index.search(queries, k=6, device_types=False)
    lean = index.search(queries, k=6, device_types=False, nlu_labels=False)
    assert any(c.domain and c.intent for res in full for c in res)  # the catalog has labels
    blank = [[dataclasses.replace(c, domain="", intent="") for c in res] for res in full]
    assert lean == blank
    assert [[c.catalog_row for c in res] for res in lean] == [
        [c.catalog_row for c in res] for res in full
    ]
    texts = ["utterance 7", "nope", "utterance 299"]
    many = index.lookup_many(texts, nlu_labels=False)
    assert many == [
        None if c is None else dataclasses.replace(c, domain="", intent="")
        for c in index.lookup_many(texts)
    ]
    assert index.lookup("utterance 7", nlu_labels=False) == many[0]


def test_string_column_reads_sliced_and_large_string_arrays() -> None:
    """``StringColumn`` honours an array's offset (a slice) and 64-bit offsets, and refuses
    nulls (they must be filled first)."""
    words = ["zero", "", "zwei", "tr\u00e8s", "quatre"]
    for typ in (pa.string(), pa.large_string()):
        arr = pa.array(words, type=typ).slice(1)
        col = StringColumn(arr)
        assert len(col) == 4 and [col[i] for i in range(4)] == words[1:]
        assert col.take(np.array([3, 0, 2])) == ["quatre", "", "tr\u00e8s"]
        assert col.slice_pylist(2, 10) == words[3:]
    assert len(StringColumn(pa.array([], type=pa.string()))) == 0
    with pytest.raises(ValueError, match="null"):
        StringColumn(pa.array(["a", None]))


def test_device_types_reach_the_candidates_and_cost_nothing_when_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-entry device-type counts go from ``catalog.parquet`` to every search hit and lookup
    (row i's own, in order; other rows none), also when read in several batches with a device
    type first seen in a later batch; a catalog without any keeps no arrays."""
    import rewrite.retrieval as retrieval

    monkeypatch.setattr(retrieval, "_DEVICE_BATCH", 7)
    n = 120
    table = catalog_table(n)
    stats = [
        [{"device_type": "speaker", "turns": 5 + i, "successes": 4}, {"device_type": "tv",
          "turns": 2, "successes": 2}] if i % 3 == 0 else [] if i % 3 == 1 else None
        for i in range(n)
    ]  # fmt: skip
    stats[100] = [{"device_type": "car", "turns": 1, "successes": 0}]
    col = table.schema.get_field_index("device_types")
    table = table.set_column(col, "device_types", pa.array(stats, DEVICE_TYPES_TYPE))
    vecs = unit_vectors(n)
    dense_only = DprSettings(lexical=DENSE_ONLY)
    write_index_dir(vecs, table, tmp_path / "a", ENCODER, dense_only, version="v1")
    index = GlobalIndex.load(tmp_path / "a")
    for i in range(n):
        want = (
            (DeviceTypeStat("speaker", 5 + i, 4), DeviceTypeStat("tv", 2, 2)) if i % 3 == 0 else ()
        )
        if i == 100:
            want = (DeviceTypeStat("car", 1, 0),)
        assert index.device_types(i) == want
        hit = index.lookup(f"utterance {i}")
        assert hit is not None and hit.device_types == want
    top = index.search(vecs[:4], k=1)
    assert [c[0].device_types for c in top] == [index.device_types(i) for i in range(4)]
    # the service's way: tuples left in the index, the ranker's device features read from its
    # arrays — exactly the values the tuples give (train/serve parity), for every row kind and
    # device type (known, another, unseen, unknown), alone and in a batch of requests
    from rewrite.rerank import FEATURE_NAMES, feature_matrices

    full = index.search(vecs, k=8)
    lean = index.search(vecs, k=8, device_types=False)
    assert all(c.device_types == () for res in lean for c in res)
    assert [[c.catalog_row for c in res] for res in lean] == [
        [int(c.text.split()[1]) for c in res] for res in full
    ]
    assert [[dataclasses.replace(c, device_types=()) for c in res] for res in full] == lean
    looked = index.lookup("utterance 100", device_types=False)
    assert looked is not None and looked.device_types == () and looked.catalog_row == 100
    cols = [FEATURE_NAMES.index("device_share"), FEATURE_NAMES.index("device_success_rate")]
    for device_type in ("speaker", "tv", "car", "display", ""):
        reqs_full = [("utterance", res, (), device_type) for res in full]
        reqs_lean = [("utterance", res, (), device_type) for res in lean]
        want, _ = feature_matrices(reqs_full)
        got, _ = feature_matrices(reqs_lean, [index] * len(reqs_lean))
        np.testing.assert_array_equal(got, want)
        assert device_type == "" or (want[:, cols[0]] > 0).any() or device_type == "display"
    kinds = ("speaker", "tv", "car", "display", "")  # one batch, a device type per request
    want, _ = feature_matrices([("u", res, (), kinds[j % 5]) for j, res in enumerate(full)])
    got, _ = feature_matrices(
        [("u", res, (), kinds[j % 5]) for j, res in enumerate(lean)], [index] * len(lean)
    )
    np.testing.assert_array_equal(got, want)
    # without device types (all empty): nothing stored, candidates carry none
    write_index_dir(vecs, catalog_table(n), tmp_path / "b", ENCODER, dense_only, version="v1")
    plain = GlobalIndex.load(tmp_path / "b")
    assert plain._dt_off is None and plain.search(vecs[:1], k=3)[0][0].device_types == ()


@pytest.mark.parametrize(("n", "kind"), [(60, "flat"), (300, "hnsw")])
def test_build_selects_kind_and_search_finds_neighbours(tmp_path: Path, n: int, kind: str) -> None:
    import faiss

    directory, vecs = build(tmp_path, n, flat_max=100)
    info = json.loads((directory / INDEX_META).read_text())
    assert (info["kind"], info["n"], info["dim"], info["encoder_id"]) == (kind, n, DIM, ENCODER)
    assert set(info["sha256"]) == {INDEX_FILE, CATALOG_FILE, COLUMNS_FILE}
    index = GlobalIndex.load(directory, expected_encoder_id=ENCODER)
    assert index.kind == kind and len(index) == n and index.dim == DIM
    want = faiss.IndexHNSWFlat if kind == "hnsw" else faiss.IndexFlatIP
    assert isinstance(index.index, want)
    rows = [3, 17, 42]
    queries = near(vecs[rows], seed=1)
    results = index.search(queries, k=5)
    assert len(results) == 3
    for row, q, res in zip(rows, queries, results, strict=True):
        assert len(res) == 5
        top = res[0]
        assert top == RetrievedCandidate(
            text=f"utterance {row}",
            layer="global",
            dense_score=pytest.approx(float(vecs[row] @ q), abs=1e-5),  # type: ignore[arg-type]
            frequency=10 + row,
            success_rate=pytest.approx(0.5 + (row % 50) / 100),  # type: ignore[arg-type]
            n_users=2 + row % 5,
            domain=f"d{row % 3}",
            intent=f"i{row % 7}",
        )
        scores = [c.dense_score for c in res]
        assert scores == sorted(scores, reverse=True)
        exact = np.argsort(-(vecs @ q))[:5]
        assert [c.text for c in res] == [f"utterance {i}" for i in exact]
    assert index.last_seen(rows[0]) == 1.7e9 + rows[0]
    looked = index.lookup(f"utterance {rows[0]}")
    assert looked is not None and looked.frequency == 10 + rows[0] and looked.dense_score == 0.0
    assert index.lookup("not in the catalog") is None
    # a single (dim,) vector is one query; k larger than the catalog: at most the catalog
    # (exactly all of it for the exact index; HNSW may miss unreachable entries)
    got = len(index.search(queries[0], k=n + 10)[0])
    assert got == n if kind == "flat" else n // 2 < got <= n
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        index.search(np.zeros((1, DIM + 1), dtype=np.float32), k=3)


@pytest.mark.parametrize(
    ("n", "flat_max", "ivf_min", "kind"),
    [(60, 100, 100_000, "flat"), (300, 100, 100_000, "hnsw"),
     (3000, 100, 1000, "ivf_pq_refine"), (3000, 100, 1000, "ivf_sq8")],
)  # fmt: skip
def test_mapped_index_answers_as_the_one_in_memory(
    tmp_path: Path, n: int, flat_max: int, ivf_min: int, kind: str
) -> None:
    """``mmap=True`` (the service's ``dpr.index_mmap``) maps the index file's flat codes
    instead of copying them: every kind gives the same ids and scores as the in-memory load,
    and the file shows up in the process's memory maps — with no page of it resident right
    after loading (what loading read was copied, and is released: ``libc.release_file_pages``),
    and only what searches read afterwards."""
    ivf_kind = kind if kind.startswith("ivf") else "ivf_pq_refine"
    directory, vecs = build(tmp_path, n, flat_max=flat_max, ivf_min=ivf_min, ivf_kind=ivf_kind)
    queries = near(vecs[::37], seed=3)
    plain = GlobalIndex.load(directory)
    path = str((directory / INDEX_FILE).resolve())

    def mapped() -> bool:
        return path in Path("/proc/self/maps").read_text()

    assert plain.kind == kind and not mapped()
    mmapped = GlobalIndex.load(directory, mmap=True)
    maps = libc.file_mappings(directory / INDEX_FILE, with_rss=True)
    assert len(maps) == 1 and maps[0].rss_bytes == 0
    want = [[(c.text, c.dense_score) for c in r] for r in plain.search(queries, k=10)]
    got = [[(c.text, c.dense_score) for c in r] for r in mmapped.search(queries, k=10)]
    assert got == want and len(want[0]) == 10
    assert mapped()


def test_hnsw_ef_search_from_build_or_load(tmp_path: Path) -> None:
    directory, _ = build(tmp_path, 200, flat_max=10)
    assert GlobalIndex.load(directory).index.hnsw.efSearch == 64
    assert GlobalIndex.load(directory, ef_search=128).index.hnsw.efSearch == 128


def _without_columns_file(src: Path, dst: Path) -> Path:
    """A copy of an index folder as written before ``catalog.arrow`` existed."""
    import shutil

    shutil.copytree(src, dst)
    (dst / COLUMNS_FILE).unlink()
    meta = json.loads((dst / INDEX_META).read_text())
    del meta["sha256"][COLUMNS_FILE]
    (dst / INDEX_META).write_text(json.dumps(meta))
    return dst


def test_an_index_built_by_another_process_finds_its_own_texts(tmp_path: Path) -> None:
    """The sorted text hashes the build writes into ``catalog.arrow`` are the same in every
    process (BLAKE2b, not Python's per-process ``hash``): indexes built by two processes with
    other hash seeds answer membership, lookups and catalog rows for every text here. (With
    ``hash()`` every text read as "not in the catalog" outside the building process: the
    trigger's ``succeeds_globally`` and the personal layer's metadata were lost.)"""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; from pathlib import Path; from test_retrieval import build; "
        "build(Path(sys.argv[1]), 300, flat_max=1000)"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests")])
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env=env, check=True)
        index = GlobalIndex.load(tmp_path / seed)
        assert index.columns.mapped
        texts = [f"utterance {i}" for i in range(300)]
        assert all(t in index for t in texts)
        assert index.rows_of(texts).tolist() == list(range(300))
        assert index.rows_of(["utterance 300", ""]).tolist() == [-1, -1]
        hit = index.lookup("utterance 42")
        assert hit is not None and hit.catalog_row == 42 and hit.frequency == 52
    assert retrieval._text_hash("utterance 7") == stable_hash64("utterance 7", signed=True)


def test_a_catalog_file_with_per_process_hashes_is_rehashed_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``catalog.arrow`` written before the text hashes were stable (no ``text_hash``
    metadata; its hashes another process's ``hash()``) is not trusted: the service hashes the
    mapped texts again, warns, and finds every text."""
    directory, _ = build(tmp_path / "idx", 200, flat_max=1000)
    path = directory / COLUMNS_FILE
    batch = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).get_batch(0)  # not mapped
    shuffled = np.random.default_rng(0).permutation(batch.column("hash_sorted").to_numpy())
    cols = {name: batch.column(name) for name in batch.schema.names}
    cols["hash_sorted"] = pa.array(np.sort(shuffled * 7 + 1), pa.int64())  # others' hashes
    meta = {k: v for k, v in (batch.schema.metadata or {}).items() if k != b"text_hash"}
    old = pa.RecordBatch.from_pydict(cols, metadata=meta)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, old.schema) as writer:
        writer.write_batch(old)
    info = json.loads((directory / INDEX_META).read_text())
    info["sha256"][COLUMNS_FILE] = sha256_file(path)
    (directory / INDEX_META).write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="rewrite.retrieval"):
        index = GlobalIndex.load(directory)
    assert "text hashes of another process" in caplog.text
    assert all(f"utterance {i}" in index for i in range(200))
    assert "utterance 200" not in index


def test_the_installed_folder_name_covers_the_text_hash_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job installs an index under ``content_id`` (index file, catalog sidecar, encoder
    id) and reuses a folder of that name; the name also covers the catalog's text-hash
    scheme, so a new build never takes a folder whose ``catalog.arrow`` holds hashes of
    another scheme (per-process ``hash()`` ones, before 2026-12-08), and an inverted file's
    lists file (format 2), which installing copies with the rest."""
    from offline import online_build

    directory, _ = build(tmp_path / "idx", 50)
    made = online_build.OnlineBuild(None, "zero-shot", directory, IndexInfo.read(directory))  # type: ignore[arg-type]
    now = made.content_id
    assert now == online_build.OnlineBuild(None, "x", directory, made.info).content_id  # type: ignore[arg-type]
    monkeypatch.setattr(online_build, "TEXT_HASH", "python-hash")
    assert made.content_id != now
    # an inverted file's lists file is part of the content too (index format 2)
    from rewrite.ivflists import IVFDATA_FILE

    ivf_dir, _ = build(tmp_path / "ivf", 3000, flat_max=100, ivf_min=1000)
    info = IndexInfo.read(ivf_dir)
    lists = online_build.OnlineBuild(None, "z", ivf_dir, info)  # type: ignore[arg-type]
    other = dataclasses.replace(info, sha256={**info.sha256, IVFDATA_FILE: "0" * 64})
    assert lists.content_id != online_build.OnlineBuild(None, "z", ivf_dir, other).content_id  # type: ignore[arg-type]
    # installing copies the lists file with the rest: the installed folder verifies and
    # answers as the built one
    settings = Settings()
    settings.dpr.index_root = tmp_path / "installed"
    installed = online_build.install_index(lists, settings)
    assert installed.name == lists.content_id[:16] and (installed / IVFDATA_FILE).exists()
    queries = unit_vectors(20, seed=11)
    assert GlobalIndex.load(installed).search(queries, k=5) == GlobalIndex.load(ivf_dir).search(
        queries, k=5
    )


def test_mapped_catalog_columns_equal_the_parquet_catalog(tmp_path: Path) -> None:
    """``catalog.arrow`` (written by the build, memory-mapped at load) holds exactly what
    the service derives from ``catalog.parquet`` — strings, numbers, sorted text hashes,
    device-type counts (with nulls and entries without any) — so search, lookup and device
    features answer the same; a folder without it (built before) still loads, from the
    Parquet file."""
    n = 300
    table = catalog_table(n)
    stats = [
        [{"device_type": "speaker", "turns": 5 + i, "successes": 4}, {"device_type": None,
          "turns": 2, "successes": None}] if i % 3 == 0 else [] if i % 3 == 1 else None
        for i in range(n)
    ]  # fmt: skip
    table = table.set_column(
        table.schema.get_field_index("device_types"),
        "device_types",
        pa.array(stats, DEVICE_TYPES_TYPE),
    )
    table = table.set_column(
        table.schema.get_field_index("domain"),
        "domain",
        pa.array([None if i % 5 == 0 else f"d{i}" for i in range(n)], pa.string()),
    )
    vecs = unit_vectors(n)
    write_index_dir(vecs, table, tmp_path / "new", ENCODER, DprSettings(lexical=DENSE_ONLY))
    mapped = GlobalIndex.load(tmp_path / "new")
    old = GlobalIndex.load(_without_columns_file(tmp_path / "new", tmp_path / "old"))
    assert mapped.columns.mapped and not old.columns.mapped
    a, b = mapped.columns, old.columns
    for name in ("text", "domain", "intent"):
        assert getattr(a, name).take(np.arange(n)) == getattr(b, name).take(np.arange(n))
    for name in ("frequency", "n_users", "success_rate", "last_seen", "hash_order",
                 "hash_sorted", "dt_off", "dt_code", "dt_turns", "dt_ok"):  # fmt: skip
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.dt_vocab == b.dt_vocab and len(a.dt_vocab) == 2
    queries = near(vecs[:20], seed=3)
    assert mapped.search(queries, k=5) == old.search(queries, k=5)
    texts = [f"utterance {i}" for i in range(0, n, 7)] + ["not there", ""]
    assert [mapped.lookup(t) for t in texts] == [old.lookup(t) for t in texts]
    rows, rates = np.arange(0, n, 2), np.full(n // 2, 0.5)
    kinds = ["speaker", "", "tv"] * (n // 6)
    assert np.array_equal(
        mapped.device_features(rows, rates, kinds), old.device_features(rows, rates, kinds)
    )
    # the mapped arrays point into the file's mapping (/proc/self/maps), the others do not
    spans = [
        tuple(int(x, 16) for x in line.split()[0].split("-"))
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str((tmp_path / "new" / COLUMNS_FILE).resolve()))
    ]
    assert spans

    def in_map(arr: np.ndarray) -> bool:
        addr = arr.__array_interface__["data"][0]
        return any(lo <= addr < hi for lo, hi in spans)

    assert all(in_map(getattr(a, c)) for c in ("frequency", "hash_sorted", "dt_off", "dt_ok"))
    assert not any(in_map(getattr(b, c)) for c in ("frequency", "hash_sorted", "dt_off"))


def test_a_recorded_columns_file_must_be_there_and_readable(tmp_path: Path) -> None:
    directory, _ = build(tmp_path / "a", 50)
    (directory / COLUMNS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=COLUMNS_FILE):
        GlobalIndex.load(directory)
    with pytest.raises(FileNotFoundError, match=COLUMNS_FILE):
        GlobalIndex.load(directory, verify=False)
    directory, _ = build(tmp_path / "b", 50)
    (directory / COLUMNS_FILE).write_bytes(b"not an arrow file")  # checksum not checked:
    with pytest.raises(IndexCorruptError, match=COLUMNS_FILE):
        GlobalIndex.load(directory, verify=False)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [INDEX_FILE, CATALOG_FILE, COLUMNS_FILE])
def test_corrupt_file_is_refused(tmp_path: Path, name: str) -> None:
    directory, _ = build(tmp_path, 50)
    GlobalIndex.load(directory, expected_encoder_id=ENCODER)  # fine before
    flip_byte(directory / name, 1000)
    with pytest.raises(IndexCorruptError, match=f"{name} is corrupt") as err:
        GlobalIndex.load(directory, expected_encoder_id=ENCODER)
    assert isinstance(err.value, ValueError)


def test_mismatched_encoder_is_refused(tmp_path: Path) -> None:
    directory, _ = build(tmp_path, 50)
    with pytest.raises(IndexMismatchError, match=r"enc-test-0001.*other-encoder") as err:
        GlobalIndex.load(directory, expected_encoder_id="other-encoder")
    assert isinstance(err.value, ValueError)
    with pytest.raises(IndexMismatchError):
        GlobalIndex.load(directory, expected_encoder_id="other-encoder", verify=False)


def test_index_json_disagreeing_with_files_is_refused(tmp_path: Path) -> None:
    directory, _ = build(tmp_path, 50)
    meta = json.loads((directory / INDEX_META).read_text())
    (directory / INDEX_META).write_text(json.dumps({**meta, "dim": 64}))
    with pytest.raises(IndexMismatchError, match="dimension 32"):
        GlobalIndex.load(directory)
    (directory / INDEX_META).write_text(json.dumps({**meta, "n": 49}))
    with pytest.raises(IndexMismatchError, match="50 vectors"):
        GlobalIndex.load(directory)
    (directory / INDEX_META).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(IndexMismatchError, match="format 99"):
        GlobalIndex.load(directory)
    (directory / INDEX_META).write_text("{not json")
    with pytest.raises(IndexCorruptError):
        GlobalIndex.load(directory)
    (directory / INDEX_META).unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        GlobalIndex.load(directory)


def test_empty_catalog_gives_an_empty_flat_index(tmp_path: Path) -> None:
    settings = DprSettings()
    vecs = np.zeros((0, DIM), dtype=np.float32)
    write_index_dir(vecs, catalog_table(0), tmp_path, ENCODER, settings)
    index = GlobalIndex.load(tmp_path)
    assert len(index) == 0 and index.kind == "flat" and index.dim == DIM  # lexical channel on
    assert index.search(unit_vectors(2), k=3, texts=["a", "b"]) == [[], []]


def test_normalize_catalog_fills_defaults_and_drops_repeats() -> None:
    raw = pa.table(
        {
            "text": ["a", "b", "a", "", None, "c"],
            "frequency": [3, None, 1, 1, 1, 2],
            "last_seen": pa.array([0, 1_000_000, 0, 0, 0, None], type=pa.timestamp("us", "UTC")),
            "extra": [1, 2, 3, 4, 5, 6],
        }
    )
    out = normalize_catalog(raw)
    rows = out.to_pylist()
    assert [r["text"] for r in rows] == ["a", "b", "c"]
    assert rows[1] == {
        "text": "b",
        "frequency": 0,
        "n_users": 0,
        "success_rate": 0.0,
        "domain": "",
        "intent": "",
        "last_seen": 1.0,
        "device_types": None,  # no device-type data
    }
    assert rows[2]["last_seen"] == -1.0
    with pytest.raises(ValueError, match="'text'"):
        normalize_catalog(pa.table({"utterance": ["a"]}))


@pytest.mark.slow
def test_build_index_with_the_zero_shot_encoder(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from offline.dpr.train import export_zero_shot
    from rewrite.encoder import PassageEncoder, QueryEncoder

    # same folder as tests/test_dpr.py's fixture: exported once per session
    art = export_zero_shot(tmp_path_factory.getbasetemp() / "zero-shot-dpr").artifact
    texts = [
        "turn off the lights",
        "play some jazz",
        "what's the weather in boston",
        "set an alarm for seven am",
        "call mom",
    ]
    pq.write_table(
        pa.Table.from_pylist([{"text": t, "frequency": 5, "domain": "x"} for t in texts]),
        tmp_path / "catalog.parquet",
    )
    passage = PassageEncoder.load(art)
    info, indexed, vectors = encode_and_index(
        tmp_path / "catalog.parquet",
        passage,
        tmp_path / "index",
        DprSettings(),
        version="v7",
        progress=False,
    )
    # the index carries the lexical channel (default): 384 dense + 127 n-gram + 1 prior
    assert (info.kind, info.n, info.dim, info.version) == ("flat", 5, 512, "v7")
    assert info.params["lexical"] == DprSettings().lexical.channel().to_params()  # type: ignore[union-attr]
    assert indexed == texts and vectors.shape == (5, 384)  # what the job keeps for publishing
    np.testing.assert_allclose(vectors, passage.encode(texts), atol=1e-5)
    qe = QueryEncoder.load(art)
    index = GlobalIndex.load(tmp_path / "index", expected_encoder_id=qe.encoder_id)
    assert index.dim == 384
    queries = ["turn of the lights", "whats the whether in boston"]
    res = index.search(qe.encode(queries), k=3, texts=queries)
    assert res[0][0].text == "turn off the lights" and res[0][0].frequency == 5
    assert res[1][0].text == "what's the weather in boston" and res[1][0].domain == "x"
    assert res[0][0].dense_score > res[0][1].dense_score
