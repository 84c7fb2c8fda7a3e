"""Text normalization shared by the nightly job (state keys of the Markov chain, Redis pair
keys) and the online service (lookup keys). One function, so both sides agree byte for byte."""

from __future__ import annotations

import re
import unicodedata

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
    t = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in t)
    t = _NON_WORD.sub(" ", t).replace("_", " ")
    t = t.replace(" '", " ").replace("' ", " ")
    return _SPACES.sub(" ", t).strip(" '")
