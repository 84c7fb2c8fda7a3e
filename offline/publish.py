"""Publish mined pairs to Redis as a new version, flip ``qrw:active`` atomically, roll back.

Protocol (see :mod:`rewrite.keyspace`):

1. take a publish lock (``SET NX EX``) so two jobs never publish at once;
2. write every key of the new version (pipelined batches); the version id is derived from
   the content hash, so re-publishing identical content rewrites identical keys
   (idempotent) and a crashed publish is finished by re-running it;
3. write ``meta`` with ``complete=1``;
4. in one ``MULTI/EXEC`` transaction: ``SET qrw:active``, push the id on ``qrw:versions``;
5. give versions beyond ``keep_versions`` a TTL so they expire later.

A reader that read ``qrw:active`` before step 4 keeps reading the old version's keys, which
are unchanged; after step 4 it reads the new one. It never sees a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from offline.markov import RewritePair
from rewrite import keyspace

log = logging.getLogger(__name__)

_BATCH = 2000


class PublishError(RuntimeError):
    """Publishing could not complete (Redis unreachable, lock held, ...)."""


@dataclass(frozen=True)
class PublishResult:
    """Outcome of :func:`publish_pairs`."""

    version: str
    previous: str | None
    n_pairs: int
    seconds: float
    unchanged: bool


def content_hash(pairs: Sequence[RewritePair]) -> str:
    """SHA-256 (hex) of the pairs' content, order-independent."""
    h = hashlib.sha256(b"qrw-pairs-v1\n")
    for p in sorted(pairs, key=lambda p: (p.source, p.rewrite)):
        row = [p.source, p.rewrite, f"{p.absorption_probability:.6f}", p.support, p.n_users]
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A redis-py client for publishing (longer timeouts than the service).

    Raises:
        PublishError: the server does not answer PING.
    """
    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        raise PublishError(
            f"Redis not reachable at {url}: {e}. Start the embedded one with `qrw redis start` "
            "or set REDIS_URL."
        ) from e
    return client


def _expire_version(client: redis.Redis, version: str, ttl_s: int) -> int:
    n = 0
    for key in client.scan_iter(match=keyspace.version_pattern(version), count=1000):
        client.expire(key, ttl_s)
        n += 1
    return n


def publish_pairs(
    client: redis.Redis,
    pairs: Sequence[RewritePair],
    keep_versions: int = 2,
    version_ttl_s: int = 14 * 24 * 3600,
    run_info: dict[str, str] | None = None,
    lock_ttl_s: int = 600,
) -> PublishResult:
    """Write ``pairs`` as a new version and make it active.

    Args:
        client: redis-py client (``decode_responses=True``).
        pairs: rewrite pairs; sources must be unique.
        keep_versions: versions kept without TTL (active + rollback targets), >= 1.
        version_ttl_s: TTL given to versions that fall out of the keep window, seconds.
        run_info: extra metadata stored in the version's meta hash.
        lock_ttl_s: publish-lock lifetime, seconds (a crashed job releases it by expiry).

    Returns:
        :class:`PublishResult`.

    Raises:
        PublishError: another publish holds the lock, or Redis failed.
        ValueError: duplicate sources in ``pairs``.
    """
    t0 = time.perf_counter()
    sources = [p.source for p in pairs]
    if len(set(sources)) != len(sources):
        raise ValueError("duplicate sources in pairs")
    digest = content_hash(pairs)
    version = f"v{digest[:16]}"
    token = f"{version}:{time.time_ns()}"
    try:
        if not client.set(keyspace.PUBLISH_LOCK, token, nx=True, ex=lock_ttl_s):
            raise PublishError("another publish is in progress (lock held)")
        try:
            prev = client.get(keyspace.ACTIVE)
            previous = str(prev) if prev else None
            if previous == version:
                log.info("version %s already active; nothing to publish", version)
                return PublishResult(version, previous, len(pairs), 0.0, unchanged=True)
            pipe = client.pipeline(transaction=False)
            pipe.delete(keyspace.meta_key(version))
            for i, p in enumerate(pairs, start=1):
                key = keyspace.pair_key(version, p.source)
                pipe.delete(key)
                pipe.hset(
                    key,
                    mapping={
                        "rewrite": p.rewrite,
                        "confidence": f"{p.absorption_probability:.6f}",
                        "support": str(p.support),
                        "n_users": str(p.n_users),
                    },
                )
                if i % _BATCH == 0:
                    pipe.execute()
            pipe.execute()
            meta: dict[str, str] = {
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "n_pairs": str(len(pairs)),
                "content_hash": digest,
                **(run_info or {}),
            }
            for name, value in meta.items():
                client.hset(keyspace.meta_key(version), name, value)
            client.hset(keyspace.meta_key(version), "complete", "1")
            with client.pipeline(transaction=True) as tx:
                tx.set(keyspace.ACTIVE, version)
                tx.lrem(keyspace.VERSIONS, 0, version)
                tx.lpush(keyspace.VERSIONS, version)
                tx.execute()
            for v in client.lrange(keyspace.VERSIONS, max(1, keep_versions), -1):
                _expire_version(client, str(v), version_ttl_s)
            client.ltrim(keyspace.VERSIONS, 0, max(1, keep_versions) + 8)
        finally:
            if client.get(keyspace.PUBLISH_LOCK) == token:
                client.delete(keyspace.PUBLISH_LOCK)
    except (redis.RedisError, OSError) as e:
        raise PublishError(f"publish failed: {e}") from e
    secs = time.perf_counter() - t0
    log.info("published %s (%d pairs) in %.2f s; previous %s", version, len(pairs), secs, previous)
    return PublishResult(version, previous, len(pairs), secs, unchanged=False)


def rollback(client: redis.Redis, version_ttl_s: int = 14 * 24 * 3600) -> tuple[str, str]:
    """Make the previous complete version active again; the rolled-back one gets a TTL.

    Returns:
        ``(rolled_back_from, now_active)``.

    Raises:
        PublishError: no previous complete version exists.
    """
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keyspace.ACTIVE, keyspace.VERSIONS)
                cur = pipe.get(keyspace.ACTIVE)
                current = str(cur) if cur else None
                history = [str(v) for v in pipe.lrange(keyspace.VERSIONS, 0, -1) if v != current]
                target = next(
                    (v for v in history if pipe.hget(keyspace.meta_key(v), "complete") == "1"),
                    None,
                )
                if current is None or target is None:
                    raise PublishError("no previous complete version to roll back to")
                pipe.multi()
                pipe.set(keyspace.ACTIVE, target)
                pipe.lrem(keyspace.VERSIONS, 0, current)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    for key in client.scan_iter(match=keyspace.version_pattern(target), count=1000):
        client.persist(key)
    _expire_version(client, str(current), version_ttl_s)
    log.info("rolled back %s -> %s", current, target)
    return str(current), str(target)


def active_version(client: redis.Redis) -> dict[str, str]:
    """``{"active": id, **meta}`` of the active version ({} when none)."""
    v = client.get(keyspace.ACTIVE)
    if not v:
        return {}
    meta = client.hgetall(keyspace.meta_key(str(v)))
    return {"active": str(v), **{str(k): str(x) for k, x in meta.items()}}
