"""Publish mined pairs to Redis as a new version, flip ``qrw:active`` atomically, roll back.

Protocol (see :mod:`rewrite.keyspace`):

1. take a publish lock (``SET NX EX``) so two jobs never publish at once — a lease of
   ``lock_ttl_s`` seconds renewed while the publish runs, so the lock of a killed publisher
   expires within ``lock_ttl_s``; a publish that finds the lock held waits up to
   ``lock_wait_s`` for it;
2. write every key of the new version (pipelined batches); the version id is derived from
   the content hash, so re-publishing identical content rewrites identical keys
   (idempotent) and a crashed publish is finished by re-running it;
   — the rewrite pairs and, when given, each user's personal history
   (``qrw:{version}:personal:{pseudo_user}``, packed, optionally with float16 passage
   vectors),
   skipping users on the forget set ``qrw:forgotten`` (``qrw forget-user``), and the two
   membership filters the service reads once per version instead of asking Redis per
   request: the pair sources and the pseudonyms with a personal history;
3. write ``meta`` with ``complete=1``;
4. in one ``MULTI/EXEC`` transaction, only while this publish still holds the lock (``WATCH``
   on it): ``SET qrw:active``, push the id on ``qrw:versions``;
5. give versions beyond ``keep_versions`` a TTL so they expire later.

A publisher killed before step 4 leaves the previous version active and a half-written one
that no reader ever looks at (not active, not in ``qrw:versions``, no ``complete`` meta);
re-running the job on the same input rewrites the same keys under the same id and flips.

A reader that read ``qrw:active`` before step 4 keeps reading the old version's keys, which
are unchanged; after step 4 it reads the new one. It never sees a mix.

The version id is ``v`` + the first 16 hex chars of :func:`version_content_hash`: pairs only →
:func:`content_hash` (unchanged ids for pair-only publishes); with personal histories, an
encoder id or extra content, a hash over all of them, so identical input → identical id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
from redis.typing import EncodableT, FieldT

from offline.catalog import PersonalEntry
from offline.markov import RewritePair
from rewrite import keyspace
from rewrite.personal import PACKED_FIELD, pack_history
from rewrite.store import MembershipFilter

log = logging.getLogger(__name__)

_BATCH = 2000
_ENCODE_BATCH = 4096

Encode = Callable[[Sequence[str]], np.ndarray]


class PublishError(RuntimeError):
    """Publishing could not complete (Redis unreachable, lock held, ...)."""


#: Test hook (off by default): when this environment variable holds a number of seconds,
#: :func:`publish_pairs` pauses that long after writing the new version's pair and personal
#: keys and before its meta and the flip, renewing its lock and logging a WARNING with this
#: name first — so a test can kill a publisher that has half-written a version.
TEST_PAUSE_ENV = "QRW_TEST_PUBLISH_PAUSE_S"

# compare-and-renew / compare-and-delete of the lock: only the holder's token may touch it
_RENEW_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class _PublishLock:
    """The publish lock as a lease: ``SET NX EX ttl_s`` with a unique token, renewed by
    :meth:`renew` at most every ``ttl_s / 3`` seconds, released only by its holder.

    Args:
        client: redis-py client (``decode_responses=True``).
        token: this publish's unique value.
        ttl_s: lease length, seconds (>= 1).
    """

    def __init__(self, client: redis.Redis, token: str, ttl_s: int) -> None:
        self.client, self.token, self.ttl_s = client, token, max(1, int(ttl_s))
        self._renewed = time.monotonic()

    def acquire(self, wait_s: float) -> float:
        """Take the lock, polling every 0.1 s for up to ``wait_s`` seconds.

        Returns:
            Seconds waited.

        Raises:
            PublishError: still held by another publish after ``wait_s``.
        """
        t0 = time.monotonic()
        while not self.client.set(keyspace.PUBLISH_LOCK, self.token, nx=True, ex=self.ttl_s):
            if time.monotonic() - t0 >= wait_s:
                raise PublishError(
                    f"another publish is in progress (lock held; waited {wait_s:.0f} s; a "
                    f"crashed publisher's lock expires within its lease)"
                )
            time.sleep(0.1)
        self._renewed = time.monotonic()
        return self._renewed - t0

    def renew(self, force: bool = False) -> None:
        """Extend the lease to ``ttl_s`` (when a third of it has passed, or ``force``).

        Raises:
            PublishError: the lock expired and is no longer ours (nothing was flipped).
        """
        now = time.monotonic()
        if not force and now - self._renewed < self.ttl_s / 3:
            return
        if not self.client.eval(_RENEW_LOCK, 1, keyspace.PUBLISH_LOCK, self.token, self.ttl_s):
            raise PublishError("lost the publish lock (its lease expired); re-run the job")
        self._renewed = now

    def release(self) -> None:
        """Delete the lock if this publish still holds it."""
        self.client.eval(_RELEASE_LOCK, 1, keyspace.PUBLISH_LOCK, self.token)


def _test_pause(lock: _PublishLock) -> None:
    """The :data:`TEST_PAUSE_ENV` hook; returns at once unless the variable is set."""
    raw = os.environ.get(TEST_PAUSE_ENV)
    if not raw:
        return
    pause_s = float(raw)
    log.warning("%s: publish paused %.1f s before the flip", TEST_PAUSE_ENV, pause_s)
    end = time.monotonic() + pause_s
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.1, left))
        lock.renew()


@dataclass(frozen=True)
class PublishResult:
    """Outcome of :func:`publish_pairs`."""

    version: str
    previous: str | None
    n_pairs: int
    seconds: float
    unchanged: bool
    n_personal_users: int = 0
    n_forgotten_skipped: int = 0


def content_hash(pairs: Sequence[RewritePair]) -> str:
    """SHA-256 (hex) of the pairs' content, order-independent."""
    h = hashlib.sha256(b"qrw-pairs-v1\n")
    for p in sorted(pairs, key=lambda p: (p.source, p.rewrite)):
        row = [p.source, p.rewrite, f"{p.absorption_probability:.6f}", p.support, p.n_users]
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _personal_groups(
    personal: Sequence[PersonalEntry],
) -> list[tuple[str, list[PersonalEntry]]]:
    """Entries grouped by user (ascending), each most used first, then most recent, then text.

    Raises:
        ValueError: a (user, text) pair occurs twice.
    """
    by_user: dict[str, list[PersonalEntry]] = {}
    for e in personal:
        by_user.setdefault(e.user, []).append(e)
    groups = []
    for user in sorted(by_user):
        entries = sorted(by_user[user], key=lambda e: (-e.count, -e.last_seen, e.text))
        if len({e.text for e in entries}) != len(entries):
            raise ValueError(f"duplicate texts in the personal history of user {user}")
        groups.append((user, entries))
    return groups


