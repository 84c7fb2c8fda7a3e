"""Read side of the Redis pair store used by the online service.

Lookups are one ``HGETALL`` per request, or none when the utterance is not among the version's
pair sources (:class:`MembershipFilter`, read once per version: most traffic has no pair, and
every online request first asks for one) or when the answer (a pair or "no pair") for the
same normalized utterance in the same published version is in the in-process LRU cache
(``service.pair_cache_size`` entries, cachetools): a published version never changes, so
neither needs invalidation; a new active version (publish, rollback) is simply another
key. The active version id is cached for ``version_cache_s`` seconds. Any Redis failure
raises :class:`StoreUnavailableError`, which the Rewriter turns into a pass-through; after a
failure the store backs off for ``retry_after_s`` seconds so an outage costs no latency, then
tries again (recovery).
Library: redis-py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import redis
from cachetools import LRUCache
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.retry import Retry

from rewrite import keyspace, metrics
from rewrite.hashing import stable_hash64

log = logging.getLogger(__name__)


class StoreUnavailableError(RuntimeError):
    """Redis could not be reached or answered with an error."""


@dataclass(frozen=True)
class PairHit:
    """A precomputed rewrite: ``confidence`` is the absorption probability in [0, 1]."""

    rewrite: str
    confidence: float
    support: int
    n_users: int
    version: str


_NOT_CACHED = object()
#: Bytes per ``GETRANGE`` when a membership filter is read (each well inside the socket
#: timeout; 1M members = 8 MB = 4 reads).
_FILTER_CHUNK = 2 * 2**20
#: Versions whose filters are kept per kind (the active one and the one before a flip or
#: rollback).
_FILTERS_KEPT = 2


class RedisReader:
    """The service's read side of Redis: short timeouts, no retries, back-off after a failure,
    and the active version id cached for ``version_cache_s`` seconds. Shared by
    :class:`PairStore` and :class:`rewrite.personal.PersonalStore`.

    Args:
        url: redis URL (``redis://``, ``rediss://`` or ``unix://``).
        socket_timeout_s: per-command timeout, seconds.
        connect_timeout_s: connect timeout, seconds.
        version_cache_s: how long the active version id is cached, seconds.
        retry_after_s: back-off after a failure before Redis is tried again, seconds.
        decode_responses: str replies (True) or bytes (False, for binary fields).
    """

    #: named in the log line of a failure
    role = "redis"

    def __init__(
        self,
        url: str,
        socket_timeout_s: float = 0.05,
        connect_timeout_s: float = 0.05,
        version_cache_s: float = 1.0,
        retry_after_s: float = 0.5,
        decode_responses: bool = True,
    ) -> None:
        self.url = url
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            decode_responses=decode_responses,
            retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.version_cache_s = version_cache_s
        self.retry_after_s = retry_after_s
        self._version: str | None = None
        self._version_at = -1e18
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._filters: dict[str, MembershipFilter | None] = {}  # by Redis key

    def _version_filter(self, key: str) -> MembershipFilter | None:
        """The :class:`MembershipFilter` under ``key`` (a key of one published version), read
        from Redis once and kept (a published version never changes; the ``_FILTERS_KEPT``
        filters read last are kept).

        Raises:
            StoreUnavailableError: Redis failed (nothing is remembered: read again next time).
        """
        known = self._filters.get(key, _NOT_CACHED)
        if known is not _NOT_CACHED:
            return known if isinstance(known, MembershipFilter) else None
        try:
            found = read_membership_filter(self._client, key)
        except (redis.RedisError, OSError) as e:
            raise self._fail(e) from e
        with self._lock:
            while len(self._filters) >= _FILTERS_KEPT:
                self._filters.pop(next(iter(self._filters)))
            self._filters[key] = found
        return found

    @property
    def client(self) -> redis.Redis:
        return self._client

    def _guard(self) -> None:
        if time.monotonic() < self._down_until:
            raise StoreUnavailableError("redis marked down (backing off)")

    def _fail(self, err: Exception) -> StoreUnavailableError:
        """Back off for ``retry_after_s`` and forget the cached active version, so nothing is
        served again (from any cache) before Redis has answered once more."""
        self._down_until = time.monotonic() + self.retry_after_s
        with self._lock:
            self._version_at = -1e18
        log.warning("redis unavailable (%s): %s", self.role, err)
        return StoreUnavailableError(str(err))

    def active_version(self, refresh: bool = False) -> str | None:
        """The published version id (``qrw:active``), cached; None when nothing is published.

        Raises:
            StoreUnavailableError: Redis failed.
        """
        now = time.monotonic()
        if not refresh and now - self._version_at < self.version_cache_s:
            return self._version
        self._guard()
        try:
            v = self._client.get(keyspace.ACTIVE)
        except (redis.RedisError, OSError) as e:
            raise self._fail(e) from e
        with self._lock:
            self._version = v.decode() if isinstance(v, bytes) else (str(v) if v else None)
            self._version_at = now
        return self._version

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()


class MembershipFilter:
    """A set of strings of one published version — the pair sources
    (:func:`rewrite.keyspace.pair_sources_key`), or the pseudonyms with a personal history
    (:func:`rewrite.keyspace.personal_users_key`) — as a sorted array of their 64-bit BLAKE2b
    hashes (``hashlib``), 8 bytes a member, tested with a binary search (numpy
    ``searchsorted``, ~2 us).

    No false negatives; a false positive (a hash collision, odds ~n / 2**64) only costs the
    Redis read the filter saves. Written by the publisher (:meth:`to_bytes`).

    Args:
        hashes: ``(n,)`` uint64, sorted ascending, unique.

    Raises:
        ValueError: not a sorted, unique 1-d uint64 array.
    """

    def __init__(self, hashes: np.ndarray) -> None:
        if hashes.dtype != np.uint64 or hashes.ndim != 1:
            raise ValueError(
                f"a membership filter is (n,) uint64, got {hashes.dtype} {hashes.shape}"
            )
        if len(hashes) > 1 and not bool(np.all(hashes[1:] > hashes[:-1])):
            raise ValueError("a membership filter must be sorted and unique")
        self.hashes = hashes

    @staticmethod
    def hash(member: str) -> int:
        """64-bit BLAKE2b of the UTF-8 text (:func:`rewrite.hashing.stable_hash64`: stable
        across processes, unlike ``hash()``)."""
        return stable_hash64(member)

    @classmethod
    def build(cls, members: Iterable[str]) -> Self:
        """The filter of these strings (duplicates allowed)."""
        return cls(np.unique(np.fromiter((cls.hash(s) for s in members), dtype=np.uint64)))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Parse :meth:`to_bytes` (little-endian uint64).

        Raises:
            ValueError: a length that is not a multiple of 8, or unsorted hashes.
        """
        if len(raw) % 8:
            raise ValueError(f"membership filter of {len(raw)} bytes (not a multiple of 8)")
        return cls(np.frombuffer(raw, dtype="<u8").astype(np.uint64))

    def to_bytes(self) -> bytes:
        """Little-endian uint64 bytes, 8 per member."""
        return self.hashes.astype("<u8").tobytes()

    def without(self, member: str) -> Self:
        """A copy without ``member`` (unchanged when it is not in the filter)."""
        return type(self)(self.hashes[self.hashes != np.uint64(self.hash(member))])

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, member: object) -> bool:
        if not isinstance(member, str):
            return False
        h = np.uint64(self.hash(member))
        i = int(np.searchsorted(self.hashes, h))
        return i < len(self.hashes) and self.hashes[i] == h


