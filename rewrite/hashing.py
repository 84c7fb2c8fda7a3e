"""Stable 64-bit hashes of strings, the same in every process (library: ``hashlib``).

Python's ``hash()`` of a ``str`` is seeded per process (``PYTHONHASHSEED``), so a hash
written by the nightly job and compared by a service process must not come from it: the
publisher's membership filters (:class:`rewrite.store.MembershipFilter`) and the sorted text
hashes the index build writes into ``catalog.arrow`` (:class:`rewrite.retrieval.CatalogColumns`)
use :func:`stable_hash64`.
"""

from __future__ import annotations

import hashlib


def stable_hash64(text: str, signed: bool = False) -> int:
    """64-bit BLAKE2b (``hashlib.blake2b``, 8-byte digest, read little-endian) of the UTF-8
    bytes of ``text`` (lone surrogates passed through, so no text raises); ~0.5 us.

    Args:
        text: any string.
        signed: return it as a signed int64 value (``[-2**63, 2**63)``) instead of unsigned.

    Returns:
        An int in ``[0, 2**64)``, or ``[-2**63, 2**63)`` when ``signed``.
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=signed)
