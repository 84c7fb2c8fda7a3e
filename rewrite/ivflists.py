"""The inverted lists of a fast-scan IVF index in a file of their own, memory-mapped.

FAISS reads an ``IndexIVFPQFastScan``'s lists (``BlockInvertedLists``: the 4-bit PQ codes
packed in blocks of 32, and the ids) into each process's own memory, even with
``IO_FLAG_MMAP_IFC``: at 1M entries of 512 dimensions that is 72 MB of anonymous memory per
service process, the largest piece of it that is not a cache. Written instead to
``index.ivfdata`` in the layout of FAISS's own ``OnDiskInvertedLists`` (per list its codes,
then its ids, at an offset of the file) and served from a read-only shared mapping of that
file, the lists are page-cache pages that every service process shares (and that the kernel
may reclaim), loading copies nothing, and searches return the same results bit for bit: the
fast-scan kernels read the same packed blocks through ``InvertedLists.get_codes``.

The file, little-endian::

    MAGIC (8 bytes) | nlist, code_size, n_per_block (int64 each)
    | (nlist, 3) int64 table: size, capacity, offset of each list   (header padded to 4 KiB)
    | per list at its offset: capacity * code_size bytes of packed codes, capacity int64 ids

``code_size`` is the bytes per entry of a packed block (``block_size / n_per_block``), and a
list's capacity is its size rounded up to whole blocks, so that every block the kernels read
lies in the list's span (FAISS's own ``OnDiskInvertedLists.resize`` keeps powers of two and
would cut the last block of a small list). Offsets are 64-byte aligned.

Source: FAISS ``OnDiskInvertedLists`` (faiss/invlists/OnDiskInvertedLists.h) and the
fast-scan block layout (faiss/impl/pq4_fast_scan.h; André, Kermarrec & Le Scouarnec, VLDB
2015 / ICMR 2017).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: The lists' file in an index folder (recorded in ``index.json``'s ``sha256``).
IVFDATA_FILE = "index.ivfdata"
MAGIC = b"QRWIVF01"
_PAGE = 4096
_ALIGN = 64


class IvfListsError(ValueError):
    """The lists' file is not one this module wrote, or disagrees with the index."""


def _fast_scan_ivf(index: Any) -> Any:
    """The ``IndexIVFPQFastScan`` inside ``index`` (an ``IndexRefine`` over one, or itself).

    Raises:
        IvfListsError: there is none.
    """
    import faiss

    try:
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError as err:
        raise IvfListsError(f"{type(index).__name__} holds no inverted file") from err
    if not isinstance(ivf, faiss.IndexIVFPQFastScan):
        raise IvfListsError(f"{type(ivf).__name__} is not an IVF fast-scan PQ index")
    return ivf


def _entry_bytes(ivf: Any) -> int:
    """Bytes per entry of ``ivf``'s packed blocks (``M2 / 2``: two 4-bit codes a byte)."""
    return int(ivf.M2) // 2