def read_membership_filter(client: redis.Redis, key: str) -> MembershipFilter | None:
    """Read a :class:`MembershipFilter` string in chunks of ``GETRANGE`` (a large filter never
    blocks Redis, nor waits past the socket timeout, in one reply).

    Returns:
        The filter; None when the key does not exist (a version published without one), or
        when the string does not parse or changed while read (logged) — the caller then reads
        Redis for every request, as without a filter.

    Raises:
        redis.RedisError, OSError: Redis failed.
    """
    size = int(client.strlen(key))
    if size == 0:
        return MembershipFilter(np.zeros(0, dtype=np.uint64)) if client.exists(key) else None
    parts = [
        client.execute_command(
            "GETRANGE", key, start, min(start + _FILTER_CHUNK, size) - 1, **{NEVER_DECODE: True}
        )
        for start in range(0, size, _FILTER_CHUNK)
    ]
    raw = b"".join(parts)
    if len(raw) != size:  # rewritten while read (qrw forget-user)
        log.error("membership filter %s changed while read; not used", key)
        return None
    try:
        return MembershipFilter.from_bytes(raw)
    except ValueError as err:
        log.error("membership filter %s not used: %s", key, err)
        return None


class PairStore(RedisReader):
    """Precomputed-pair lookups against the active published version.

    Args:
        url, reader: :class:`RedisReader`'s arguments (timeouts, version cache, back-off; see
            there for the failure handling).
        pair_cache_size: entries of the in-process LRU cache of lookup answers keyed by
            ``(version, normalized)`` (pairs and misses; 0 = off). Both hits and misses are
            cached: most online traffic has no pair, and asking Redis again for the same
            utterance in the same immutable version would only add a round trip. While Redis
            is marked down (the back-off), the cache is not consulted either: an outage is a
            pass-through, as without the cache.

    After the cache, each version's pair-source :class:`MembershipFilter` (read at the
    version's first lookup; none for versions published without one) answers "no pair" for
    utterances that are no pair's source, without Redis and without filling the cache with
    misses.
    """

    role = "pairs"

    def __init__(self, url: str, pair_cache_size: int = 0, **reader: Any) -> None:
        super().__init__(url, **reader)
        self._cache: LRUCache[tuple[str, str], PairHit | None] | None = (
            LRUCache(maxsize=pair_cache_size) if pair_cache_size > 0 else None
        )
        self._cache_lock = threading.Lock()

    def source_filter(self, version: str) -> MembershipFilter | None:
        """The version's pair-source filter (read from Redis once per version), or None when
        the version has none or it does not parse (logged).

        Raises:
            StoreUnavailableError: Redis failed (nothing is remembered: read again next time).
        """
        return self._version_filter(keyspace.pair_sources_key(version))

    def lookup(self, normalized: str) -> PairHit | None:
        """The precomputed rewrite for a normalized utterance in the active version.

        Returns:
            :class:`PairHit`, or None when there is no pair or no active version.

        Raises:
            StoreUnavailableError: Redis failed.
        """
        version = self.active_version()
        if version is None:
            return None
        self._guard()
        key = (version, normalized)
        if self._cache is not None:
            with self._cache_lock:
                cached = self._cache.get(key, _NOT_CACHED)
            if cached is not _NOT_CACHED:
                metrics.PAIR_CACHE_HIT.inc()
                return cached if isinstance(cached, PairHit) else None
        sources = self.source_filter(version)
        if sources is not None and normalized not in sources:
            metrics.PAIR_FILTERED.inc()  # not cached: the filter answers as fast
            return None
        if self._cache is not None:
            metrics.PAIR_CACHE_MISS.inc()
        try:
            h = self._client.hgetall(keyspace.pair_key(version, normalized))
        except (redis.RedisError, OSError) as e:
            raise self._fail(e) from e
        hit = (
            PairHit(
                rewrite=str(h["rewrite"]),
                confidence=float(h.get("confidence", 0.0)),
                support=int(h.get("support", 0)),
                n_users=int(h.get("n_users", 0)),
                version=version,
            )
            if h
            else None
        )
        if self._cache is not None:
            with self._cache_lock:
                self._cache[key] = hit
        return hit


class StaticPairStore:
    """In-memory pair store with the :class:`PairStore` lookup interface.

    Used to evaluate a run directory's pairs without publishing them, and in tests.

    Args:
        pairs: ``{normalized source: (rewrite, confidence, support, n_users)}``.
        version: the version id reported in results.
    """

    def __init__(self, pairs: dict[str, tuple[str, float, int, int]], version: str) -> None:
        self._pairs = pairs
        self._version = version

    def active_version(self, refresh: bool = False) -> str | None:
        return self._version

    def lookup(self, normalized: str) -> PairHit | None:
        row = self._pairs.get(normalized)
        if row is None:
            return None
        return PairHit(row[0], float(row[1]), int(row[2]), int(row[3]), self._version)

    def close(self) -> None:
        return None
