"""A noisy ASR channel with consistent, recurring errors.

Error kinds (``error_type`` names in the ground truth):

- ``swap``: a word becomes a phonetically close word: a homophone or a one-phoneme
  neighbour (substitution, insertion or deletion of one phoneme) in the CMU Pronouncing
  Dictionary (Carnegie Mellon University, via the ``pronouncing`` package), e.g.
  ``weather`` -> ``whether``. Neighbours in the corpus vocabulary, homophones, same-class
  phoneme substitutions and same first letter are preferred.
- ``drop``: a short function word is lost (``set an alarm`` -> ``set alarm``).
- ``split``: a long word is heard as two words that sound the same when said in a row
  (``wilkerson`` -> ``wilker son``; CMU pronunciations must concatenate exactly).
- ``merge``: two words are heard as one: adjacent words of a multi-word entity name
  (``new york`` -> ``newyork``), or two words that form a word sounding the same
  (``some one`` -> ``someone``).

Consistency: every sentence has a fixed error pattern derived from SHA-256 of
``(seed, sentence)``. A sentence is *hard* with a probability that grows with its SLURP
``mean_recording_wer``; a hard sentence is heard with its canonical corruption most of the
time (``reproduce_prob``), so the same failure recurs across users and days. Other
utterances get a fresh random error with a small probability.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pronouncing
from pydantic import BaseModel, Field

FUNCTION_WORDS: frozenset[str] = frozenset(
    [
        "a",
        "an",
        "the",
        "to",
        "for",
        "of",
        "in",
        "on",
        "at",
        "by",
        "with",
        "from",
        "my",
        "me",
        "i",
        "is",
        "it",
        "and",
        "or",
        "be",
        "are",
        "was",
        "do",
        "does",
        "this",
        "that",
        "what's",
        "it's",
        "there",
        "up",
    ]
)
"""Short, frequent words: candidates for ``drop``, rarely swapped, never merged."""

DROPPABLE: frozenset[str] = frozenset(
    [
        "a",
        "an",
        "the",
        "to",
        "for",
        "of",
        "in",
        "on",
        "at",
        "my",
        "me",
        "is",
        "it",
        "and",
        "be",
        "are",
        "do",
        "does",
        "this",
        "that",
    ]
)

_PHONE_CLASS: dict[str, str] = {
    **dict.fromkeys(
        ["AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"],
        "vowel",
    ),
    **dict.fromkeys(["P", "B", "T", "D", "K", "G"], "stop"),
    **dict.fromkeys(["CH", "JH"], "affricate"),
    **dict.fromkeys(["F", "V", "TH", "DH", "S", "Z", "SH", "ZH", "HH"], "fricative"),
    **dict.fromkeys(["M", "N", "NG"], "nasal"),
    **dict.fromkeys(["L", "R", "W", "Y"], "liquid"),
}
PHONES: tuple[str, ...] = tuple(sorted(_PHONE_CLASS))
_NO_STRESS = str.maketrans("", "", "012")

OPS: tuple[str, ...] = ("swap", "drop", "split", "merge")


class ChannelConfig(BaseModel):
    """Parameters of :class:`NoisyChannel` (probabilities in [0, 1])."""

    hard_base: float = Field(default=0.06, ge=0.0, le=1.0)
    """P(sentence is hard) at ``mean_recording_wer`` 0."""
    hard_wer_slope: float = Field(default=1.2, ge=0.0)
    """Added P(hard) per unit of ``mean_recording_wer``."""
    hard_max: float = Field(default=0.85, ge=0.0, le=1.0)
    reproduce_prob: float = Field(default=0.8, ge=0.0, le=1.0)
    """P(a hard sentence comes out with its canonical corruption)."""
    repeat_reproduce_prob: float = Field(default=0.35, ge=0.0, le=1.0)
    """The same for a deliberate repeat right after a failure: users speak more carefully
    (hyperarticulate) when they repeat, so the canonical error recurs less often."""
    clean_share: float = Field(default=0.75, ge=0.0, le=1.0)
    """Of the other utterances of a hard sentence: share heard clean (rest: fresh error)."""
    fresh_base: float = Field(default=0.02, ge=0.0, le=1.0)
    """P(fresh random error) for a sentence that is not hard, at WER 0."""
    fresh_wer_slope: float = Field(default=0.2, ge=0.0)
    second_op_prob: float = Field(default=0.2, ge=0.0, le=1.0)
    """P(a corruption has two edits instead of one)."""
    op_weights: dict[str, float] = Field(
        default_factory=lambda: {"swap": 0.55, "drop": 0.15, "split": 0.15, "merge": 0.15}
    )
    """Relative weights of the edit kinds ``swap``, ``drop``, ``split``, ``merge``."""


@dataclass(frozen=True)
class _Cmu:
    by_phones: dict[tuple[str, ...], tuple[str, ...]]
    phones_of: dict[str, tuple[tuple[str, ...], ...]]


@functools.cache
def _cmu() -> _Cmu:
    """CMU dictionary maps (built once per process, ~0.5 s): phones <-> words, stress removed."""
    pronouncing.init_cmu()
    by_phones: dict[tuple[str, ...], set[str]] = {}
    phones_of: dict[str, list[tuple[str, ...]]] = {}
    for word, phones in pronouncing.pronunciations:
        if not word.replace("'", "").isalpha():
            continue
        key = tuple(phones.translate(_NO_STRESS).split())
        by_phones.setdefault(key, set()).add(word)
        keys = phones_of.setdefault(word, [])
        if key not in keys:
            keys.append(key)
    return _Cmu(
        by_phones={k: tuple(sorted(v)) for k, v in by_phones.items()},
        phones_of={k: tuple(v) for k, v in phones_of.items()},
    )


class PhoneticNeighbours:
    """Phonetically close words of a word (lazy, cached per word, deterministic order).

    Args:
        preferred: word -> count of words the recognizer's language model knows (e.g. the
            corpus vocabulary); a real ASR mostly outputs such words, so they are favoured.
    """

    def __init__(self, preferred: Mapping[str, int] | None = None) -> None:
        self._cmu = _cmu()
        self._preferred: dict[str, float] = {
            w: 10.0 + 5.0 * math.log1p(max(n, 0)) for w, n in (preferred or {}).items()
        }
        self._cache: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        self._familiar: dict[str, bool] = {}

    def is_word(self, word: str) -> bool:
        """Whether ``word`` is in the CMU dictionary."""
        return word in self._cmu.phones_of

    def phones(self, word: str) -> tuple[tuple[str, ...], ...]:
        """Pronunciations of ``word`` (stress removed); ``()`` if not in the CMU dictionary."""
        return self._cmu.phones_of.get(word, ())

    def sounds_like(self, parts: Sequence[str], word: str) -> bool:
        """Whether saying ``parts`` one after the other gives a pronunciation of ``word``."""
        if not all(self.is_word(p) for p in (*parts, word)):
            return False
        targets = set(self.phones(word))
        combos: list[tuple[str, ...]] = [()]
        for part in parts:
            combos = [c + ph for c in combos for ph in self.phones(part)]
        return any(c in targets for c in combos)

    def neighbours(self, word: str) -> tuple[tuple[str, ...], np.ndarray]:
        """``(words, probabilities)``: substitutes for ``word``, or ``((), [])`` if none.

        Homophones (same phonemes) weigh 4, one-phoneme neighbours 1 (x2 for a same-class
        phoneme substitution); x(10 + 5 ln(1 + count)) if in the preferred vocabulary (x0.1 for
        other words with an apostrophe, e.g. possessives), x2 for the same first letter.
        """
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        weights: dict[str, float] = {}

        def add(cands: Sequence[str], w: float) -> None:
            for c in cands:
                if c != word and len(c) >= 2 and weights.get(c, 0.0) < w:
                    weights[c] = w

        by_phones = self._cmu.by_phones
        for key in self._cmu.phones_of.get(word, ()):
            add(by_phones.get(key, ()), 4.0)
            n = len(key)
            for i in range(n):
                if n > 2:
                    add(by_phones.get(key[:i] + key[i + 1 :], ()), 1.0)
                cls = _PHONE_CLASS.get(key[i])
                for q in PHONES:
                    if q != key[i]:
                        w = 2.0 if _PHONE_CLASS[q] == cls else 1.0
                        add(by_phones.get((*key[:i], q, *key[i + 1 :]), ()), w)
            for i in range(n + 1):
                for q in PHONES:
                    add(by_phones.get((*key[:i], q, *key[i:]), ()), 1.0)
        words = tuple(sorted(weights))
        if not words:
            out: tuple[tuple[str, ...], np.ndarray] = ((), np.zeros(0))
        else:
            arr = np.array(
                [
                    weights[c]
                    * self._preferred.get(c, 0.1 if "'" in c else 1.0)
                    * (2.0 if c[0] == word[0] else 1.0)
                    for c in words
                ]
            )
            out = (words, arr / arr.sum())
        self._cache[word] = out
        self._familiar[word] = any(c in self._preferred for c in words)
        return out

    def has_familiar_neighbour(self, word: str) -> bool:
        """Whether some neighbour of ``word`` is in the preferred vocabulary."""
        if word not in self._familiar:
            self.neighbours(word)
        return self._familiar[word]


@dataclass(frozen=True)
class Heard:
    """What the channel produced for one utterance.

    Attributes:
        text: the ASR 1-best (normalized, lower-case).
        error_type: ``"none"`` or the edits joined by ``+`` (e.g. ``"swap"``, ``"drop+merge"``).
        mode: ``"clean"``, ``"canonical"`` (the sentence's recurring error) or ``"fresh"``.
    """

    text: str
    error_type: str
    mode: str

    @property
    def corrupted(self) -> bool:
        """Whether the text differs from what was said."""
        return self.error_type != "none"


@dataclass(frozen=True)
class SentencePattern:
    """A sentence's fixed error pattern: ``corrupted`` is ``None`` unless the sentence is hard."""

    hard: bool
    corrupted: str | None
    error_type: str


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from SHA-256 of the parts' ``str`` joined by ``|`` (never ``hash()``)."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


class NoisyChannel:
    """The simulated ASR: turns what the user said into what the assistant heard.

    Args:
        config: channel parameters.
        seed: simulation seed; sentence error patterns depend on (seed, sentence) only.
        neighbours: phonetic neighbour index (shared, cached).
        entity_pairs: adjacent word pairs inside multi-word entity names (e.g. the SLURP slot
            values ``new york``, ``justin bieber``), which ``merge`` may join.
    """

    def __init__(
        self,
        config: ChannelConfig,
        seed: int,
        neighbours: PhoneticNeighbours | None = None,
        entity_pairs: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.config = config
        self.seed = seed
        self.neighbours = neighbours or PhoneticNeighbours()
        self.entity_pairs = entity_pairs
        w = np.array([max(config.op_weights.get(op, 0.0), 0.0) for op in OPS])
        if w.sum() <= 0:
            raise ValueError("op_weights must give some edit a positive weight")
        self._op_p = w / w.sum()
        self._patterns: dict[tuple[str, float], SentencePattern] = {}

    def hard_prob(self, wer: float) -> float:
        """P(a sentence with this ``mean_recording_wer`` has a recurring error)."""
        c = self.config
        return float(min(c.hard_max, c.hard_base + c.hard_wer_slope * max(wer, 0.0)))

    def pattern(self, text: str, wer: float) -> SentencePattern:
        """The fixed error pattern of a sentence (deterministic in seed, text and wer)."""
        ck = (text, wer)
        hit = self._patterns.get(ck)
        if hit is not None:
            return hit
        rng = np.random.default_rng(stable_seed("qrw-sim-asr", self.seed, text))
        pat = SentencePattern(False, None, "none")
        if rng.random() < self.hard_prob(wer):
            toks, ops = self.corrupt(text.split(), rng)
            out = " ".join(toks)
            if ops and out != text:
                pat = SentencePattern(True, out, "+".join(ops))
        self._patterns[ck] = pat
        return pat

    def transmit(
        self, text: str, wer: float, rng: np.random.Generator, careful: bool = False
    ) -> Heard:
        """Hear one utterance of ``text`` (a normalized sentence) with per-turn randomness.

        ``careful``: the user is repeating the same words after a failure; the canonical
        corruption then recurs with ``repeat_reproduce_prob`` instead of ``reproduce_prob``.
        """
        c = self.config
        pat = self.pattern(text, wer)
        u = rng.random()
        reproduce = c.repeat_reproduce_prob if careful else c.reproduce_prob
        if pat.corrupted is not None:
            if u < reproduce:
                return Heard(pat.corrupted, pat.error_type, "canonical")
            if u < reproduce + (1.0 - reproduce) * c.clean_share:
                return Heard(text, "none", "clean")
        elif u >= min(1.0, c.fresh_base + c.fresh_wer_slope * max(wer, 0.0)):
            return Heard(text, "none", "clean")
        toks, ops = self.corrupt(text.split(), rng)
        out = " ".join(toks)
        if not ops or out == text:
            return Heard(text, "none", "clean")
        return Heard(out, "+".join(ops), "fresh")

    def corrupt(self, tokens: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """Apply one (sometimes two) edits; returns ``(tokens, edit names)``; no edit if none
        applies."""
        n_ops = 2 if rng.random() < self.config.second_op_prob else 1
        ops: list[str] = []
        toks = list(tokens)
        for _ in range(n_ops):
            first = int(rng.choice(len(OPS), p=self._op_p))
            for k in range(len(OPS)):
                op = OPS[(first + k) % len(OPS)]
                new = self._apply(op, toks, rng)
                if new is not None:
                    toks = new
                    ops.append(op)
                    break
        return toks, ops

    def _apply(self, op: str, toks: list[str], rng: np.random.Generator) -> list[str] | None:
        if op == "swap":
            return self._swap(toks, rng)
        if op == "drop":
            idx = [i for i, t in enumerate(toks) if t in DROPPABLE]
            if len(toks) < 3 or not idx:
                return None
            i = idx[int(rng.integers(len(idx)))]
            return toks[:i] + toks[i + 1 :]
        if op == "split":
            return self._split(toks, rng)
        if op == "merge":
            pairs: list[int] = []
            w: list[float] = []
            for i in range(len(toks) - 1):
                a, b = toks[i], toks[i + 1]
                if self.neighbours.sounds_like((a, b), a + b):
                    pairs.append(i)
                    w.append(3.0)
                elif (a, b) in self.entity_pairs and a.isalpha() and b.isalpha():
                    pairs.append(i)
                    w.append(1.0)
            if not pairs:
                return None
            i = pairs[int(rng.choice(len(pairs), p=np.asarray(w) / sum(w)))]
            return [*toks[:i], toks[i] + toks[i + 1], *toks[i + 2 :]]
        raise ValueError(f"unknown edit {op!r}")

    def _swap(self, toks: list[str], rng: np.random.Generator) -> list[str] | None:
        idx: list[int] = []
        w: list[float] = []
        for i, t in enumerate(toks):
            words, _ = self.neighbours.neighbours(t)
            if words:
                idx.append(i)
                base = 0.2 if t in FUNCTION_WORDS else 1.0 + min(len(t), 10) / 4.0
                w.append(base * (3.0 if self.neighbours.has_familiar_neighbour(t) else 1.0))
        if not idx:
            return None
        p = np.asarray(w) / sum(w)
        i = idx[int(rng.choice(len(idx), p=p))]
        words, probs = self.neighbours.neighbours(toks[i])
        new = words[int(rng.choice(len(words), p=probs))]
        return [*toks[:i], new, *toks[i + 1 :]]

    def _split(self, toks: list[str], rng: np.random.Generator) -> list[str] | None:
        cands: list[tuple[int, int]] = []
        w: list[float] = []
        for i, t in enumerate(toks):
            if len(t) < 6 or not t.isalpha() or t in FUNCTION_WORDS:
                continue
            for k in range(2, len(t) - 1):
                if self.neighbours.sounds_like((t[:k], t[k:]), t):
                    cands.append((i, k))
                    w.append(1.0)
        if not cands:
            return None
        p = np.asarray(w) / sum(w)
        i, k = cands[int(rng.choice(len(cands), p=p))]
        return [*toks[:i], toks[i][:k], toks[i][k:], *toks[i + 1 :]]
