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
pass-through). Library: redis-py, numpy, cachetools, FAISS (float16 decoding).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis
from cachetools import TTLCache

from rewrite import keyspace, metrics
from rewrite.config import Settings
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.redis_server import resolve_redis_url
from rewrite.store import MembershipFilter, RedisReader, StoreUnavailableError

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

    @property
    def nbytes(self) -> int:
        """Approximate memory of the decoded history, bytes (arrays + texts + fixed overhead)."""
        arrays = self.counts.nbytes + self.last_seen.nbytes
        if self.vectors is not None:
            arrays += self.vectors.nbytes
        return 512 + arrays + sum(49 + len(t) for t in self.texts)

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
            with self._cache_lock:
                cached = {user: self._cache.get((version, user)) for user in todo}
            for user, hist in cached.items():
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


def fp16_to_fp32(blob: bytes, n: int) -> np.ndarray:
    """``n`` rows of little-endian IEEE float16 (``blob``, ``n * dim * 2`` bytes) as an
    ``(n, dim)`` float32 array, the same values as numpy's ``astype``, converted by FAISS's
    fp16 scalar quantizer (``faiss.ScalarQuantizer(dim, QT_fp16).decode``: F16C/SIMD
    instructions; numpy converts half floats one at a time: 45 vs 135 µs for 200 x 384).

    Raises:
        ValueError: ``blob`` does not hold ``n`` rows of float16.
    """
    if n <= 0 or not blob or len(blob) % (2 * n) != 0:
        raise ValueError(f"a blob of {len(blob)} bytes does not hold {n} float16 rows")
    if sys.byteorder != "little":  # FAISS decodes native byte order
        return np.frombuffer(blob, dtype="<f2").reshape(n, -1).astype(np.float32)
    import faiss

    dim = len(blob) // (2 * n)
    codes = np.frombuffer(blob, dtype=np.uint8).reshape(n, 2 * dim)
    sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    return np.asarray(sq.decode(codes), dtype=np.float32).reshape(n, dim)


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
        vectors = fp16_to_fp32(blob, n)  # ValueError: not n rows of float16
        vectors.setflags(write=False)
    counts.setflags(write=False)
    last_seen.setflags(write=False)
    return PersonalHistory(user, version, texts, counts, last_seen, vectors)
