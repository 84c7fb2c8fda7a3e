"""Retrieval baselines for the online layer (``qrw evaluate online``): each one ranks the
entries of a run's global catalog for a (normalized) query, the same job the DPR global layer
does, so they are scored with the same recall@k / MRR (:mod:`offline.evaluate_online`).

- :class:`BM25Retriever`: Okapi BM25 (Robertson & Zaragoza, "The Probabilistic Relevance
  Framework: BM25 and Beyond", 2009) over the catalog texts, with the ``bm25s`` library
  (Lù, "BM25S: Orders of magnitude faster lexical search via eager sparse scoring", 2024;
  Lucene scoring variant, k1 = 1.5, b = 0.75). Tokens are the words of the normalized text
  (split on spaces, so "what's" and one-letter words stay tokens), no stemming, no stop words.
- :class:`SymSpellRetriever`: spelling correction with SymSpell (Garbe's symmetric-delete
  algorithm, ``symspellpy``): a word dictionary built from the catalog (each word weighted by
  the summed ``frequency`` of the catalog entries it occurs in), ``lookup_compound`` corrects
  the whole query (word splits and merges included, max edit distance 2 per word). The
  candidate list is then: the catalog entry equal to the corrected query first (if there is
  one), followed by the catalog entries closest to the corrected query by normalized
  Levenshtein similarity (rapidfuzz ``fuzz.ratio``). So SymSpell's top-1 is "the corrected
  query, when it is a catalog utterance, else its nearest catalog utterance", and lower ranks
  give recall@5 / MRR a list to score.
- :class:`DenseRetriever`: a DPR artifact (:mod:`rewrite.encoder`; the zero-shot MiniLM one
  or a fine-tuned one) with an exact FAISS ``IndexFlatIP`` over the catalog passage vectors
  (built with :func:`offline.index.make_faiss_index`), i.e. DPR retrieval without personal
  layer and reranker; with ``lexical`` the vectors carry the global index's lexical channel
  (:mod:`rewrite.lexical`: hashed character n-grams and a log-frequency prior in the same
  inner product), the retrieval the job's index serves.

All share :class:`CatalogRetriever`: light ``__init__``, heavy ``warm_up()``, and
``search(queries, k)`` returning per query up to ``k`` ``(catalog text, score)`` pairs, best
first (scores are each system's own scale).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rapidfuzz import fuzz, process

from rewrite.lexical import LexicalChannel

log = logging.getLogger(__name__)

Hit = tuple[str, float]
"""One retrieved catalog entry: ``(text, score)``; higher scores are better."""


class CatalogRetriever(Protocol):
    """A system that ranks catalog entries for a query (a retrieval baseline or DPR)."""

    name: str

    def warm_up(self) -> None:
        """Build the index / load models (idempotent)."""

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Per query (normalized text), up to ``k`` catalog entries, best first."""


