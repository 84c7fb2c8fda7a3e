"""Label-free noisy-query pairs for DPR training: (corrupted catalog text -> catalog text).

A voice assistant's failing requests are mostly its ASR's errors: a word heard as another that
sounds alike ("pick" -> "peak", "blue" -> "blew"), a word split or merged, a letter or two off
in a name. The mined pairs of one night hold only a few hundred such examples, while the
catalog holds thousands of utterances that succeed. Typo-aware training (Zhuang & Zuccon,
"Dealing with Typos for BERT-based Passage Retrieval and Ranking", EMNLP 2021; Sidiropoulos &
Kanoulas, "Analysing the Robustness of Dual Encoders for Dense Retrieval Against
Misspellings", SIGIR 2022) adds corrupted copies of texts as queries whose positive is the
clean text, so the query tower learns to map a damaged wording next to its intact one.

The corruption here uses nothing but the catalog itself (no labels, no pronunciation
dictionary, nothing of the simulator's ASR channel): per noisy copy, one or two words of at
least 3 letters are changed by one of

- ``sound_alike``: replaced by another catalog word with the same Metaphone code
  (``jellyfish.metaphone``) and a different spelling;
- ``near_word``: replaced by another catalog word at Levenshtein distance 1
  (``rapidfuzz.distance.Levenshtein``);
- ``char_edit``: one letter deleted, doubled, replaced by a neighbouring vowel/consonant, or
  two neighbours swapped;
- ``split`` / ``merge``: a word split in two, or two neighbouring words joined.

Copies equal to their source or to another catalog text are dropped (a catalog text is a
wording that succeeds, not a defect).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import jellyfish
from rapidfuzz.distance import Levenshtein

from offline.dpr.data import DprPair

OPERATIONS = ("sound_alike", "near_word", "char_edit", "split", "merge")
_VOWELS = "aeiou"
_CONSONANTS = "bcdfghjklmnpqrstvwxyz"


class _Vocabulary:
    """Catalog words indexed by Metaphone code and by length (for distance-1 neighbours)."""

    def __init__(self, texts: Sequence[str], max_words: int = 20_000) -> None:
        counts: dict[str, int] = defaultdict(int)
        for t in texts:
            for w in t.split():
                if w.isalpha() and len(w) >= 3:
                    counts[w] += 1
        words = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
        self.by_code: dict[str, list[str]] = defaultdict(list)
        self.by_len: dict[int, list[str]] = defaultdict(list)
        for w in sorted(words):
            self.by_code[jellyfish.metaphone(w)].append(w)
            self.by_len[len(w)].append(w)
        self._near: dict[str, list[str]] = {}

    def sound_alike(self, word: str) -> list[str]:
        return [w for w in self.by_code.get(jellyfish.metaphone(word), ()) if w != word]

    def near(self, word: str) -> list[str]:
        if word not in self._near:
            pool = [w for n in (len(word) - 1, len(word), len(word) + 1) for w in self.by_len[n]]
            self._near[word] = [
                w for w in pool if w != word and Levenshtein.distance(w, word, score_cutoff=1) <= 1
            ]
        return self._near[word]


def _char_edit(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    op = rng.randrange(4)
    if op == 0:  # deletion
        return word[:i] + word[i + 1 :]
    if op == 1:  # doubled letter
        return word[:i] + word[i] + word[i:]
    if op == 2:  # substitution within the letter's class
        pool = _VOWELS if word[i] in _VOWELS else _CONSONANTS
        return word[:i] + rng.choice([c for c in pool if c != word[i]]) + word[i + 1 :]
    if len(word) < 2:
        return word
    i = min(i, len(word) - 2)  # transposition
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def corrupt(text: str, vocab: _Vocabulary, rng: random.Random, max_edits: int = 2) -> str:
    """One noisy copy of ``text`` (1..``max_edits`` word edits, see the module docstring);
    may return ``text`` unchanged when no operation applies."""
    words = text.split()
    for _ in range(rng.randint(1, max_edits)):
        slots = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 3]
        if not slots:
            break
        i = rng.choice(slots)
        op = rng.choice(OPERATIONS)
        w = words[i]
        alts = (
            vocab.sound_alike(w)
            if op == "sound_alike"
            else vocab.near(w)
            if op == "near_word"
            else []
        )
        if alts:
            words[i] = rng.choice(alts)
        elif op == "split" and len(w) >= 5:
            cut = rng.randint(2, len(w) - 2)
            words[i : i + 1] = [w[:cut], w[cut:]]
        elif op == "merge" and i + 1 < len(words):
            words[i : i + 2] = [w + words[i + 1]]
        else:
            words[i] = _char_edit(w, rng)
    return " ".join(words)


def noisy_query_pairs(
    passages: Sequence[str], per_passage: int, seed: int, exclude_queries: Sequence[str] = ()
) -> list[DprPair]:
    """``per_passage`` noisy copies of every passage as ``DprPair(query=copy, target=passage,
    origin="noise")``, seeded, in a deterministic order.

    Args:
        passages: catalog texts (normalized).
        per_passage: copies tried per passage (duplicates and copies that are catalog texts
            are dropped, so fewer may come back).
        seed: ``random.Random`` seed.
        exclude_queries: queries never to generate (e.g. the dev split's queries, so no
            generated pair leaks a dev query into training).
    """
    if per_passage <= 0 or not passages:
        return []
    rng = random.Random(seed)
    vocab = _Vocabulary(passages)
    catalog = set(passages)
    excluded = set(exclude_queries)
    seen: set[tuple[str, str]] = set()
    out: list[DprPair] = []
    for target in passages:
        for _ in range(per_passage):
            query = corrupt(target, vocab, rng)
            if query == target or query in catalog or query in excluded:
                continue
            if (query, target) not in seen:
                seen.add((query, target))
                out.append(DprPair(query, target, "noise", 1))
    return out
