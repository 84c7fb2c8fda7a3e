"""Read side of the Redis pair store used by the online service.

Lookups are one ``HGETALL`` per request, or none when the answer (a pair or "no pair") for
the same normalized utterance in the same published version is in the in-process LRU cache
(``service.pair_cache_size`` entries, cachetools): a published version never changes, so
the cache needs no invalidation; a new active version (publish, rollback) is simply another
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
from dataclasses import dataclass
from typing import Any

import redis
from cachetools import LRUCache
from redis.backoff import NoBackoff
from redis.retry import Retry

from rewrite import keyspace, metrics

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


_NOT_CACHED = object()


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
    """

    role = "pairs"

    def __init__(self, url: str, pair_cache_size: int = 0, **reader: Any) -> None:
        super().__init__(url, **reader)
        self._cache: LRUCache[tuple[str, str], PairHit | None] | None = (
            LRUCache(maxsize=pair_cache_size) if pair_cache_size > 0 else None
        )
        self._cache_lock = threading.Lock()

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
