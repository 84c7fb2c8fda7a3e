"""Text normalization shared by the nightly job and the service (``rewrite.normalize``)."""

from __future__ import annotations

import random
import unicodedata

from rewrite.normalize import _NON_WORD, _SPACES, normalize_utterance, phonetic_key


def _reference(text: str) -> str:
    """The normalization spelled out step by step, every character checked for category C
    (what ``normalize_utterance`` does without its printable-string fast path)."""
    t = unicodedata.normalize("NFKC", text).translate(str.maketrans({"’": "'", "‘": "'"}))
    t = t.translate(str.maketrans({"`": "'", "´": "'"})).casefold()
    t = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in t)
    t = _NON_WORD.sub(" ", t).replace("_", " ")
    t = t.replace(" '", " ").replace("' ", " ")
    return _SPACES.sub(" ", t).strip(" '")


def test_control_and_format_characters_become_spaces() -> None:
    assert normalize_utterance("turn\x00on\tthe\u200blights\u00ad!") == "turn on the lights"
    assert (
        normalize_utterance("What's  the Weather,\nin Boston??") == "what's the weather in boston"
    )
    assert normalize_utterance("\x07\u2028 ") == ""


def test_the_printable_fast_path_changes_nothing() -> None:
    """Seeded random strings mixing ASCII, the BMP and all of Unicode (control, format,
    unassigned and surrogate code points included) normalize as the reference does."""
    rng = random.Random(7)
    for _ in range(5_000):
        text = "".join(
            chr(
                rng.choice([rng.randrange(32, 127), rng.randrange(0x3000), rng.randrange(0x110000)])
            )
            for _ in range(rng.randrange(12))
        )
        assert normalize_utterance(text) == _reference(text), repr(text)


def test_phonetic_key_codes_each_word() -> None:
    assert phonetic_key("weather in wilkerson") == "W0R IN WLKRSN"
    assert phonetic_key("call 911") == "KL 911"  # a word without a code stands for itself
    assert phonetic_key("") == ""
