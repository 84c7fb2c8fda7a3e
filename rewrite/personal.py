"""Read side of the personal layer: one user's successful history in the active version.

The nightly job publishes ``qrw:{version}:personal:{pseudo_user}`` hashes
(:func:`rewrite.keyspace.personal_version_key`); :class:`PersonalStore` fetches the requesting
user's one with a single ``HGETALL`` — or a micro-batch's users with one pipelined round trip
— unless the version's filter of users with a history
(:func:`rewrite.keyspace.personal_users_key`, read once per version) says the user has none.
It receives the raw user id from the request and pseudonymizes it itself
(:func:`rewrite.privacy.pseudonymize`), so a caller can only ever read the history of the user
it names — there is no lookup by pseudonym.

Failure handling is the same as :class:`rewrite.store.PairStore`: short socket timeouts, no
retries, any Redis failure raises :class:`~rewrite.store.StoreUnavailableError` (the pipeline
degrades to pass-through) and the store backs off for ``retry_after_s`` seconds so an outage
costs no latency.

Decoded histories are kept in an in-process cache (``service.personal_cache_mb`` of decoded
arrays, entries expire after ``service.personal_cache_ttl_s`` seconds): a published version's
hashes never change, and the online layer fires on rephrases and retries, which follow the
same user's failed request within seconds, so the second read of a history is the common
case. The one exception to immutability is ``qrw forget-user``, which deletes a user's hashes:
the expiry bounds how long a running service keeps answering from a forgotten user's cached
history. While Redis is marked down the cache is not consulted (an outage stays a
pass-through).

A history is stored packed (:func:`pack_history`: one binary field, decoded with numpy
views, no JSON) and kept as stored: its passage vectors stay float16 in the cache (half the
memory of float32) and are scored by FAISS's fp16 scalar quantizer
(:meth:`PersonalHistory.top`). Versions published before the packed layout (JSON lists
and a vectors field) are still read. Library: redis-py, numpy, cachetools, FAISS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from cachetools import TTLCache

from rewrite import keyspace, metrics
from rewrite.config import Settings
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.redis_server import resolve_redis_url
from rewrite.retrieval import faiss_threads_on_this_thread
from rewrite.store import MembershipFilter, RedisReader, StoreUnavailableError

log = logging.getLogger(__name__)

__all__ = [
    "PACKED_FIELD",
    "UNKNOWN_ROW",
    "PersonalHistory",
    "PersonalStore",
    "StoreUnavailableError",
    "fp16_scorer",
    "pack_history",
    "unpack_history",
]

#: :attr:`PersonalHistory.catalog_rows` of an entry not looked up in the catalog yet.
UNKNOWN_ROW = -2
#: Field of a packed personal hash (:func:`pack_history`).
PACKED_FIELD = b"packed"
#: First bytes of a packed history; the format number follows.
PACKED_MAGIC = b"QRWH"
PACKED_FORMAT = 1
#: Header: magic, format (uint16), reserved (uint16), n entries (uint32), dim (uint32; 0 = no
#: vectors), bytes of the UTF-8 texts (uint32), little-endian.
_HEADER = struct.Struct("<4sHHIII")
#: Separator of the texts (UTF-8) at the end of a packed history; never inside a text.
_TEXT_SEP = "\x00"


@dataclass(frozen=True)
class PersonalHistory:
    """One user's successful utterances in one published version, most used first.

    The passage vectors are kept as stored, float16 (half the memory of float32), inside a
    FAISS ``IndexScalarQuantizer`` (QT_fp16, inner product) that :meth:`top` searches;
    :attr:`vectors` decodes a float32 copy for inspection.

    Attributes:
        user: pseudonymous user key (never the raw id).
        version: published version id the history was read from ("" when none is active).
        texts: normalized utterances, ``n`` of them.
        counts: ``(n,)`` int64, the user's successful uses of each.
        last_seen: ``(n,)`` float64, the user's latest successful use, epoch seconds.
        scorer: the FAISS index holding the ``(n, dim)`` float16 vectors
            (:func:`fp16_scorer`), or None when the version holds no vectors.
        catalog_rows: ``(n,)`` int64, each entry's row in this version's global index as the
            personal stage found it (-1 not in the catalog, :data:`UNKNOWN_ROW` not looked up
            yet; :func:`rewrite.online.history_lookup`): a cached history pays the catalog's
            hash search once per entry, not on every request. 8 bytes an entry, counted in
            :attr:`nbytes`. Not part of equality.
    """

    user: str
    version: str
    texts: tuple[str, ...]
    counts: np.ndarray
    last_seen: np.ndarray
    scorer: Any = None
    catalog_rows: np.ndarray = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # a frozen dataclass: the memo array is set once here and only its items change
        object.__setattr__(self, "catalog_rows", np.full(len(self.texts), UNKNOWN_ROW))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (0 without vectors)."""
        return 0 if self.scorer is None else int(self.scorer.d)

    @property
    def vectors(self) -> np.ndarray | None:
        """``(n, dim)`` float32, the stored float16 vectors decoded (a new array, exact
        values), or None without vectors. For inspection and tests; scoring uses
        :meth:`top`."""
        if self.scorer is None:
            return None
        return np.asarray(self.scorer.reconstruct_n(0, len(self)), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Approximate memory of the decoded history, bytes (arrays + float16 codes + texts +
        fixed overhead)."""
        arrays = self.counts.nbytes + self.last_seen.nbytes + self.catalog_rows.nbytes
        if self.scorer is not None:
            arrays += int(self.scorer.codes.size())
        return 512 + arrays + sum(49 + len(t) for t in self.texts)

    def count_of(self, text: str) -> int:
        """The user's successful uses of a normalized utterance (0 when not in the history)."""
        try:
            return int(self.counts[self.texts.index(text)])
        except ValueError:
            return 0

    def top(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` history entries closest to a query vector by inner product: an exact
        search of the float16 codes by FAISS's fp16 scalar quantizer (half floats decoded in
        SIMD registers, accumulated in float32; within ~1e-7 of ``vectors @ query``), ~7-8 us
        for 20-200 x 384 on one thread, about what a float32 product and an argsort cost.
        Runs on one OpenMP thread (:func:`rewrite.retrieval.faiss_threads_on_this_thread`, as
        :meth:`rewrite.retrieval.GlobalIndex.search` does with its own count).

        Args:
            query: ``(dim,)`` float32, L2-normalised.
            k: entries wanted (fewer when the history is shorter; none when ``k <= 0``).

        Returns:
            ``(ids, scores)``: ``(m,)`` int64 entry positions and ``(m,)`` float32 inner
            products, ``m = min(k, n)``, best first, equal scores in entry order (as a stable
            argsort of all scores would give).

        Raises:
            ValueError: the history has no vectors, or ``query`` is not ``(dim,)``.
        """
        if self.scorer is None:
            raise ValueError(f"the personal history of {self.user} holds no vectors")
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"query of {q.shape[1]} dims for vectors of {self.dim}")
        m = min(max(k, 0), len(self))
        if m == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        faiss_threads_on_this_thread(1)
        dist, ids = self.scorer.search(q, m)
        order = np.lexsort((ids[0], -dist[0]))  # ties: entry order
        return ids[0][order].astype(np.int64), dist[0][order].astype(np.float32)

    @classmethod
    def empty(cls, user: str = "", version: str = "") -> PersonalHistory:
        """A history with no entries."""
        return cls(
            user,
            version,
            (),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.float64),
            None,
        )


class PersonalStore(RedisReader):
    """Fetches the requesting user's personal history from the active published version.

    Args:
        url: redis URL (``redis://``, ``rediss://`` or ``unix://``).
        user_key: HMAC key for pseudonymous user keys (the nightly job's key).
        socket_timeout_s, connect_timeout_s, version_cache_s, retry_after_s: as
            :class:`rewrite.store.RedisReader` (seconds).
        cache_mb: memory of decoded histories kept in process, MiB (0 = no cache).
        cache_ttl_s: seconds a cached history is served before Redis is read again (bounds
            how long a ``qrw forget-user`` takes to reach a running service).

    Raises:
        ValueError: ``user_key`` is empty, or a negative cache size or expiry.
    """

    role = "personal layer"

    def __init__(
        self,
        url: str,
        user_key: bytes,
        socket_timeout_s: float = 0.05,
        connect_timeout_s: float = 0.05,
        version_cache_s: float = 1.0,
        retry_after_s: float = 0.5,
        cache_mb: float = 0.0,
        cache_ttl_s: float = 30.0,
    ) -> None:
        if not user_key:
            raise ValueError("user_key must not be empty")
        if cache_mb < 0 or cache_ttl_s < 0:
            raise ValueError(f"cache_mb and cache_ttl_s must be >= 0: {cache_mb}, {cache_ttl_s}")
        super().__init__(
            url,
            socket_timeout_s,
            connect_timeout_s,
            version_cache_s,
            retry_after_s,
            decode_responses=False,  # vectors are raw float16 bytes
        )
        self._user_key = user_key
        size = int(cache_mb * 2**20)
        self._cache: TTLCache[tuple[str, str], PersonalHistory] | None = (
            TTLCache(maxsize=size, ttl=cache_ttl_s, getsizeof=_cache_size)
            if size > 0 and cache_ttl_s > 0
            else None
        )
        self._cache_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> PersonalStore:
        """Build from ``settings.redis`` (URL, timeouts), ``service.version_cache_s`` and
        ``privacy.user_key``; the cache from ``service.personal_cache_mb`` and
        ``service.personal_cache_ttl_s``."""
        return cls(
            resolve_redis_url(settings.redis.url, settings.redis.data_dir),
            user_key_from_settings(settings),
            socket_timeout_s=settings.redis.socket_timeout_s,
            connect_timeout_s=settings.redis.connect_timeout_s,
            version_cache_s=settings.service.version_cache_s,
            cache_mb=settings.service.personal_cache_mb,
            cache_ttl_s=settings.service.personal_cache_ttl_s,
        )

    def pseudonym(self, user_id: str) -> str:
        """The pseudonymous key of a raw user id under this store's key."""
        return pseudonymize(user_id, self._user_key)

    def user_filter(self, version: str) -> MembershipFilter | None:
        """The version's filter of pseudonyms with a personal history
        (:func:`rewrite.keyspace.personal_users_key`, read once per version), or None when the
        version was published without one (every user is then read from Redis).

        Raises:
            StoreUnavailableError: Redis failed.
        """
        return self._version_filter(keyspace.personal_users_key(version))

    def cached_history(self, user_id: str, version: str) -> PersonalHistory | None:
        """The user's history of ``version`` if the in-process cache holds it (and it has not
        expired), else None — no Redis read, never raises; None also without a cache or an
        id. For decisions that are only worth making when they are free (the catalog gate's
        ``already_succeeds``, :class:`rewrite.online.CatalogGateStage`, which hands what it
        found to the personal stage). A history found counts as a cache hit; a miss is not
        counted (the personal stage's read that follows is)."""
        if self._cache is None or not user_id or not version:
            return None
        user = self.pseudonym(user_id)
        hist = self._cached(version, [user])[user]
        if hist is not None:
            metrics.PERSONAL_CACHE_HIT.inc()
        return hist

    def _cached(self, version: str, users: Iterable[str]) -> dict[str, PersonalHistory | None]:
        """The cache's histories of ``version`` for pseudonymous ``users`` (None where it holds
        none, or has expired it), under one hold of the cache lock; counts nothing. Needs a
        cache."""
        assert self._cache is not None
        with self._cache_lock:
            return {user: self._cache.get((version, user)) for user in users}

    def history(self, user_id: str, version: str | None = None) -> PersonalHistory:
        """The personal history of the requesting user (:meth:`histories` of one user).

        Raises:
            StoreUnavailableError: Redis failed, or is marked down (backing off).
        """
        return self.histories([user_id], version)[0]

    def histories(
        self, user_ids: Sequence[str], version: str | None = None
    ) -> list[PersonalHistory]:
        """The personal histories of several requesting users (a micro-batch of requests), in
        the order given, with at most one Redis round trip: the in-process cache answers the
        users read recently, the version's user filter (:meth:`user_filter`) answers "no
        history" for pseudonyms that have none, and the rest are read with one pipelined
        ``HGETALL`` per user (redis-py ``pipeline(transaction=False)``).

        Args:
            user_ids: raw user ids from the requests (pseudonymized here); repeats allowed.
            version: read this published version (pass the one the pair store / global index
                answered from so layers never mix); None = the active version.

        Returns:
            One :class:`PersonalHistory` per user id (shared with the cache: do not modify its
            arrays); empty when the user has no history, the id is empty, nothing is
            published, or the stored hash is malformed (logged).

        Raises:
            StoreUnavailableError: Redis failed, or is marked down (backing off).
        """
        if version is None:
            version = self.active_version()
        out = [PersonalHistory.empty(version=version or "")] * len(user_ids)  # no id: none
        if version is None:
            return out
        users = [self.pseudonym(u) if u else "" for u in user_ids]
        if any(users):
            self._guard()
        todo: dict[str, list[int]] = {}
        for i, user in enumerate(users):
            if user:
                todo.setdefault(user, []).append(i)
        if todo and self._cache is not None:
            for user, hist in self._cached(version, todo).items():
                if hist is not None:
                    metrics.PERSONAL_CACHE_HIT.inc(len(todo[user]))
                    for i in todo.pop(user):
                        out[i] = hist
        if todo:
            members = self.user_filter(version)
            if members is not None:
                for user in [u for u in todo if u not in members]:
                    metrics.PERSONAL_FILTERED.inc(len(todo[user]))
                    hist = PersonalHistory.empty(user, version)
                    for i in todo.pop(user):
                        out[i] = hist
        if todo:
            if self._cache is not None:
                metrics.PERSONAL_CACHE_MISS.inc(sum(len(v) for v in todo.values()))
            try:
                if len(todo) == 1:
                    (user,) = todo
                    raws = [self._client.hgetall(keyspace.personal_version_key(version, user))]
                else:
                    pipe = self._client.pipeline(transaction=False)
                    for user in todo:
                        pipe.hgetall(keyspace.personal_version_key(version, user))
                    raws = pipe.execute()
            except (redis.RedisError, OSError) as e:
                raise self._fail(e) from e
            for (user, rows), raw in zip(todo.items(), raws, strict=True):
                hist = PersonalHistory.empty(user, version)
                if raw:
                    try:
                        hist = _decode(raw, user, version)
                    except (KeyError, ValueError, TypeError) as e:
                        log.warning("malformed personal history %s in %s: %s", user, version, e)
                if self._cache is not None:
                    # a history larger than the whole cache is not kept (cachetools: ValueError)
                    with self._cache_lock, contextlib.suppress(ValueError):
                        self._cache[(version, user)] = hist
                for i in rows:
                    out[i] = hist
        return out

    def cache_clear(self) -> None:
        """Drop every cached history (tests; a forget applied by hand)."""
        if self._cache is not None:
            with self._cache_lock:
                self._cache.clear()


def _cache_size(hist: PersonalHistory) -> int:
    return hist.nbytes


def fp16_scorer(blob: bytes | memoryview, n: int) -> Any:
    """A FAISS ``IndexScalarQuantizer`` (QT_fp16, ``METRIC_INNER_PRODUCT``) holding ``n`` rows
    of little-endian IEEE float16 (``blob``, ``n * dim * 2`` bytes, copied once into the
    index's codes). Its ``search`` scores the rows exactly against float32 queries and its
    ``reconstruct_n`` gives numpy's ``astype(float32)`` values.

    Raises:
        ValueError: ``blob`` does not hold ``n`` rows of float16.
    """
    size = len(blob)
    if n <= 0 or not size or size % (2 * n) != 0:
        raise ValueError(f"a blob of {size} bytes does not hold {n} float16 rows")
    import faiss

    dim = size // (2 * n)
    codes = np.frombuffer(blob, dtype="<f2")
    if sys.byteorder != "little":  # FAISS reads native byte order
        codes = codes.astype(np.float16)
    index = faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    faiss.copy_array_to_vector(codes.view(np.uint8), index.codes)
    index.ntotal = n
    return index


def pack_history(
    texts: Sequence[str],
    counts: Sequence[int] | np.ndarray,
    last_seen: Sequence[float] | np.ndarray,
    vectors: np.ndarray | None = None,
) -> bytes:
    """One user's history as the packed field of its Redis hash (:data:`PACKED_FIELD`).

    Layout, little-endian: header (:data:`PACKED_MAGIC`, format uint16, reserved uint16,
    ``n`` uint32, ``dim`` uint32 with 0 = no vectors, bytes of the texts uint32: a
    truncated or padded field is refused), ``counts`` ``(n,)`` int64,
    ``last_seen`` ``(n,)`` float64 epoch seconds, ``vectors`` ``(n, dim)`` float16, then the
    texts in UTF-8 separated by NUL. Read back with :func:`unpack_history` (numpy views and
    one ``split``: ~10-20 us for 200 entries, against ~35-125 us to parse the JSON lists of
    the first layout).

    Raises:
        ValueError: lengths differ, a text holds NUL, or ``vectors`` is not ``(n, dim)``.
    """
    n = len(texts)
    c = np.asarray(counts, dtype="<i8").reshape(-1)
    t = np.asarray(last_seen, dtype="<f8").reshape(-1)
    if c.shape != (n,) or t.shape != (n,):
        raise ValueError(f"{n} texts but {c.shape[0]} counts, {t.shape[0]} last_seen")
    if any(_TEXT_SEP in x for x in texts):
        raise ValueError("a personal-history text holds NUL")
    dim = 0
    vec = b""
    if vectors is not None and n:
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape[0] != n or v.shape[1] == 0:
            raise ValueError(f"vectors of shape {v.shape} for {n} texts")
        dim = int(v.shape[1])
        vec = np.ascontiguousarray(v, dtype="<f2").tobytes()
    text = _TEXT_SEP.join(texts).encode()
    head = _HEADER.pack(PACKED_MAGIC, PACKED_FORMAT, 0, n, dim, len(text))
    return b"".join((head, c.tobytes(), t.tobytes(), vec, text))


def unpack_history(blob: bytes, user: str = "", version: str = "") -> PersonalHistory:
    """Read a :func:`pack_history` field back (counts and last-seen copied out of ``blob``, the
    vectors copied into the history's FAISS scorer, so ``blob`` is not kept alive).

    Raises:
        ValueError: not a packed history of a known format, or truncated / inconsistent.
    """
    if len(blob) < _HEADER.size:
        raise ValueError(f"packed history of {len(blob)} bytes (shorter than its header)")
    magic, fmt, _reserved, n, dim, text_bytes = _HEADER.unpack_from(blob)
    if magic != PACKED_MAGIC or fmt != PACKED_FORMAT:
        raise ValueError(f"not a packed personal history of format {PACKED_FORMAT}")
    at = _HEADER.size
    end_vec = at + 16 * n + 2 * n * dim
    if len(blob) != end_vec + text_bytes:
        raise ValueError(
            f"packed history of {len(blob)} bytes, its header says {end_vec + text_bytes}"
        )
    counts = np.frombuffer(blob, dtype="<i8", count=n, offset=at).astype(np.int64)
    last_seen = np.frombuffer(blob, dtype="<f8", count=n, offset=at + 8 * n).astype(np.float64)
    texts = tuple(blob[end_vec:].decode("utf-8").split(_TEXT_SEP)) if n else ()
    if len(texts) != n:
        raise ValueError(f"packed history holds {len(texts)} texts for {n} entries")
    scorer = None
    if n and dim:
        scorer = fp16_scorer(memoryview(blob)[at + 16 * n : end_vec], n)
    counts.setflags(write=False)
    last_seen.setflags(write=False)
    return PersonalHistory(user, version, texts, counts, last_seen, scorer)


def _decode(raw: Mapping[bytes | str, bytes | str], user: str, version: str) -> PersonalHistory:
    """Parse a stored personal hash: the packed field, or the JSON lists (and ``vectors``
    field) of versions published before it.

    Raises:
        KeyError, ValueError, TypeError: a field is missing or inconsistent.
    """
    packed = raw.get(PACKED_FIELD)
    if packed is not None:
        if not isinstance(packed, bytes):
            raise TypeError("a packed history must be raw bytes")
        return unpack_history(packed, user, version)
    texts = tuple(str(t) for t in json.loads(raw[b"texts"]))
    counts = np.asarray(json.loads(raw[b"counts"]), dtype=np.int64).reshape(-1)
    last_seen = np.asarray(json.loads(raw[b"last_seen"]), dtype=np.float64).reshape(-1)
    n = len(texts)
    if counts.shape != (n,) or last_seen.shape != (n,):
        raise ValueError(f"{n} texts but {counts.shape[0]} counts, {last_seen.shape[0]} last_seen")
    scorer = None
    blob = raw.get(b"vectors")
    if blob is not None and n > 0:
        if not isinstance(blob, bytes):
            raise TypeError("vectors must be raw bytes")
        scorer = fp16_scorer(blob, n)  # ValueError: not n rows of float16
    counts.setflags(write=False)
    last_seen.setflags(write=False)
    return PersonalHistory(user, version, texts, counts, last_seen, scorer)
