"""Redis key names, in one place for the nightly publisher and the online service.

Layout (see DESIGN.md):

- ``qrw:active`` → the published version id the service reads.
- ``qrw:versions`` → list of published version ids, newest first (rollback history).
- ``qrw:{version}:meta`` → hash: ``created_at``, ``n_pairs``, ``content_hash``, ``complete``.
- ``qrw:{version}:pair:{normalized utterance}`` → hash: ``rewrite``, ``confidence``
  (absorption probability), ``support``, ``n_users``.
- ``qrw:personal:{user}`` → the user's successful utterances (a later issue).

A version's keys are written completely before ``qrw:active`` flips to it and are never
modified afterwards, so a reader holding a version id always sees one consistent version.
"""

from __future__ import annotations

PREFIX = "qrw"
ACTIVE = f"{PREFIX}:active"
VERSIONS = f"{PREFIX}:versions"
PUBLISH_LOCK = f"{PREFIX}:publish-lock"


def meta_key(version: str) -> str:
    """Hash with the version's metadata."""
    return f"{PREFIX}:{version}:meta"


def pair_key(version: str, normalized_utterance: str) -> str:
    """Hash with the precomputed rewrite of one normalized utterance in one version."""
    return f"{PREFIX}:{version}:pair:{normalized_utterance}"


def version_pattern(version: str) -> str:
    """SCAN pattern matching every key of one version."""
    return f"{PREFIX}:{version}:*"


def personal_key(user: str) -> str:
    """The user's personal history (pseudonymous user key)."""
    return f"{PREFIX}:personal:{user}"
