"""Redis key names, in one place for the nightly publisher and the online service.

Layout (see DESIGN.md):

- ``qrw:active`` → the published version id the service reads.
- ``qrw:versions`` → list of published version ids, newest first (rollback history).
- ``qrw:{version}:meta`` → hash: ``created_at``, ``n_pairs``, ``content_hash``, ``complete``.
- ``qrw:{version}:pair:{normalized utterance}`` → hash: ``rewrite``, ``confidence``
  (absorption probability), ``support``, ``n_users``.
- ``qrw:{version}:pair-sources`` → string: the version's pair sources as a membership filter
  (sorted unique little-endian uint64 BLAKE2b-64 hashes of the normalized sources, 8 bytes a
  pair; :class:`rewrite.store.MembershipFilter`): the service answers "no pair" without a
  round trip for an utterance whose hash is absent. Versions published before it have none.
- ``qrw:{version}:personal-users`` → string: the pseudonyms with a personal hash in the
  version, as the same kind of filter: the service answers "no history" without a round trip
  for a user whose pseudonym's hash is absent (new and anonymous users, most of the online
  traffic of a large assistant). ``qrw forget-user`` removes the user's hash from it.
- ``qrw:{version}:meta`` may also hold ``n_personal_users``, ``personal_dim``, ``index_dir``
  and ``encoder_id`` (the global FAISS index and passage encoder of the version).
- ``qrw:{version}:personal:{pseudo_user}`` → hash with one field, ``packed``: the user's
  normalized utterances, successful uses, last use (float epoch s) and optional passage
  vectors (float16, ``(n, dim)``, L2-normalised) in one binary string
  (:func:`rewrite.personal.pack_history` gives the layout). Versions published before that
  layout hold ``texts``, ``counts``, ``last_seen`` (JSON lists) and ``vectors`` (raw
  float16 bytes) instead; the service reads both. ``pseudo_user`` is
  :func:`rewrite.privacy.pseudonymize` of the user id; raw ids never appear in keys.
- ``qrw:forgotten`` → set of pseudonyms removed with ``qrw forget-user``: their personal
  hashes are deleted from every version, the nightly job drops their turns and publish never
  writes a personal hash for them.

A version's keys are written completely before ``qrw:active`` flips to it and are never
modified afterwards — except that ``qrw forget-user`` deletes a forgotten user's personal
hash from every version (privacy wins over immutability; a service's personal-history cache
keeps serving a deleted hash for at most ``service.personal_cache_ttl_s`` seconds) — so a
reader holding a version id always sees one consistent version.
"""

from __future__ import annotations

PREFIX = "qrw"
ACTIVE = f"{PREFIX}:active"
VERSIONS = f"{PREFIX}:versions"
PUBLISH_LOCK = f"{PREFIX}:publish-lock"
FORGOTTEN = f"{PREFIX}:forgotten"


def meta_key(version: str) -> str:
    """Hash with the version's metadata."""
    return f"{PREFIX}:{version}:meta"


def pair_key(version: str, normalized_utterance: str) -> str:
    """Hash with the precomputed rewrite of one normalized utterance in one version."""
    return f"{PREFIX}:{version}:pair:{normalized_utterance}"


def pair_sources_key(version: str) -> str:
    """String with the version's pair-source filter (:class:`rewrite.store.MembershipFilter`)."""
    return f"{PREFIX}:{version}:pair-sources"


def personal_users_key(version: str) -> str:
    """String with the version's filter of pseudonyms that have a personal history
    (:class:`rewrite.store.MembershipFilter`)."""
    return f"{PREFIX}:{version}:personal-users"


def version_pattern(version: str) -> str:
    """SCAN pattern matching every key of one version."""
    return f"{PREFIX}:{version}:*"


def personal_key(user: str) -> str:
    """Unversioned personal key of the first design sketch; not written by publish.

    Use :func:`personal_version_key`, which versions personal histories with the rest.
    """
    return f"{PREFIX}:personal:{user}"


def personal_version_key(version: str, pseudo_user: str) -> str:
    """Hash with one user's personal history in one version (``pseudo_user``: pseudonym)."""
    return f"{PREFIX}:{version}:personal:{pseudo_user}"


def personal_pattern(pseudo_user: str) -> str:
    """SCAN pattern matching one user's personal hash in every version (``pseudo_user``: the
    32-hex pseudonym, which holds no glob characters)."""
    return f"{PREFIX}:*:personal:{pseudo_user}"
