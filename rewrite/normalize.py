"""Text normalization shared by the nightly job (state keys of the Markov chain, Redis pair
keys) and the online service (lookup keys). One function, so both sides agree byte for byte.
Also the phonetic key both the rephrase baseline and the reranker compare."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import jellyfish

_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "`": "'", "´": "'"})
_NON_WORD = re.compile(r"[^\w' ]+", flags=re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalize_utterance(text: str) -> str:
    """Canonical form of an utterance: NFKC, case-folded, punctuation except apostrophes
    removed, whitespace collapsed.

    Args:
        text: raw utterance (ASR 1-best or a rewrite), any length.

    Returns:
        The normalized utterance; ``""`` when nothing word-like remains.

    Example:
        >>> normalize_utterance("  What's the   Weather, in Boston?? ")
        "what's the weather in boston"
    """
    t = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    if not t.isprintable():  # printable = no control/format/unassigned (category C) chars
        t = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in t)
    t = _NON_WORD.sub(" ", t).replace("_", " ")
    t = t.replace(" '", " ").replace("' ", " ")
    return _SPACES.sub(" ", t).strip(" '")


#: Longest device type accepted (turn logs and requests), characters.
MAX_DEVICE_TYPE_CHARS = 64
_DEVICE_TYPE = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def normalize_device_type(device_type: str | None) -> str:
    """Canonical form of a device type (``"Speaker "`` → ``"speaker"``): NFKC, case-folded,
    inner whitespace turned into ``_``. ``""`` for None or blank. Shared by the nightly job
    (catalog device-type counts) and the service (the request's ``device_type``), so both
    agree byte for byte.

    Raises:
        ValueError: longer than :data:`MAX_DEVICE_TYPE_CHARS`, or characters other than
            ``[a-z0-9_.-]`` after normalization (device types are a small vocabulary such as
            ``speaker``, ``display``, ``phone``, ``tv``, ``car``; not free text).
    """
    if device_type is None:
        return ""
    t = _SPACES.sub("_", unicodedata.normalize("NFKC", device_type).casefold().strip())
    if not t:
        return ""
    if len(t) > MAX_DEVICE_TYPE_CHARS:
        raise ValueError(f"device_type longer than {MAX_DEVICE_TYPE_CHARS} chars")
    if not _DEVICE_TYPE.fullmatch(t):
        raise ValueError(f"device_type {t[:32]!r} is not [a-z0-9_.-]+ (e.g. 'speaker', 'tv')")
    return t


@lru_cache(maxsize=200_000)
def _word_key(word: str) -> str:
    """Metaphone code of one word (jellyfish), the word itself when it has none."""
    return jellyfish.metaphone(word) or word


def phonetic_key(normalized: str) -> str:
    """Space-joined Metaphone codes of the words of a normalized utterance (jellyfish).

    A word without a code (e.g. digits) stands for itself. The code of each word is cached
    (LRU, 200k words): words repeat far more than utterances, so a new utterance — a retrieved
    catalog entry the service has not seen — costs a split, cached lookups and a join
    (~1 us for five words instead of ~3 us).

    Example:
        >>> phonetic_key("weather in wilkerson")
        'W0R IN WLKRSN'
    """
    return " ".join([_word_key(w) for w in normalized.split()])
