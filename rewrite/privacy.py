"""Pseudonymous user keys: the only form in which user ids reach Redis and published files.

``pseudonymize(user_id, key)`` is HMAC-SHA256 (RFC 2104, Python :mod:`hmac`) of the UTF-8 user
id under a secret key, hex-encoded and cut to 32 hex characters (128 bits). The nightly job
keys personal histories by it and the online service recomputes it from the raw id it
receives, so both sides must use the same key (``privacy.user_key``, env
``QRW_PRIVACY__USER_KEY``). Without the key the mapping cannot be inverted or recomputed
from a list of guessed ids.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading

from rewrite.config import DEV_USER_KEY, Settings

log = logging.getLogger(__name__)

PSEUDONYM_HEX_CHARS = 32

_warned = False
_warn_lock = threading.Lock()


def pseudonymize(user_id: str, key: bytes) -> str:
    """The pseudonymous key of a user.

    Args:
        user_id: raw user id as the assistant logs / sends it.
        key: HMAC secret (see :func:`user_key_from_settings`), non-empty.

    Returns:
        First 32 hex characters of ``HMAC-SHA256(key, user_id.encode("utf-8"))`` (lowercase).

    Raises:
        ValueError: ``key`` is empty.
    """
    if not key:
        raise ValueError("pseudonymization key must not be empty")
    digest = hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:PSEUDONYM_HEX_CHARS]


def user_key_from_settings(settings: Settings) -> bytes:
    """The HMAC key from ``settings.privacy.user_key`` as UTF-8 bytes.

    Logs a warning (once per process) when the built-in development key is in use: pseudonyms
    made with a public key can be recomputed by anyone holding a list of user ids.
    """
    global _warned
    value = settings.privacy.user_key
    if value == DEV_USER_KEY:
        with _warn_lock:
            if not _warned:
                _warned = True
                log.warning(
                    "privacy.user_key is the built-in development key; set QRW_PRIVACY__USER_KEY "
                    "to a secret in production"
                )
    return value.encode("utf-8")
