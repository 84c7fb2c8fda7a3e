"""Read side of the personal layer: one user's successful history in the active version.

The nightly job publishes ``qrw:{version}:personal:{pseudo_user}`` hashes
(:func:`rewrite.keyspace.personal_version_key`); :class:`PersonalStore` fetches the requesting
user's one with a single ``HGETALL``. It receives the raw user id from the request and
pseudonymizes it itself (:func:`rewrite.privacy.pseudonymize`), so a caller can only ever read
the history of the user it names — there is no lookup by pseudonym.

Failure handling is the same as :class:`rewrite.store.PairStore`: short socket timeouts, no
retries, any Redis failure raises :class:`~rewrite.store.StoreUnavailableError` (the pipeline
degrades to pass-through) and the store backs off for ``retry_after_s`` seconds so an outage
costs no latency. Library: redis-py, numpy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import redis

from rewrite import keyspace
from rewrite.config import Settings
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.redis_server import resolve_redis_url
from rewrite.store import RedisReader, StoreUnavailableError

log = logging.getLogger(__name__)

__all__ = ["PersonalHistory", "PersonalStore", "StoreUnavailableError"]


@dataclass(frozen=True)
class PersonalHistory:
    """One user's successful utterances in one published version, most used first.

    Attributes:
        user: pseudonymous user key (never the raw id).
        version: published version id the history was read from ("" when none is active).
        texts: normalized utterances, ``n`` of them.
        counts: ``(n,)`` int64, the user's successful uses of each.
        last_seen: ``(n,)`` float64, the user's latest successful use, epoch seconds.
        vectors: ``(n, dim)`` float32, L2-normalised passage vectors (stored as float16), or
            None when the version holds no vectors.
    """

    user: str
    version: str
    texts: tuple[str, ...]
    counts: np.ndarray
    last_seen: np.ndarray
    vectors: np.ndarray | None

    def __len__(self) -> int:
        return len(self.texts)

    def count_of(self, text: str) -> int:
        """The user's successful uses of a normalized utterance (0 when not in the history)."""
        try:
            return int(self.counts[self.texts.index(text)])
        except ValueError:
            return 0

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

    Raises:
        ValueError: ``user_key`` is empty.
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
    ) -> None:
        if not user_key:
            raise ValueError("user_key must not be empty")
        super().__init__(
            url,
            socket_timeout_s,
            connect_timeout_s,
            version_cache_s,
            retry_after_s,
            decode_responses=False,  # vectors are raw float16 bytes
        )
        self._user_key = user_key

    @classmethod
    def from_settings(cls, settings: Settings) -> PersonalStore:
        """Build from ``settings.redis`` (URL, timeouts), ``service.version_cache_s`` and
        ``privacy.user_key``."""
        return cls(
            resolve_redis_url(settings.redis.url, settings.redis.data_dir),
            user_key_from_settings(settings),
            socket_timeout_s=settings.redis.socket_timeout_s,
            connect_timeout_s=settings.redis.connect_timeout_s,
            version_cache_s=settings.service.version_cache_s,
        )

    def pseudonym(self, user_id: str) -> str:
        """The pseudonymous key of a raw user id under this store's key."""
        return pseudonymize(user_id, self._user_key)

    def history(self, user_id: str, version: str | None = None) -> PersonalHistory:
        """The personal history of the requesting user.

        Args:
            user_id: the raw user id from the request (pseudonymized here).
            version: read this published version (pass the one the pair store / global index
                answered from so layers never mix); None = the active version.

        Returns:
            :class:`PersonalHistory`; empty when the user has no history, ``user_id`` is empty,
            nothing is published, or the stored hash is malformed (logged).

        Raises:
            StoreUnavailableError: Redis failed.
        """
        if version is None:
            version = self.active_version()
        if not user_id or version is None:
            return PersonalHistory.empty(version=version or "")
        user = self.pseudonym(user_id)
        self._guard()
        try:
            raw = self._client.hgetall(keyspace.personal_version_key(version, user))
        except (redis.RedisError, OSError) as e:
            raise self._fail(e) from e
        if not raw:
            return PersonalHistory.empty(user, version)
        try:
            return _decode(raw, user, version)
        except (KeyError, ValueError, TypeError) as e:
            log.warning("malformed personal history %s in %s: %s", user, version, e)
            return PersonalHistory.empty(user, version)


def _decode(raw: Mapping[bytes | str, bytes | str], user: str, version: str) -> PersonalHistory:
    """Parse a stored personal hash.

    Raises:
        KeyError, ValueError, TypeError: a field is missing or inconsistent.
    """
    texts = tuple(str(t) for t in json.loads(raw[b"texts"]))
    counts = np.asarray(json.loads(raw[b"counts"]), dtype=np.int64).reshape(-1)
    last_seen = np.asarray(json.loads(raw[b"last_seen"]), dtype=np.float64).reshape(-1)
    n = len(texts)
    if counts.shape != (n,) or last_seen.shape != (n,):
        raise ValueError(f"{n} texts but {counts.shape[0]} counts, {last_seen.shape[0]} last_seen")
    vectors: np.ndarray | None = None
    blob = raw.get(b"vectors")
    if blob is not None and n > 0:
        if not isinstance(blob, bytes):
            raise TypeError("vectors must be raw bytes")
        if len(blob) % (2 * n) != 0 or not blob:
            raise ValueError(f"vectors blob of {len(blob)} bytes does not hold {n} rows")
        vectors = np.frombuffer(blob, dtype="<f2").reshape(n, -1).astype(np.float32)
    return PersonalHistory(user, version, texts, counts, last_seen, vectors)