def _header_bytes(nlist: int) -> int:
    raw = len(MAGIC) + 3 * 8 + nlist * 3 * 8
    return -(-raw // _PAGE) * _PAGE


def write_ivf_lists(index: Any, path: Path) -> int:
    """Write the fast-scan inverted lists of ``index`` to ``path`` (see the module docstring).

    Args:
        index: a built ``IndexIVFPQFastScan`` or an ``IndexRefine`` over one, its lists a
            ``BlockInvertedLists``.
        path: the file to write (replaced).

    Returns:
        Bytes written.

    Raises:
        IvfListsError: ``index`` has no fast-scan inverted file with block lists.
    """
    import faiss

    ivf = _fast_scan_ivf(index)
    lists: Any = faiss.downcast_InvertedLists(ivf.invlists)
    if type(lists).__name__ != "BlockInvertedLists":  # not in faiss's type stubs
        raise IvfListsError(f"lists are {type(lists).__name__}, not BlockInvertedLists")
    nlist, per_block, block = int(lists.nlist), int(lists.n_per_block), int(lists.block_size)
    code_size = block // per_block
    sizes = np.array([lists.list_size(i) for i in range(nlist)], dtype=np.int64)
    capacity = -(-sizes // per_block) * per_block
    span = capacity * (code_size + 8)  # multiples of 32 * 8 bytes: 64-byte aligned
    offsets = np.empty(nlist, dtype=np.int64)
    offsets[0] = _header_bytes(nlist)
    np.cumsum(span[:-1], out=offsets[1:])
    offsets[1:] += offsets[0]
    assert not (offsets % _ALIGN).any()
    table = np.stack([sizes, capacity, offsets], axis=1)
    head = MAGIC + np.array([nlist, code_size, per_block], dtype="<i8").tobytes()
    head += table.astype("<i8").tobytes()
    path = Path(path)
    with path.open("wb") as fh:
        fh.write(head.ljust(int(offsets[0]), b"\0"))
        for i in range(nlist):
            n, cap = int(sizes[i]), int(capacity[i])
            if cap == 0:
                continue
            fh.write(faiss.rev_swig_ptr(lists.get_codes(i), cap * code_size).tobytes())
            ids = np.full(cap, -1, dtype="<i8")
            ids[:n] = faiss.rev_swig_ptr(lists.get_ids(i), n)
            fh.write(ids.tobytes())
        written = fh.tell()
    return written


def read_table(path: Path) -> tuple[int, int, int, np.ndarray]:
    """``(nlist, code_size, n_per_block, table)`` of a lists' file; ``table`` ``(nlist, 3)``
    int64 (size, capacity, offset per list).

    Raises:
        IvfListsError: not such a file, a list lies outside it, or a list's capacity is not
            whole blocks covering its entries (the kernels read every block of a list).
        OSError: it cannot be read.
    """
    path = Path(path)
    total = path.stat().st_size
    with path.open("rb") as fh:
        fixed = fh.read(len(MAGIC) + 24)
        if len(fixed) < len(MAGIC) + 24 or fixed[: len(MAGIC)] != MAGIC:
            raise IvfListsError(f"{path} is not an inverted-lists file")
        nlist, code_size, per_block = (int(v) for v in np.frombuffer(fixed[8:], dtype="<i8"))
        if nlist < 1 or code_size < 1 or per_block < 1 or _header_bytes(nlist) > total:
            raise IvfListsError(f"{path}: bad header (nlist {nlist}, code_size {code_size})")
        raw = fh.read(nlist * 24)
    table = np.frombuffer(raw, dtype="<i8").reshape(nlist, 3).astype(np.int64)
    sizes, capacity, offsets = table.T
    ends = offsets + capacity * (code_size + 8)
    if (sizes < 0).any() or (capacity < sizes).any() or (offsets < 0).any() or (ends > total).any():
        raise IvfListsError(f"{path}: a list lies outside the file")
    if (capacity % per_block).any():
        raise IvfListsError(f"{path}: a list's capacity is not whole blocks of {per_block}")
    return nlist, code_size, per_block, table


def map_ivf_lists(index: Any, path: Path) -> int:
    """Serve the fast-scan lists of ``index`` from a read-only shared mapping of ``path``
    (FAISS ``OnDiskInvertedLists``, prefetch threads off), replacing whatever lists it has.

    Args:
        index: the ``IndexRefine`` (or ``IndexIVFPQFastScan``) read from ``index.faiss``.
        path: its ``index.ivfdata`` (:func:`write_ivf_lists`).

    Returns:
        Entries in the mapped lists (the index's ``ntotal`` when they belong together).

    Raises:
        IvfListsError: the file is not such a file, or its lists do not fit the index
            (number of lists, bytes per entry, block size, entries).
        OSError / RuntimeError: the file cannot be opened or mapped.
    """
    import faiss

    ivf = _fast_scan_ivf(index)
    nlist, code_size, per_block, table = read_table(path)
    want = _entry_bytes(ivf)
    if nlist != ivf.nlist or code_size != want or per_block != ivf.bbs:
        raise IvfListsError(
            f"{path} holds {nlist} lists of {code_size} bytes per entry in blocks of "
            f"{per_block}; the index has {ivf.nlist} lists of {want} in blocks of {ivf.bbs}"
        )
    entries = int(table[:, 0].sum())
    if entries != ivf.ntotal:
        raise IvfListsError(f"{path} holds {entries} entries; the index has {ivf.ntotal}")
    mapped: Any = faiss.OnDiskInvertedLists(nlist, code_size, str(path))
    mapped.lists.clear()
    for size, capacity, offset in table.tolist():
        entry = faiss.OnDiskOneList()
        entry.size, entry.capacity, entry.offset = size, capacity, offset
        mapped.lists.push_back(entry)
    mapped.totsize = Path(path).stat().st_size
    mapped.read_only = True  # opened "r", mapped PROT_READ | MAP_SHARED
    mapped.prefetch_nthread = 0  # no helper threads touching pages ahead of a search
    mapped.do_mmap()
    with Path(path).open("rb") as fh:  # read ahead into the page cache: no disk read mid-search
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
    ivf.replace_invlists(mapped, True)
    mapped.thisown = False  # the index deletes it (and unmaps)
    log.debug("mapped %d inverted lists (%d entries) from %s", nlist, entries, path)
    return entries


def empty_lists_like(index: Any) -> Any:
    """An empty ``ArrayInvertedLists`` with ``index``'s list count and bytes per entry: what
    ``index.faiss`` stores in place of the lists written to ``index.ivfdata`` (a few KB; no
    reader warning, unlike storing none).

    Raises:
        IvfListsError: ``index`` has no fast-scan inverted file.
    """
    import faiss

    ivf = _fast_scan_ivf(index)
    return faiss.ArrayInvertedLists(ivf.nlist, _entry_bytes(ivf))