def _unique_texts(catalog: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for t in catalog:
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _split(text: str) -> list[str]:
    return text.split()


class BM25Retriever:
    """BM25 over the catalog texts (``bm25s``, Lucene variant).

    Args:
        catalog: normalized catalog texts (duplicates and empty texts are dropped).
        k1, b: BM25 term-frequency saturation and length normalisation.

    Queries whose words are all unknown to the catalog get no hits (BM25 score 0 everywhere);
    hits with score 0 are never returned.
    """

    name = "bm25"

    def __init__(self, catalog: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.texts = _unique_texts(catalog)
        self.k1, self.b = k1, b
        self._model: Any = None
        self._tokenizer: Any = None

    def warm_up(self) -> None:
        """Tokenize and index the catalog (sparse BM25 score matrix)."""
        if self._model is not None or not self.texts:
            return
        import bm25s  # type: ignore[import-untyped]
        from bm25s.tokenization import Tokenizer  # type: ignore[import-untyped]

        self._tokenizer = Tokenizer(lower=True, splitter=_split, stopwords=None)
        tokens = self._tokenizer.tokenize(
            self.texts, update_vocab=True, return_as="ids", show_progress=False
        )
        self._model = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        self._model.index(tokens, show_progress=False)
        log.info("bm25: %d catalog texts indexed", len(self.texts))

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` catalog texts per query by BM25 score (only scores > 0).

        Raises:
            ValueError: ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.warm_up()
        if not queries:
            return []
        if self._model is None:
            return [[] for _ in queries]
        q = self._tokenizer.tokenize(
            list(queries), update_vocab=False, return_as="ids", show_progress=False
        )
        docs, scores = self._model.retrieve(
            q, k=min(k, len(self.texts)), show_progress=False, n_threads=1
        )
        out: list[list[Hit]] = []
        for row_d, row_s in zip(docs.tolist(), scores.tolist(), strict=True):
            out.append(
                [(self.texts[d], float(s)) for d, s in zip(row_d, row_s, strict=True) if s > 0]
            )
        return out


class SymSpellRetriever:
    """SymSpell compound spelling correction against a catalog-derived dictionary, then the
    catalog entries nearest to the corrected query (see the module docstring).

    Args:
        catalog: normalized catalog texts.
        frequencies: catalog ``frequency`` per text (word weights); None = 1 each.
        max_edit_distance: SymSpell's max edit distance per word (dictionary and lookup).
        prefix_length: SymSpell prefix length (library default 7).

    Scores: 2.0 + similarity for the exact corrected match, ``fuzz.ratio / 100`` (in [0, 1])
    for the rest.
    """

    name = "symspell"

    def __init__(
        self,
        catalog: Sequence[str],
        frequencies: Sequence[int] | None = None,
        max_edit_distance: int = 2,
        prefix_length: int = 7,
    ) -> None:
        if frequencies is not None and len(frequencies) != len(catalog):
            raise ValueError(f"{len(frequencies)} frequencies for {len(catalog)} catalog texts")
        self._catalog = list(catalog)
        self._freq = [1] * len(catalog) if frequencies is None else [int(f) for f in frequencies]
        self.texts = _unique_texts(catalog)
        self.max_edit_distance = max_edit_distance
        self.prefix_length = prefix_length
        self._sym: Any = None
        self._index: dict[str, int] = {t: i for i, t in enumerate(self.texts)}

    def warm_up(self) -> None:
        """Build the SymSpell word dictionary from the catalog."""
        if self._sym is not None:
            return
        from symspellpy import SymSpell  # type: ignore[import-untyped]

        counts: Counter[str] = Counter()
        for text, f in zip(self._catalog, self._freq, strict=True):
            for w in text.split():
                counts[w] += max(1, f)
        sym = SymSpell(
            max_dictionary_edit_distance=self.max_edit_distance, prefix_length=self.prefix_length
        )
        for w, c in counts.items():
            sym.create_dictionary_entry(w, c)
        self._sym = sym
        log.info(
            "symspell: %d dictionary words from %d catalog texts", len(counts), len(self.texts)
        )

    def correct(self, query: str) -> str:
        """The query after SymSpell ``lookup_compound`` (split on spaces; words with digits
        left alone); the query itself when SymSpell has no suggestion."""
        self.warm_up()
        if not query.strip():
            return query
        sugg = self._sym.lookup_compound(
            query,
            max_edit_distance=self.max_edit_distance,
            split_by_space=True,
            ignore_term_with_digits=True,
        )
        return str(sugg[0].term) if sugg else query

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Per query: the exact corrected match (if in the catalog), then the nearest catalog
        entries to the corrected query by ``fuzz.ratio``; ``k`` in all.

        Raises:
            ValueError: ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.warm_up()
        out: list[list[Hit]] = []
        for query in queries:
            fixed = self.correct(query)
            hits: list[Hit] = []
            if fixed in self._index:
                hits.append((fixed, 3.0))
            for text, score, _ in process.extract(
                fixed, self.texts, scorer=fuzz.ratio, limit=k + 1
            ):
                if text != fixed and len(hits) < k:
                    hits.append((text, float(score) / 100.0))
            out.append(hits[:k])
        return out


class DenseRetriever:
    """A DPR artifact (query + passage towers on ONNX Runtime) with an exact FAISS inner-product
    index over the catalog: the global layer alone.

    Args:
        catalog: normalized catalog texts.
        artifact_dir: a DPR artifact folder (:func:`rewrite.encoder.resolve_dpr_artifact`).
        name: row name in reports (e.g. ``"minilm_zero_shot"``, ``"dpr_fine_tuned"``).
        threads: ONNX Runtime intra-op threads.
        lexical: a lexical channel (:mod:`rewrite.lexical`) appended to both towers' vectors,
            as the job's global index does; None = dense only.
        frequencies: catalog ``frequency`` per text of ``catalog`` (the channel's prior);
            None = 1 each.

    Raises:
        ValueError: ``frequencies`` and ``catalog`` differ in length.
    """

    def __init__(
        self,
        catalog: Sequence[str],
        artifact_dir: Path,
        name: str = "dpr",
        threads: int = 1,
        lexical: LexicalChannel | None = None,
        frequencies: Sequence[int] | None = None,
    ) -> None:
        if frequencies is not None and len(frequencies) != len(catalog):
            raise ValueError(f"{len(frequencies)} frequencies for {len(catalog)} catalog texts")
        self.texts = _unique_texts(catalog)
        self.artifact_dir = Path(artifact_dir)
        self.name = name
        self.threads = threads
        self.lexical = lexical
        freq: dict[str, int] = {}
        for text, f in zip(catalog, frequencies or [1] * len(catalog), strict=True):
            freq[text] = freq.get(text, 0) + int(f)
        self._freq = np.array([freq.get(t, 0) for t in self.texts], dtype=np.float64)
        self.encoder_id = ""
        self._query: Any = None
        self._index: Any = None

    def warm_up(self) -> None:
        """Load both towers and index the catalog's passage vectors ``(n, dim)``."""
        if self._query is not None:
            return
        from offline.index import encode_catalog, make_faiss_index
        from rewrite.encoder import PassageEncoder, QueryEncoder

        passage = PassageEncoder.load(self.artifact_dir, threads=self.threads)
        vecs = encode_catalog(passage, self.texts, progress=False)
        if self.lexical is not None:
            vecs = self.lexical.passage_vectors(vecs, self.texts, self._freq)
        self._index = make_faiss_index(vecs, "flat")
        self._query = QueryEncoder.load(self.artifact_dir, threads=self.threads)
        self.encoder_id = self._query.encoder_id
        log.info("%s: %d catalog texts indexed (%s)", self.name, len(self.texts), self.encoder_id)

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` catalog texts per query by cosine, or with the lexical channel by its
        hybrid inner product (exact search).

        Raises:
            ValueError: ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.warm_up()
        if not queries:
            return []
        if not self.texts:
            return [[] for _ in queries]
        q = np.ascontiguousarray(self._query.encode(list(queries)), dtype=np.float32)
        if self.lexical is not None:
            q = self.lexical.query_vectors(q, list(queries))
        scores, ids = self._index.search(q, min(k, len(self.texts)))
        return [
            [(self.texts[i], float(s)) for s, i in zip(rs, ri, strict=True) if i >= 0]
            for rs, ri in zip(scores.tolist(), ids.tolist(), strict=True)
        ]