def personal_content_hash(personal: Sequence[PersonalEntry]) -> str:
    """SHA-256 (hex) of personal histories, independent of the input order.

    Raises:
        ValueError: a (user, text) pair occurs twice.
    """
    # v2: the packed layout (rewrite.personal.pack_history); a version's stored bytes differ
    h = hashlib.sha256(b"qrw-personal-v2\n")
    for user, entries in _personal_groups(personal):
        rows = [[e.text, e.count, repr(float(e.last_seen))] for e in entries]
        h.update(json.dumps([user, rows], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def version_content_hash(
    pairs: Sequence[RewritePair],
    personal: Sequence[PersonalEntry] = (),
    encoder_id: str | None = None,
    with_vectors: bool = False,
    extra_content: Mapping[str, str] | None = None,
) -> str:
    """SHA-256 (hex) of everything a published version holds.

    Pairs only (no personal entries, encoder id, vectors or extra content) gives exactly
    :func:`content_hash` of the pairs. Otherwise a hash over the pairs' hash, the personal
    histories' hash, ``encoder_id`` (which identifies the vectors), ``with_vectors`` and
    ``extra_content`` (e.g. ``{"index_sha256": ...}`` of the version's FAISS index).
    """
    pairs_digest = content_hash(pairs)
    if not personal and encoder_id is None and not with_vectors and not extra_content:
        return pairs_digest
    h = hashlib.sha256(b"qrw-version-v2\n")
    parts = [
        pairs_digest,
        personal_content_hash(personal),
        encoder_id or "",
        "vectors" if with_vectors else "no-vectors",
        sorted((extra_content or {}).items()),
    ]
    h.update(json.dumps(parts, ensure_ascii=False).encode())
    return h.hexdigest()


def _encode_personal(
    groups: Sequence[tuple[str, list[PersonalEntry]]], encode: Encode
) -> tuple[dict[str, int], np.ndarray]:
    """Encode each distinct personal text once (batches of 4096).

    Returns:
        (``{text: row}``, ``(n_texts, dim)`` little-endian float16, rows L2-normalised).

    Raises:
        ValueError: ``encode`` returned the wrong shape or non-finite values.
    """
    texts = sorted({e.text for _, entries in groups for e in entries})
    chunks: list[np.ndarray] = []
    dim = -1
    for i in range(0, len(texts), _ENCODE_BATCH):
        batch = texts[i : i + _ENCODE_BATCH]
        vecs = np.asarray(encode(batch), dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(batch) or (dim >= 0 and vecs.shape[1] != dim):
            raise ValueError(f"encode returned shape {vecs.shape} for {len(batch)} texts")
        if not np.isfinite(vecs).all():
            raise ValueError("encode returned non-finite values")
        dim = vecs.shape[1]
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        chunks.append(vecs.astype("<f2"))
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype="<f2")
    return {t: i for i, t in enumerate(texts)}, matrix


def _personal_mapping(
    entries: Sequence[PersonalEntry],
    rows: dict[str, int] | None,
    matrix: np.ndarray | None,
) -> dict[FieldT, EncodableT]:
    """One user's personal hash: the packed history (:func:`rewrite.personal.pack_history`)."""
    vectors = None
    if rows is not None and matrix is not None:
        idx = np.fromiter((rows[e.text] for e in entries), dtype=np.int64, count=len(entries))
        vectors = matrix[idx]
    packed = pack_history(
        [e.text for e in entries],
        [int(e.count) for e in entries],
        [float(e.last_seen) for e in entries],
        vectors,
    )
    return {PACKED_FIELD.decode(): packed}


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


def _expire_version(
    client: redis.Redis, version: str, ttl_s: int, renew: Callable[[], None] | None = None
) -> int:
    """Give every key of ``version`` a TTL of ``ttl_s`` seconds (``renew`` called per key)."""
    n = 0
    for key in client.scan_iter(match=keyspace.version_pattern(version), count=1000):
        client.expire(key, ttl_s)
        n += 1
        if renew is not None:
            renew()
    return n


def _expire_superseded(
    client: redis.Redis, keep_versions: int, ttl_s: int, renew: Callable[[], None]
) -> None:
    """TTL for the versions beyond the ``keep_versions`` newest; trim the history list."""
    for v in client.lrange(keyspace.VERSIONS, max(1, keep_versions), -1):
        _expire_version(client, str(v), ttl_s, renew)
    client.ltrim(keyspace.VERSIONS, 0, max(1, keep_versions) + 8)


def publish_pairs(
    client: redis.Redis,
    pairs: Sequence[RewritePair],
    keep_versions: int = 2,
    version_ttl_s: int = 14 * 24 * 3600,
    run_info: dict[str, str] | None = None,
    lock_ttl_s: int = 30,
    *,
    lock_wait_s: float = 0.0,
    personal: Sequence[PersonalEntry] = (),
    encode: Encode | None = None,
    encoder_id: str | None = None,
    index_dir: str | Path | None = None,
    extra_content: Mapping[str, str] | None = None,
) -> PublishResult:
    """Write ``pairs`` (and personal histories) as a new version and make it active.

    Args:
        client: redis-py client (``decode_responses=True``).
        pairs: rewrite pairs; sources must be unique.
        keep_versions: versions kept without TTL (active + rollback targets), >= 1.
        version_ttl_s: TTL given to versions that fall out of the keep window, seconds.
        run_info: extra metadata stored in the version's meta hash.
        lock_ttl_s: publish-lock lease, seconds: renewed while this publish runs, so a
            crashed or killed publisher's lock expires within this time.
        lock_wait_s: how long to wait for a lock held by another publish, seconds (0 = fail
            at once).
        personal: personal-history entries (pseudonymous users), written as one hash per user
            (``qrw:{version}:personal:{user}``) whose ``packed`` field holds texts, counts,
            last-seen times and vectors (:func:`rewrite.personal.pack_history`).
            Users on the forget set ``qrw:forgotten`` are skipped (counted in
            ``n_forgotten_skipped``).
        encode: passage encoder, ``texts -> (n, dim) float32`` L2-normalised (e.g.
            ``rewrite.encoder.PassageEncoder.encode``); when given, each history also packs
            its vectors (float16, ``(n, dim)``). None = no vectors.
        encoder_id: id of that encoder; part of the version content and stored in meta.
        index_dir: the version's global index directory, stored in meta (not hashed).
        extra_content: more content identifiers folded into the version id (e.g. the FAISS
            index's sha256), see :func:`version_content_hash`.

    Returns:
        :class:`PublishResult`.

    Raises:
        PublishError: another publish holds the lock after ``lock_wait_s``, this publish
            lost its lock lease (stalled past ``lock_ttl_s``; nothing flipped), a user in
            ``personal`` was forgotten while this publish waited (re-run), or Redis failed.
        ValueError: duplicate sources in ``pairs``, duplicate (user, text) in ``personal``, or
            ``encode`` returned a wrong shape.
    """
    t0 = time.perf_counter()
    sources = [p.source for p in pairs]
    if len(set(sources)) != len(sources):
        raise ValueError("duplicate sources in pairs")
    try:
        members = client.smembers(keyspace.FORGOTTEN)
        forgotten = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
    except (redis.RedisError, OSError) as e:
        raise PublishError(f"publish failed: {e}") from e
    n_before = len({e.user for e in personal})
    personal = [e for e in personal if e.user not in forgotten]
    groups = _personal_groups(personal)
    n_skipped = n_before - len(groups)
    if n_skipped:
        log.info("skipping the personal histories of %d forgotten user(s)", n_skipped)
    digest = version_content_hash(pairs, personal, encoder_id, encode is not None, extra_content)
    version = f"v{digest[:16]}"
    lock = _PublishLock(client, f"{version}:{os.getpid()}:{time.time_ns()}", lock_ttl_s)
    rows: dict[str, int] | None = None
    matrix: np.ndarray | None = None
    try:
        if encode is not None and groups and client.get(keyspace.ACTIVE) != version:
            rows, matrix = _encode_personal(groups, encode)  # before the lock: may be slow
        waited = lock.acquire(lock_wait_s)
        if waited > 0.05:
            log.info("waited %.1f s for the publish lock", waited)
        try:
            prev = client.get(keyspace.ACTIVE)
            previous = str(prev) if prev else None
            if previous == version:
                log.info("version %s already active; nothing to publish", version)
                # a re-run after a publish that died after its flip finishes the expiry
                _expire_superseded(client, keep_versions, version_ttl_s, lock.renew)
                return PublishResult(
                    version,
                    previous,
                    len(pairs),
                    0.0,
                    unchanged=True,
                    n_personal_users=len(groups),
                    n_forgotten_skipped=n_skipped,
                )
            if groups and any(client.smismember(keyspace.FORGOTTEN, [u for u, _ in groups])):
                raise PublishError("a user was forgotten while this publish ran; re-run the job")
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
                    lock.renew()
            # the service answers "no pair" from this filter without a lookup per request
            source_filter = MembershipFilter.build(sources)
            pipe.set(keyspace.pair_sources_key(version), source_filter.to_bytes())
            # and "no history" from this one (empty for a version without personal histories)
            users_filter = MembershipFilter.build(user for user, _ in groups)
            pipe.set(keyspace.personal_users_key(version), users_filter.to_bytes())
            pipe.execute()
            for i, (user, entries) in enumerate(groups, start=1):
                key = keyspace.personal_version_key(version, user)
                pipe.delete(key)
                pipe.hset(key, mapping=_personal_mapping(entries, rows, matrix))
                if i % _BATCH == 0:
                    pipe.execute()
                    lock.renew()
            pipe.execute()
            _test_pause(lock)
            lock.renew()
            meta: dict[str, str] = {
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "n_pairs": str(len(pairs)),
                "content_hash": digest,
                **(run_info or {}),
            }
            if groups:
                meta["n_personal_users"] = str(len(groups))
                meta["n_personal_entries"] = str(len(personal))
            if matrix is not None:
                meta["personal_dim"] = str(matrix.shape[1])
            if encoder_id is not None:
                meta["encoder_id"] = encoder_id
            if index_dir is not None:
                meta["index_dir"] = str(index_dir)
            for name, value in meta.items():
                client.hset(keyspace.meta_key(version), name, value)
            client.hset(keyspace.meta_key(version), "complete", "1")
            lock.renew(force=True)
            with client.pipeline(transaction=True) as tx:
                tx.watch(keyspace.PUBLISH_LOCK)  # flip only while the lock is still ours
                if tx.get(keyspace.PUBLISH_LOCK) != lock.token:
                    raise PublishError("lost the publish lock before the flip; re-run the job")
                tx.multi()
                tx.set(keyspace.ACTIVE, version)
                tx.lrem(keyspace.VERSIONS, 0, version)
                tx.lpush(keyspace.VERSIONS, version)
                tx.execute()
            _expire_superseded(client, keep_versions, version_ttl_s, lock.renew)
        finally:
            lock.release()
    except redis.WatchError as e:
        raise PublishError("lost the publish lock during the flip; re-run the job") from e
    except (redis.RedisError, OSError) as e:
        raise PublishError(f"publish failed: {e}") from e
    secs = time.perf_counter() - t0
    log.info(
        "published %s (%d pairs, %d personal histories) in %.2f s; previous %s",
        version,
        len(pairs),
        len(groups),
        secs,
        previous,
    )
    return PublishResult(
        version,
        previous,
        len(pairs),
        secs,
        unchanged=False,
        n_personal_users=len(groups),
        n_forgotten_skipped=n_skipped,
    )


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
