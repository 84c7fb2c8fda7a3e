"""rewrite.libc: the C library calls (on this Linux / glibc machine, each must take effect)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from rewrite import libc

PAGE = mmap.PAGESIZE


def _resident(path: Path) -> int:
    return sum(m.rss_bytes for m in libc.file_mappings(path, with_rss=True))


def test_release_file_pages_drops_a_read_only_mapping_and_keeps_its_contents(
    tmp_path: Path,
) -> None:
    """After ``release_file_pages`` the read pages no longer count in the process's RSS, the
    mapping still reads the file's bytes (mapped again from the page cache), and a writable
    mapping of the same file is left alone (its pages could hold unsaved data)."""
    path = tmp_path / "codes.bin"
    data = os.urandom(64 * PAGE)
    path.write_bytes(data)
    with path.open("rb") as fh, path.open("r+b") as wfh:
        ro = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        rw = mmap.mmap(wfh.fileno(), 0, access=mmap.ACCESS_WRITE)
        try:
            assert sum(ro[i] for i in range(0, len(data), PAGE)) >= 0  # touch every page
            rw[0] = rw[0]  # a written page of the writable mapping
            maps = libc.file_mappings(path, with_rss=True)
            by_perms = {m.perms[1]: m for m in maps}
            assert set(by_perms) == {"-", "w"}, maps
            assert by_perms["-"].rss_bytes == len(data) and by_perms["w"].rss_bytes >= PAGE

            assert libc.release_file_pages(path) == len(data)  # the read-only one only

            after = {m.perms[1]: m for m in libc.file_mappings(path, with_rss=True)}
            assert after["-"].rss_bytes == 0
            assert after["w"].rss_bytes >= PAGE
            assert ro[:] == data  # read again from the page cache
            assert _resident(path) >= len(data)
        finally:
            ro.close()
            rw.close()
    assert libc.file_mappings(path) == []
    assert libc.release_file_pages(path) == 0
    with pytest.raises(FileNotFoundError):
        libc.file_mappings(tmp_path / "missing")


def test_file_mappings_match_any_spelling_of_the_path(tmp_path: Path) -> None:
    path = tmp_path / "a" / "codes.bin"
    path.parent.mkdir()
    path.write_bytes(b"x" * PAGE)
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ):
        spellings = [path, link, tmp_path / "a" / ".." / "a" / "codes.bin"]
        assert [len(libc.file_mappings(p)) for p in spellings] == [1, 1, 1]


def test_malloc_trim_takes_effect_on_glibc() -> None:
    """This machine runs glibc: the call is made (not the no-op path). (``prctl``:
    ``test_processes.py``'s orphan test.)"""
    assert libc.libc() is not None
    assert libc.malloc_trim() is True
