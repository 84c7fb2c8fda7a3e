"""Forgetting a user (``qrw forget-user``) and the forget list the nightly job reads.

:func:`forget_user` pseudonymizes the raw id with the deployment key
(:func:`rewrite.privacy.pseudonymize`), records the pseudonym on the forget list — the file
``privacy.forget_file`` (durable; the embedded Redis keeps no snapshot) and the Redis set
``qrw:forgotten`` — then deletes the user's personal hash from every version still in Redis
(``qrw:*:personal:{pseudonym}``, plus the unversioned ``qrw:personal:{pseudonym}`` of the first
design sketch) and the pseudonym's hash from those versions' filters of users with a history
(``qrw:{version}:personal-users``). It holds the publish lock meanwhile, so a publish cannot
write the user's history into a new version between the scan and the flip;
:func:`offline.publish.publish_pairs` itself skips personal histories of pseudonyms on the set.

The nightly job (:func:`read_forgotten`) drops every turn of a forgotten user before
sessionization, so the next version holds no personal entry for them and no pair or catalog
entry that only their turns supported. Only pseudonyms are stored and logged, never raw ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from offline.publish import PublishError
from rewrite import keyspace
from rewrite.privacy import pseudonymize
from rewrite.store import read_membership_filter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgetResult:
    """Outcome of :func:`forget_user`.

    Attributes:
        pseudonym: the user's pseudonymous key (what was deleted and listed).
        deleted_keys: personal hashes deleted from Redis.
        versions: versions whose personal hash of the user was deleted, sorted.
        already_listed: the pseudonym was on the Redis forget set before.
        forget_file: the file the pseudonym was recorded in (None = Redis only).
    """

    pseudonym: str
    deleted_keys: int
    versions: list[str]
    already_listed: bool
    forget_file: str | None


def read_forget_file(path: Path | None) -> set[str]:
    """Pseudonyms listed in a forget file (one per line; blanks and ``#`` lines skipped).

    Returns:
        The set; empty when ``path`` is None or does not exist.
    """
    if path is None or not Path(path).exists():
        return set()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return {s for s in (x.strip() for x in lines) if s and not s.startswith("#")}


def read_forgotten(forget_file: Path | None, client: redis.Redis | None) -> set[str]:
    """The forget list: pseudonyms in ``forget_file`` and in the Redis set ``qrw:forgotten``.

    Args:
        forget_file: ``privacy.forget_file`` (None = none).
        client: Redis client, or None to read the file only.

    Raises:
        redis.RedisError, OSError: Redis failed.
    """
    out = read_forget_file(forget_file)
    if client is not None:
        members = client.smembers(keyspace.FORGOTTEN)
        out |= {m.decode() if isinstance(m, bytes) else str(m) for m in members}
    return out


def _append_forget_file(path: Path, pseudonym: str) -> None:
    """Add ``pseudonym`` to the file unless it is there (parents created)."""
    if pseudonym in read_forget_file(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(pseudonym + "\n")


def _versions_of(keys: list[str], pseudonym: str) -> list[str]:
    """The versions of a user's versioned personal keys, sorted."""
    prefix = f"{keyspace.PREFIX}:"
    legacy = keyspace.personal_key(pseudonym)
    return sorted({k[len(prefix) :].split(":", 1)[0] for k in keys if k != legacy})


def _drop_from_user_filter(client: redis.Redis, version: str, pseudonym: str) -> None:
    """Rewrite ``version``'s filter of users with a personal history without ``pseudonym``
    (:func:`rewrite.keyspace.personal_users_key`; nothing when the version has none).

    A service that read the filter before keeps its copy: it then asks Redis for the deleted
    hash and finds no history, as before filters existed. One being read while it is replaced
    sees its length change and is not used (logged; reads go to Redis).

    Raises:
        redis.RedisError, OSError: Redis failed.
    """
    key = keyspace.personal_users_key(version)
    found = read_membership_filter(client, key)
    if found is not None:  # KEEPTTL: a superseded version's keys keep their expiry
        client.set(key, found.without(pseudonym).to_bytes(), keepttl=True)


def forget_user(
    client: redis.Redis,
    user_id: str,
    user_key: bytes,
    forget_file: Path | None,
    lock_wait_s: float = 60.0,
    lock_ttl_s: int = 600,
) -> ForgetResult:
    """Remove a user's personal layer from every version and forget them in future runs.

    Args:
        client: redis-py client (``decode_responses=True``).
        user_id: the raw user id (pseudonymized here, never stored or logged).
        user_key: the deployment's HMAC key (``privacy.user_key``).
        forget_file: durable forget list (``privacy.forget_file``), None = Redis only.
        lock_wait_s: how long to wait for a running publish to release the lock, seconds.
        lock_ttl_s: lifetime of the lock this call takes, seconds.

    Returns:
        :class:`ForgetResult`.

    Raises:
        ValueError: ``user_id`` is empty or ``user_key`` is empty.
        PublishError: the publish lock stayed held for ``lock_wait_s``, or Redis failed.
        OSError: the forget file cannot be written (nothing in Redis is changed then).
    """
    if not user_id:
        raise ValueError("user_id must not be empty")
    pseudonym = pseudonymize(user_id, user_key)
    if forget_file is not None:
        _append_forget_file(Path(forget_file), pseudonym)
    token = f"forget:{pseudonym}:{time.time_ns()}"
    deadline = time.monotonic() + lock_wait_s
    try:
        while not client.set(keyspace.PUBLISH_LOCK, token, nx=True, ex=lock_ttl_s):
            if time.monotonic() >= deadline:
                raise PublishError(
                    f"a publish holds the lock for over {lock_wait_s:.0f} s; retry forget-user"
                )
            time.sleep(0.2)
        try:
            already = not client.sadd(keyspace.FORGOTTEN, pseudonym)
            keys = [str(k) for k in client.scan_iter(match=keyspace.personal_pattern(pseudonym))]
            legacy = keyspace.personal_key(pseudonym)
            if client.exists(legacy):
                keys.append(legacy)
            deleted = int(client.delete(*keys)) if keys else 0
            versions = _versions_of(keys, pseudonym)
            for version in versions:
                _drop_from_user_filter(client, version, pseudonym)
        finally:
            if client.get(keyspace.PUBLISH_LOCK) == token:
                client.delete(keyspace.PUBLISH_LOCK)
    except (redis.RedisError, OSError) as e:
        raise PublishError(f"forget-user failed: {e}") from e
    log.info(
        "forgot user %s: %d personal hash(es) deleted in %d version(s)",
        pseudonym,
        deleted,
        len(versions),
    )
    return ForgetResult(
        pseudonym,
        deleted,
        versions,
        already,
        str(forget_file) if forget_file is not None else None,
    )
