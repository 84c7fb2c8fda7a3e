"""Read side of the Redis pair store used by the online service.

Lookups are one ``HGETALL`` per request; the active version id is cached for
``version_cache_s`` seconds. Any Redis failure raises :class:`StoreUnavailableError`, which the
Rewriter turns into a pass-through; after a failure the store backs off for
``retry_after_s`` seconds so an outage costs no latency, then tries again (recovery).
Library: redis-py.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rewrite import keyspace

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
        self._down_until = time.monotonic() + self.retry_after_s
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


class PairStore(RedisReader):
    """Precomputed-pair lookups against the active published version (see
    :class:`RedisReader` for the arguments and failure handling)."""

    role = "pairs"

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
        try:
            h = self._client.hgetall(keyspace.pair_key(version, normalized))
        except (redis.RedisError, OSError) as e:
            raise self._fail(e) from e
        if not h:
            return None
        return PairHit(
            rewrite=str(h["rewrite"]),
            confidence=float(h.get("confidence", 0.0)),
            support=int(h.get("support", 0)),
            n_users=int(h.get("n_users", 0)),
            version=version,
        )


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
