"""The C library calls the service makes that Python's standard library does not wrap
(``ctypes``; Linux / glibc, each a logged no-op elsewhere).

- :func:`malloc_trim`: hand glibc's free heap back to the OS after an index is dropped;
- :func:`set_parent_death_signal`: ``prctl(PR_SET_PDEATHSIG)`` for service processes;
- :func:`release_file_pages`: ``madvise(MADV_DONTNEED)`` over this process's read-only
  mappings of one file: the pages that loading a mapped FAISS index read once (and copied
  into memory) stop counting in the process's resident set; the kernel maps them again from
  the page cache if they are ever read again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: ``prctl`` option (``<linux/prctl.h>``).
PR_SET_PDEATHSIG = 1


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The process's C library (``ctypes.CDLL``, ``use_errno=True``), or None when it cannot
    be found or loaded."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    if hasattr(lib, "madvise"):
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
    return lib


def malloc_trim() -> bool:
    """glibc ``malloc_trim(0)``: return free heap pages to the OS. False when the C library
    has no ``malloc_trim`` (not glibc)."""
    lib = libc()
    if lib is None or not hasattr(lib, "malloc_trim"):
        return False
    lib.malloc_trim(0)
    return True


def set_parent_death_signal(sig: int) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` to this process when
    the thread that started it exits. False (logged) when ``prctl`` is unavailable or fails."""
    lib = libc()
    if lib is None or not hasattr(lib, "prctl"):
        log.warning("prctl unavailable: this process may outlive its parent")
        return False
    if lib.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its parent",
            ctypes.get_errno(),
        )
        return False
    return True


@dataclasses.dataclass(frozen=True)
class FileMapping:
    """One mapping of a file in this process (a ``/proc/self/maps`` line): addresses
    ``[start, end)``, permissions (``r--s``, ``r--p`` ...), and its resident size in bytes
    (``Rss`` of ``/proc/self/smaps``; -1 when not read)."""

    start: int
    end: int
    perms: str
    rss_bytes: int = -1


def file_mappings(path: Path, with_rss: bool = False) -> list[FileMapping]:
    """This process's mappings of ``path`` (matched by device and inode, so any spelling of
    the path finds them); ``with_rss`` reads ``/proc/self/smaps`` (slower) for their resident
    sizes. Empty where ``/proc`` is unavailable or the file is not mapped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    source = Path("/proc/self/smaps" if with_rss else "/proc/self/maps")
    try:
        lines = source.read_text().splitlines()
    except OSError:
        return []
    out: list[FileMapping] = []
    ours = False  # the mapping whose header came last is of this file
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:
            ours = fields[3] == dev and fields[4] == str(st.st_ino)
            if ours:
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                out.append(FileMapping(lo, hi, fields[1]))
        elif ours and fields and fields[0] == "Rss:":
            out[-1] = dataclasses.replace(out[-1], rss_bytes=int(fields[1]) * 1024)
    return out


def release_file_pages(path: Path) -> int:
    """``madvise(MADV_DONTNEED)`` over every read-only mapping of ``path`` in this process
    (madvise(2)): its pages leave the process's page tables (its RSS and its share of Pss)
    but stay in the page cache, and a later read maps them again (a minor fault). Safe only
    because the mappings are read-only: no page of them can hold data the file does not.
    Writable mappings are left alone.

    Why: FAISS's ``IO_FLAG_MMAP_IFC`` reads a whole index file through one shared mapping,
    keeps views of the flat codes and *copies* the rest (inverted lists, HNSW links); the
    copied part's pages would otherwise stay resident in the mapping for the life of the
    index (1M-entry ``ivf_pq_refine``: ~54 MB per service process, counted again in each
    process's RSS).

    Returns:
        Bytes of address space advised (0 where nothing is mapped, ``/proc`` or ``madvise``
        is unavailable, or the call fails: logged).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    lib = libc()
    if lib is None or not hasattr(lib, "madvise"):
        return 0
    advised = 0
    for m in file_mappings(path):
        if "w" in m.perms:
            continue
        if lib.madvise(m.start, m.end - m.start, mmap.MADV_DONTNEED) != 0:
            log.warning("madvise(MADV_DONTNEED) on %s failed (errno %d)", path, ctypes.get_errno())
            continue
        advised += m.end - m.start
    return advised
