"""The global index's lexical channel (rewrite/lexical.py): hashed character n-grams and a
frequency prior folded into the FAISS inner product."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from offline.index import lexical_passage_vectors, normalize_catalog, write_index_dir
from rewrite.config import DprSettings, LexicalSettings
from rewrite.lexical import LexicalChannel
from rewrite.retrieval import INDEX_META, GlobalIndex, IndexCorruptError

ROOT = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_ngram_vectors_are_unit_and_rank_a_mishearing_above_a_paraphrase() -> None:
    ch = LexicalChannel()
    texts = ["start the radio now", "stars the radio nie", "put the radio on", "héllo wörld", ""]
    v = ch.ngram_vectors(texts)
    assert v.shape == (5, 127) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    sim = v @ v.T
    assert sim[1, 0] > sim[1, 2] + 0.1  # the sound-alike wins on surface form
    assert ch.ngram_vectors([]).shape == (0, 127)
    # rows are independent of the batch they are hashed in
    np.testing.assert_array_equal(ch.ngram_vectors(texts[1:2])[0], v[1])
    np.testing.assert_array_equal(ch.ngram_vectors(texts[::-1])[::-1], v)


def test_ngram_vectors_match_a_direct_count_of_the_hashed_ngrams() -> None:
    """The batched numpy hashing equals counting every n-gram of the padded text one by one
    (UTF-8 bytes, little-endian code with the length in the top byte, Knuth's multiplicative
    hash: bucket = bits 33.., sign = bit 32)."""
    ch = LexicalChannel(hashed_dims=31, ngram_min=1, ngram_max=5)
    mask = (1 << 64) - 1

    def direct(text: str) -> np.ndarray:
        b = f" {text} ".encode()
        out = np.zeros(31)
        for n in range(1, 6):
            for i in range(len(b) - n + 1):
                code = int.from_bytes(b[i : i + n], "little") | (n << 56)
                h = (code * 0x9E3779B97F4A7C15) & mask
                out[(h >> 33) % 31] += 1 - 2 * ((h >> 32) & 1)
        return out / np.linalg.norm(out)

    texts = ["turn on the lights", "a", "naïve café", "what's the weather in wilkerson"]
    got = ch.ngram_vectors(texts)
    for text, row in zip(texts, got, strict=True):
        np.testing.assert_allclose(row, direct(text), rtol=1e-6, atol=1e-7)
        # a lone text takes the path without row bookkeeping
        np.testing.assert_allclose(ch.ngram_vectors([text])[0], direct(text), rtol=1e-6, atol=1e-7)


def test_ngram_vectors_do_not_depend_on_the_process() -> None:
    """The job hashes passages in one process and the service queries in another: the
    vectors must not depend on Python's per-process string-hash seed."""
    code = (
        "import sys; from rewrite.lexical import LexicalChannel; "
        "sys.stdout.write(LexicalChannel().ngram_vectors(['turn on the lights']).tobytes().hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        for seed in ("1", "2")
    }
    here = LexicalChannel().ngram_vectors(["turn on the lights"]).tobytes().hex()
    assert outs == {here}


def test_inner_product_is_the_weighted_sum_of_cosine_ngram_cosine_and_prior() -> None:
    rng = np.random.default_rng(0)
    ch = LexicalChannel(dense_weight=0.7, prior_weight=0.3)
    passages = ["turn on the lights", "play jazz", "what's the weather"]
    queries = ["turn of the lights", "play jas"]
    dp, dq = unit(rng.standard_normal((3, 8))), unit(rng.standard_normal((2, 8)))
    freq = np.array([100.0, 1.0, 0.0])
    got = ch.query_vectors(dq, queries) @ ch.passage_vectors(dp, passages, freq).T
    ngram = ch.ngram_vectors(queries) @ ch.ngram_vectors(passages).T
    prior = np.log1p(freq) / np.log1p(100.0)
    want = 0.7 * (dq @ dp.T) + 0.3 * ngram + 0.3 * prior[None, :]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a catalog built chunk by chunk normalises by the whole catalog's maximum
    table = normalize_catalog(pa.table({"text": passages, "frequency": [100, 1, 0]}))
    chunked = lexical_passage_vectors(ch, dp, table, chunk=2)
    np.testing.assert_allclose(chunked, ch.passage_vectors(dp, passages, freq), atol=1e-7)
    with pytest.raises(ValueError, match="texts"):
        ch.query_vectors(dq, queries[:1])
    with pytest.raises(ValueError, match="frequencies"):
        ch.passage_vectors(dp, passages, freq[:2])


def test_settings_are_validated_and_round_trip() -> None:
    ch = LexicalChannel(hashed_dims=63, ngram_min=3, ngram_max=5, dense_weight=0.5)
    assert LexicalChannel.from_params(json.loads(json.dumps(ch.to_params()))) == ch
    assert ch.dims == 64 and LexicalChannel.from_params(None) is None
    for bad in ({"hashed_dims": 0}, {"ngram_min": 3, "ngram_max": 2}, {"ngram_max": 8},
                {"dense_weight": 0.0}, {"prior_weight": -1.0}):  # fmt: skip
        with pytest.raises(ValueError):
            LexicalChannel(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown"):
        LexicalChannel.from_params({"hashed_dims": 8, "stemming": True})
    with pytest.raises(ValidationError, match="ngram_min"):
        LexicalSettings(ngram_min=4, ngram_max=2)
    assert LexicalSettings(enabled=False).channel() is None
    assert LexicalSettings().channel() == LexicalChannel()


def _catalog(texts: list[str], freqs: list[int]) -> pa.Table:
    return normalize_catalog(pa.table({"text": texts, "frequency": freqs}))


def test_the_channel_finds_the_sound_alike_the_dense_tower_misses(tmp_path: Path) -> None:
    """A query vector that leans to a paraphrase (the drift the dense tower makes on a
    garbled word): dense-only, the paraphrase is retrieved; with the channel, the catalog entry
    that sounds like the query. ``index.json`` records the channel, the service rebuilds it,
    and a search without the query texts is refused rather than scored wrongly."""
    texts = ["start the radio now", "put the radio on", "stop the music"]
    e = np.eye(3, 16, dtype=np.float32)
    passages = e.copy()
    query = unit(0.55 * e[0] + 0.60 * e[1] + 0.1 * e[2])  # closer to "put the radio on"
    table = _catalog(texts, [10, 10, 10])
    dense_only = DprSettings(lexical=LexicalSettings(enabled=False))
    write_index_dir(passages, table, tmp_path / "dense", "enc", dense_only)
    write_index_dir(passages, table, tmp_path / "lex", "enc", DprSettings())
    plain, lex = GlobalIndex.load(tmp_path / "dense"), GlobalIndex.load(tmp_path / "lex")
    assert plain.lexical is None and plain.dim == 16 and plain.info.dim == 16
    assert lex.lexical == LexicalChannel() and lex.dim == 16 and lex.info.dim == 16 + 128
    q = ["stars the radio nie"]
    assert plain.search(query, k=1, texts=q)[0][0].text == "put the radio on"
    top = lex.search(query, k=3, texts=q)[0]
    assert top[0].text == "start the radio now"
    # ranked by the hybrid score, but every candidate carries its dense cosine (the
    # personal layer's scale), as the dense-only index gives it
    assert [c.text for c in top][1] == "put the radio on"
    for c in top:
        assert c.dense_score == pytest.approx(
            float(query @ passages[texts.index(c.text)]), abs=1e-5
        )
    assert {c.text: c.dense_score for c in plain.search(query, k=3, texts=q)[0]} == pytest.approx(
        {c.text: c.dense_score for c in top}, abs=1e-5
    )
    with pytest.raises(ValueError, match="lexical channel"):
        lex.search(query, k=1)
    with pytest.raises(ValueError, match="lexical channel"):
        lex.search(np.stack([query, query]), k=1, texts=q)
    # a corrupt channel in index.json is refused at load
    meta = tmp_path / "lex" / INDEX_META
    raw = json.loads(meta.read_text())
    raw["params"]["lexical"]["hashed_dims"] = 0
    meta.write_text(json.dumps(raw))
    with pytest.raises(IndexCorruptError, match="lexical"):
        GlobalIndex.load(tmp_path / "lex")


def test_the_prior_breaks_a_tie_toward_the_frequent_entry(tmp_path: Path) -> None:
    """Two entries with the same dense vector and the same words: the more frequent one ranks
    first (the prior outweighs their small n-gram difference; both orders tested)."""
    texts = ["thank you goodbye", "goodbye thank you"]
    passages = np.tile(np.eye(1, 8, dtype=np.float32), (2, 1))
    query = passages[0]
    for freqs, first in (([1, 500], "goodbye thank you"), ([500, 1], "thank you goodbye")):
        out = tmp_path / f"f{freqs[0]}"
        write_index_dir(passages, _catalog(texts, freqs), out, "enc", DprSettings())
        index = GlobalIndex.load(out)
        hits = index.search(query, k=2, texts=["thank goodbye you"])[0]
        assert hits[0].text == first  # the cosines are equal (the same vector):
        assert hits[0].dense_score == pytest.approx(hits[1].dense_score, abs=1e-5)
        assert hits[0].dense_score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf_pq_refine", "ivf_sq8"])
def test_every_index_kind_serves_the_channel_with_dense_cosines(tmp_path: Path, kind: str) -> None:
    """HNSW and both inverted files index the 512-d hybrid vectors like the flat one: each
    query finds its own entry first, and every candidate's ``dense_score`` is its dense
    cosine read back from the stored vector (exact for HNSW; within the 6- / 8-bit codes'
    error for the IVF kinds; ``ivf_sq8`` gets the id map that reading back needs)."""
    n, dim = 3000, 32
    rng = np.random.default_rng(1)
    dense = unit(rng.standard_normal((n, dim)))
    texts = [f"utterance {i} of {['radio', 'lights', 'music'][i % 3]}" for i in range(n)]
    table = _catalog(texts, [int(f) for f in rng.integers(1, 1000, n)])
    settings = DprSettings(
        flat_max_entries=100,
        ivf_min_entries=1000 if kind != "hnsw" else n,
        ivf_kind="ivf_sq8" if kind == "ivf_sq8" else "ivf_pq_refine",
    )
    write_index_dir(dense, table, tmp_path, "enc", settings)
    index = GlobalIndex.load(tmp_path, nprobe=64)
    assert index.kind == kind and index.dim == dim and index.lexical is not None
    rows = [5, 700, 2999]
    queries = unit(dense[rows] + 0.05 * rng.standard_normal((3, dim)))
    found = index.search(queries, k=5, texts=[texts[r] for r in rows])
    tol = 1e-5 if kind == "hnsw" else 0.05
    for r, q, cands in zip(rows, queries, found, strict=True):
        assert cands[0].text == texts[r]
        for c in cands:
            want = float(q @ dense[texts.index(c.text)])
            assert c.dense_score == pytest.approx(want, abs=tol)
