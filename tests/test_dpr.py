"""DPR: training data from a run dir, retrieval metrics, tiny fine-tuning (loss goes down, the
ONNX towers match torch), the zero-shot artifact and the torch-free ONNX encoders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline.dpr.data import DprDataset, DprPair, build_dataset, dev_groups, split_by_query
from offline.dpr.train import retrieval_metrics
from offline.trainutil import minilm_path
from rewrite.encoder import DprModelMissingError, resolve_dpr_artifact

# defective utterance -> the utterance that succeeded (ASR-style confusions)
PAIRS = [
    ("turn of the lights", "turn off the lights"),
    ("turn the lights of", "turn off the lights"),
    ("play sum jazz", "play some jazz"),
    ("play psalm jazz", "play some jazz"),
    ("whats the whether in boston", "what's the weather in boston"),
    ("what the weather in boston", "what's the weather in boston"),
    ("set an alarm for seven a.m.", "set an alarm for seven am"),
    ("set a alarm four seven am", "set an alarm for seven am"),
    ("call mum", "call mom"),
    ("cool mom", "call mom"),
    ("remind me to by milk", "remind me to buy milk"),
    ("remind me too buy milk", "remind me to buy milk"),
    ("tell me a choke", "tell me a joke"),
    ("tell me the choke", "tell me a joke"),
    ("what's on my calender", "what's on my calendar"),
    ("whats on my calendar today", "what's on my calendar"),
    ("volume app", "volume up"),
    ("volume op please", "volume up"),
    ("order a taxi to the air port", "order a taxi to the airport"),
    ("order taxi too airport", "order a taxi to the airport"),
    ("read my e mails", "read my emails"),
    ("reed my emails", "read my emails"),
    ("how old is bared pit", "how old is brad pitt"),
    ("how old is brad pit", "how old is brad pitt"),
]
DISTRACTORS = [
    "turn on the lights",
    "play some rock",
    "what's the weather in paris",
    "set a timer for seven minutes",
    "call dad",
    "remind me to call mom",
    "tell me a story",
    "volume down",
    "order a pizza",
    "read my messages",
]


def tiny_dataset() -> DprDataset:
    pairs = [DprPair(q, t, "pairs", 2) for q, t in PAIRS]
    passages = sorted({t for _, t in PAIRS} | set(DISTRACTORS))
    return DprDataset(train=pairs[::2] + pairs[1::4], dev=pairs[3::4], passages=passages)


def write_run(run: Path) -> None:
    """A nightly run dir with pairs, rephrase links and a catalog."""
    from offline.job import write_pairs
    from offline.markov import RewritePair

    run.mkdir(parents=True, exist_ok=True)
    write_pairs(
        [
            RewritePair("turn of the lights", "turn off the lights", 0.9, 5, 3),
            RewritePair("same text", "same text", 1.0, 2, 2),
        ],
        run / "pairs.parquet",
    )
    links = [
        ("play sum jazz", "play some jazz"),
        ("play sum jazz", "play some jazz"),
        ("turn of the lights", "turn off the lights"),  # also a Markov pair: merged
        ("play psalm jazz", "play some jazz"),
        ("call mum", "call mom"),
        ("cool mom", "call mom"),
        ("call mom", "tell me a joke"),  # earlier text is in the catalog: change of mind
        ("tell me a choke", "tell me a jok"),  # later text not in the catalog
        ("volume app", "volume up"),
        ("volume up", "volume up"),
    ]
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"earlier_turn_id": f"e{i}", "later_turn_id": f"l{i}", "earlier": e, "later": lt,
                 "score": 0.9}
                for i, (e, lt) in enumerate(links)
            ]
        ),
        run / "rephrases.parquet",
    )  # fmt: skip
    catalog = ["turn off the lights", "play some jazz", "call mom", "tell me a joke", "volume up"]
    pq.write_table(
        pa.Table.from_pylist([{"text": t, "frequency": 5} for t in catalog]),
        run / "catalog.parquet",
    )


def test_build_dataset_from_run_dir(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    data = build_dataset(tmp_path / "run", dev_share=0.3, seed=1)
    pairs = {(p.query, p.target): p for p in data.train + data.dev}
    assert set(pairs) == {
        ("turn of the lights", "turn off the lights"),
        ("play sum jazz", "play some jazz"),
        ("play psalm jazz", "play some jazz"),
        ("call mum", "call mom"),
        ("cool mom", "call mom"),
        ("volume app", "volume up"),
    }
    merged = pairs[("turn of the lights", "turn off the lights")]
    assert (merged.origin, merged.count) == ("pairs", 6)  # support 5 + one link
    assert pairs[("play sum jazz", "play some jazz")].count == 2
    assert data.counts["rephrase_earlier_in_catalog"] == 1
    assert data.counts["rephrase_later_not_in_catalog"] == 1
    assert data.counts["identical_dropped"] == 2
    assert {p.query for p in data.train}.isdisjoint({p.query for p in data.dev})
    assert data.dev and data.train
    assert "tell me a joke" in data.passages
    again = build_dataset(tmp_path / "run", dev_share=0.3, seed=1)
    assert again.fingerprint() == data.fingerprint()
    # dissimilar rephrase links can be filtered (Levenshtein ratio); Markov pairs stay
    strict = build_dataset(tmp_path / "run", dev_share=0.0, seed=1, min_similarity=0.85)
    assert {(p.query, p.target) for p in strict.train} == {
        ("turn of the lights", "turn off the lights"),
        ("play sum jazz", "play some jazz"),
        ("call mum", "call mom"),
    }
    assert strict.counts["rephrase_dissimilar"] == 3


def test_no_catalog_means_pairs_only(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    (tmp_path / "run" / "catalog.parquet").unlink()
    data = build_dataset(tmp_path / "run", dev_share=0.0, seed=1)
    assert [(p.query, p.target) for p in data.train] == [
        ("turn of the lights", "turn off the lights")
    ]
    assert data.dev == []
    with pytest.raises(FileNotFoundError, match="qrw nightly"):
        build_dataset(tmp_path / "empty")


def test_split_is_by_query_and_seeded() -> None:
    pairs = [DprPair(f"q{i % 10}", f"t{i}", "rephrase") for i in range(40)]
    train, dev = split_by_query(pairs, 0.2, seed=3)
    assert len({p.query for p in dev}) == 2
    assert {p.query for p in train}.isdisjoint({p.query for p in dev})
    assert split_by_query(pairs, 0.2, seed=3) == (train, dev)
    assert dev_groups(dev)[dev[0].query] == {p.target for p in dev if p.query == dev[0].query}


def test_retrieval_metrics_ranks_and_skips_the_query_itself() -> None:
    passages = ["a", "b", "c", "q2"]
    pv = np.eye(4, dtype=np.float32)
    qv = np.array(
        [[0.1, 0.9, 0.5, 0.0], [0.0, 0.2, 0.6, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=np.float32
    )
    m = retrieval_metrics(qv, ["q1", "q2", "q3"], [{"b"}, {"b"}, {"c"}], pv, passages)
    # q1: b first; q2: itself ("q2") is skipped, then c, b -> rank 2; q3: a, then c/b tie... c
    # scores 0 like b and q2, so its rank is not 1
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["mrr@10"] > 1 / 3 + 1 / 2 / 3


def test_missing_artifact_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(DprModelMissingError, match="qrw train dpr"):
        resolve_dpr_artifact(tmp_path)


def test_fast_tokenizer_matches_transformers() -> None:
    from transformers import AutoTokenizer

    from rewrite.encoder import load_fast_tokenizer, pad_token_id, pad_token_ids

    texts = ["What's the WEATHER in Wilkerson?", "play sum jazz", "x " * 60]
    ref = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    want = ref(texts, padding=True, truncation=True, max_length=32)
    got = load_fast_tokenizer(minilm_path(), 32).encode_batch(texts)
    assert [e.ids for e in got] == want["input_ids"]
    assert [e.attention_mask for e in got] == want["attention_mask"]
    # the query towers' tokenizer pads nothing; pad_token_ids pads a batch as transformers
    # does (and the tokenizer's padding would), and a lone text comes back unpadded
    bare = load_fast_tokenizer(minilm_path(), 32, padding=False)
    encs = bare.encode_batch(texts)
    assert len({len(e.ids) for e in encs}) == 3  # not padded
    ids, mask = pad_token_ids([e.ids for e in encs], pad_token_id(bare))
    assert ids.dtype == mask.dtype == np.int64
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["attention_mask"]
    assert bare.encode(texts[1]).ids == want["input_ids"][1][: sum(want["attention_mask"][1])]
    assert pad_token_ids([], 0)[0].shape == (0, 0)


@pytest.mark.slow
def test_tiny_training_lowers_loss_and_onnx_matches_torch(tmp_path: Path) -> None:
    import torch

    from offline.dpr.train import (
        BiEncoder,
        DprTrainConfig,
        batch_loss,
        embed,
        train_dpr,
    )
    from rewrite.encoder import PassageEncoder, QueryEncoder, load_fast_tokenizer

    data = tiny_dataset()
    config = DprTrainConfig(
        batch_size=8, max_steps=10, eval_every=5, patience=10, lr=1e-4, quantize_int8=False
    )
    tok = load_fast_tokenizer(minilm_path(), config.max_length)

    def full_loss(model: BiEncoder) -> float:
        model.eval()
        with torch.no_grad():
            return float(batch_loss(model, tok, data.train, [], config.scale))

    before = full_loss(BiEncoder.from_base())
    res = train_dpr(data, config, tmp_path / "dpr", progress=False)
    assert not res.reused and res.model is not None
    after = full_loss(res.model)
    assert after < before - 0.05, (before, after)
    art = res.artifact
    meta = json.loads((art / "dpr.json").read_text())
    assert meta["encoder_id"] == art.name and meta["dim"] == 384
    assert meta["history"][0]["step"] == 0  # the zero-shot starting point
    assert {"query.onnx", "passage.onnx", "tokenizer.json"} <= {p.name for p in art.iterdir()}
    texts = [p.query for p in data.dev] + ["how old is brad pitt", "read my emails please"]
    for tower, cls in ((res.model.query, QueryEncoder), (res.model.passage, PassageEncoder)):
        ref = embed(tower, tok, texts)
        got = cls.load(art, quantized=False).encode(texts)
        cos = np.sum(ref * got, axis=1)
        assert cos.min() > 0.999, cos
    # the two towers were trained separately: they no longer agree exactly
    q = QueryEncoder.load(art).encode(texts)
    p = PassageEncoder.load(art).encode(texts)
    assert not np.allclose(q, p, atol=1e-4)
    again = train_dpr(data, config, tmp_path / "dpr", progress=False)
    assert again.reused and again.artifact == art


@pytest.fixture(scope="module")
def zero_shot_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from offline.dpr.train import DprTrainConfig, export_zero_shot

    os.environ["HF_HUB_OFFLINE"] = "1"
    # shared with tests/test_retrieval.py: the artifact is content-hashed, so the second
    # export_zero_shot call in a session reuses it
    root = tmp_path_factory.getbasetemp() / "zero-shot-dpr"
    res = export_zero_shot(root, DprTrainConfig(quantize_int8=True))
    return res.artifact


@pytest.mark.slow
def test_zero_shot_artifact_is_base_minilm(zero_shot_artifact: Path) -> None:
    from offline.detector.baselines import MiniLMEmbedder
    from rewrite.encoder import PassageEncoder, QueryEncoder

    meta = json.loads((zero_shot_artifact / "dpr.json").read_text())
    assert meta["variant"] == "zero-shot" and meta["encoder_id"] == zero_shot_artifact.name
    assert meta["onnx_agreement"]["query_min_cosine"] > 0.999
    texts = ["what's the weather in wilkerson", "turn off the lights", "call mom", "x"]
    qe = QueryEncoder.load(zero_shot_artifact, quantized=False)
    pe = PassageEncoder.load(zero_shot_artifact)
    q, p = qe.encode(texts), pe.encode(texts)
    for v in (q, p):
        assert v.shape == (4, 384) and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(q, p, atol=1e-6)  # same base weights in both towers
    ref = MiniLMEmbedder(max_length=32).encode(texts)  # the sentence-transformers recipe
    assert np.sum(ref * q, axis=1).min() > 0.999
    assert qe.encoder_id == pe.encoder_id == zero_shot_artifact.name
    # encode_cached goes through the LRU cache and agrees with uncached batched calls
    one = qe.encode_cached([texts[0]])
    assert one.shape == (1, 384)
    np.testing.assert_allclose(one[0], q[0], atol=1e-5)
    one[0, 0] = 42.0  # the caller gets a copy; the cache is not modified
    assert qe.encode_cached([texts[0]])[0, 0] != 42.0
    assert qe.cache_info()[:2] == (1, 1)  # (hits, misses)
    # a batch: cached texts are served from the cache, the rest encoded together (a repeated
    # text once), every row in input order
    batch = [texts[2], texts[0], texts[2], texts[1]]
    got = qe.encode_cached(batch)
    np.testing.assert_allclose(got, q[[2, 0, 2, 1]], atol=1e-5)
    info = qe.cache_info()
    assert (info.hits, info.misses, info.currsize) == (2, 3, 3)
    np.testing.assert_allclose(qe.encode_cached(texts), q, atol=1e-5)
    assert qe.cache_info()[:2] == (5, 4)
    assert qe.encode([]).shape == (0, 384) and qe.encode_cached([]).shape == (0, 384)


@pytest.mark.slow
def test_online_encoder_does_not_import_torch(zero_shot_artifact: Path) -> None:
    encode_without(zero_shot_artifact, ("torch", "transformers", "offline"))


def encode_without(artifact: Path, modules: tuple[str, ...]) -> None:
    """In a fresh interpreter, the service's imports and one query encoded with ``artifact``'s
    query tower must not import any of ``modules``."""
    code = (
        "import sys\n"
        "from rewrite.encoder import QueryEncoder, PassageEncoder\n"
        "import rewrite.retrieval\n"
        f"q = QueryEncoder.load({str(artifact)!r}, threads=1)\n"
        "v = q.encode(['turn off the lights'])\n"
        "assert v.shape == (1, 384), v.shape\n"
        f"bad = [m for m in {modules!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_train_from_run_zero_shot_sets_latest(tmp_path: Path, zero_shot_artifact: Path) -> None:
    import shutil

    from offline.dpr.train import DprTrainConfig, train_from_run

    root = tmp_path / "dpr"
    root.mkdir()
    shutil.copytree(zero_shot_artifact, root / zero_shot_artifact.name)  # reused, not re-exported
    write_run(tmp_path / "run")
    res = train_from_run(tmp_path / "run", DprTrainConfig(quantize_int8=True), root, zero_shot=True)
    assert res.reused and res.artifact.name == zero_shot_artifact.name
    assert resolve_dpr_artifact(root) == root / zero_shot_artifact.name
    assert 0.0 <= res.meta["dev_onnx"]["onnx"]["recall@1"] <= 1.0
    with pytest.raises(ValueError, match="run dir"):
        train_from_run(None, out_root=root)


@pytest.mark.slow
def test_cli_train_dpr(tmp_path: Path, zero_shot_artifact: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from offline.cli import app

    root = tmp_path / "dpr"
    root.mkdir()
    shutil.copytree(zero_shot_artifact, root / zero_shot_artifact.name)
    write_run(tmp_path / "run")
    runner = CliRunner()
    res = runner.invoke(
        app, ["train", "dpr", "--zero-shot", "--run", str(tmp_path / "run"), "--out", str(root)]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["encoder_id"] == zero_shot_artifact.name and out["reused"] is True
    assert (root / "LATEST").read_text().strip() == zero_shot_artifact.name
    res = runner.invoke(app, ["train", "dpr", "--out", str(root)])
    assert res.exit_code != 0 and "--run" in res.output
    res = runner.invoke(app, ["train", "dpr", "--run", str(tmp_path / "nope"), "--out", str(root)])
    assert res.exit_code == 2 and "rephrases.parquet" in res.output
    res = runner.invoke(app, ["train", "dpr", "--zero-shot", "--query-static", "--out", str(root)])
    flat = "".join(res.output.split()).replace("│", "")  # rich wraps the error in a box
    assert res.exit_code != 0 and "--distill-logsor--distill-texts" in flat, res.output
    both = ["--query-static", "--query-layers", "2"]
    res = runner.invoke(app, ["train", "dpr", "--zero-shot", *both, "--out", str(root)])
    assert res.exit_code != 0 and "notboth" in "".join(res.output.split()), res.output


def test_noisy_query_pairs_are_seeded_label_free_corruptions() -> None:
    """Noisy copies: deterministic per seed, every target a given passage, no query equal to a
    passage or to an excluded (dev) query, each query a small edit of its target, and every
    operation family (word swaps by sound or spelling, letter edits, splits, merges) shows up."""
    from rapidfuzz.distance import Levenshtein

    from offline.dpr.augment import noisy_query_pairs

    passages = [
        "turn on the kitchen lights",
        "turn off the bedroom lights",
        "play some jazz music in the kitchen",
        "what is the weather in boston tomorrow",
        "set an alarm for seven in the morning",
        "what time is my meeting with george",
        "read my new emails from work",
        "tell me a joke about cats",
        "pick up some salt at the store",
        "change the light color to blue",
    ]
    dev_query = "turn on the kitchen light"
    pairs = noisy_query_pairs(passages, 20, seed=3, exclude_queries=[dev_query])
    assert pairs == noisy_query_pairs(passages, 20, seed=3, exclude_queries=[dev_query])
    assert pairs != noisy_query_pairs(passages, 20, seed=4)
    assert len(pairs) > 100 and len({(p.query, p.target) for p in pairs}) == len(pairs)
    assert {p.target for p in pairs} == set(passages)
    assert all(p.origin == "noise" and p.query not in passages for p in pairs)
    assert all(p.query != dev_query for p in pairs)
    # at most two word edits: the query stays close to its target
    assert all(Levenshtein.normalized_similarity(p.query, p.target) >= 0.6 for p in pairs)
    vocab = {w for t in passages for w in t.split()}
    word_swaps = [p for p in pairs if (set(p.query.split()) - set(p.target.split())) & vocab]
    assert word_swaps, "no catalog word replaced another (sound-alike / edit-distance 1)"
    assert any(len(p.query.split()) > len(p.target.split()) for p in pairs)  # a split
    assert any(len(p.query.split()) < len(p.target.split()) for p in pairs)  # a merge
    assert noisy_query_pairs(passages, 0, seed=3) == [] and noisy_query_pairs([], 5, 3) == []


def test_static_embedding_bag_is_the_masked_mean(tmp_path: Path) -> None:
    from rewrite.encoder import StaticEmbeddingBag

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float16)
    bag = StaticEmbeddingBag(table)
    ids = np.array([[1, 5, 7, 0], [3, 4, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)
    (out,) = bag.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
    rows = table.astype(np.float32)
    expected = np.stack([rows[[1, 5, 7]].mean(axis=0), rows[[3, 4]].mean(axis=0)])
    assert out.dtype == np.float32 and out.shape == (2, 8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert bag.vocab_size == 50 and not bag.table.flags.writeable
    # each row on its own: the same bits alone, padded, or next to other rows
    (alone,) = bag.run(["embedding"], {"input_ids": ids[1:, :2], "attention_mask": mask[1:, :2]})
    assert np.array_equal(alone[0], out[1])
    (alone,) = bag.run(["embedding"], {"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]})
    assert alone.shape == (1, 8) and np.array_equal(alone[0], out[0])
    wide = np.pad(ids, ((0, 0), (0, 5)))
    (padded,) = bag.run(
        ["embedding"], {"input_ids": wide, "attention_mask": np.pad(mask, ((0, 0), (0, 5)))}
    )
    assert np.array_equal(padded, out)
    with pytest.raises(IndexError):
        bag.run(["embedding"], {"input_ids": np.array([[50]]), "attention_mask": np.ones((1, 1))})
    with pytest.raises(ValueError, match="NaN"):
        StaticEmbeddingBag(np.full((3, 2), np.nan, dtype=np.float16))
    with pytest.raises(ValueError, match="vocab, dim"):
        StaticEmbeddingBag(np.zeros(3, dtype=np.float16))
    np.save(tmp_path / "query.static.npy", table)
    assert StaticEmbeddingBag.load(tmp_path / "query.static.npy", 50).vocab_size == 50
    with pytest.raises(ValueError, match="50 rows for a vocabulary of 51"):
        StaticEmbeddingBag.load(tmp_path / "query.static.npy", 51)
    with pytest.raises(FileNotFoundError):
        StaticEmbeddingBag.load(tmp_path / "missing.npy", 50)


@pytest.mark.slow
def test_static_query_tower_distillation(static_dpr_dir: Path, dpr_dir: Path) -> None:
    """``DistillConfig.for_static``: a float16 table per wordpiece replaces ``query.onnx``,
    the passage tower is the teacher's file, training moves the vectors towards the teacher's,
    the service's numpy encoder computes exactly the table mean, and it needs no torch or
    ONNX Runtime."""
    from commands import distill_texts

    from offline.dpr.distill import DistillConfig, distill_query_tower
    from offline.dpr.train import export_zero_shot
    from rewrite.encoder import QueryEncoder, StaticEmbeddingBag, read_dpr_meta

    teacher = export_zero_shot(dpr_dir).artifact
    art = resolve_dpr_artifact(static_dpr_dir)
    meta, tmeta = read_dpr_meta(art), read_dpr_meta(teacher)
    assert meta["query_tower"] == "static" and meta["variant"] == "static-query"
    assert meta["distilled_from"] == teacher.name and meta["encoder_id"] == art.name
    assert art.name != teacher.name and meta["query_layers"] == 0
    assert not (art / "query.onnx").exists() and not (art / "query.int8.onnx").exists()
    table = np.load(art / "query.static.npy")
    assert table.dtype == np.float16 and table.shape == (30522, 384)
    assert meta["files_sha256"]["passage.onnx"] == tmeta["files_sha256"]["passage.onnx"]
    assert set(meta["files_sha256"]) == {"passage.onnx", "query.static.npy"}
    d = meta["distill"]
    assert (
        d["dev_cosine_to_teacher"]["mean"]
        > d["dev_cosine_to_teacher_before_training"]["mean"] + 0.1
    ), d
    assert d["onnx_min_cosine_to_torch"] > 0.999  # float16 table vs the torch student

    texts = ["what's the weather in wilkerson", "turn of the lights", "call mom"]
    enc = QueryEncoder.load(art)
    assert isinstance(enc.session, StaticEmbeddingBag)
    vecs = enc.encode(texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    ids = enc.tokenizer.encode(texts[0]).ids  # [CLS] ... [SEP]
    mean = table[ids].astype(np.float32).mean(axis=0)
    np.testing.assert_allclose(vecs[0], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(enc.encode([texts[1]])[0], vecs[1], atol=1e-6)
    # batch-invariant bit for bit: a micro-batch through the cache (one call for all missing
    # texts) gives every text the vector it gets alone, whatever it is padded with
    alone = np.stack([QueryEncoder.load(art, cache_size=0).encode([t])[0] for t in texts])
    batched = QueryEncoder.load(art).encode_cached([texts[2], texts[0], texts[1], texts[0]])
    assert np.array_equal(batched, alone[[2, 0, 1, 0]])
    assert np.array_equal(enc.encode(texts), alone)
    teacher_vecs = QueryEncoder.load(teacher, quantized=False).encode(distill_texts()[:200])
    cos = np.sum(enc.encode(distill_texts()[:200]) * teacher_vecs, axis=1)
    assert cos.mean() > 0.85, cos.mean()
    with pytest.raises(FileNotFoundError, match="static"):
        QueryEncoder.load(art, quantized=True)
    with pytest.raises(ValueError, match="static"):
        distill_query_tower(art, distill_texts(), static_dpr_dir, DistillConfig.for_static())
    again = distill_query_tower(
        teacher, distill_texts(), static_dpr_dir, DistillConfig.for_static(epochs=8, noisy_copies=1)
    )
    assert again.reused and again.artifact == art

    encode_without(art, ("torch", "transformers", "onnxruntime"))


@pytest.mark.slow
def test_layer_distillation_exports_a_shallow_onnx_tower(dpr_dir: Path, tmp_path: Path) -> None:
    """``DistillConfig(layers=1)``: a 1-layer MiniLM query tower exported to ONNX next to the
    teacher's passage tower; the ONNX graph reproduces the torch student."""
    import onnx
    from commands import distill_texts

    from offline.dpr.distill import DistillConfig, distill_query_tower
    from offline.dpr.train import export_zero_shot
    from rewrite.encoder import QueryEncoder

    teacher = export_zero_shot(dpr_dir).artifact
    config = DistillConfig(layers=1, epochs=2, quantize_int8=False)
    res = distill_query_tower(teacher, distill_texts(), tmp_path / "dpr", config)
    meta = res.meta
    assert not res.reused and meta["variant"] == "distilled-query" and meta["query_layers"] == 1
    assert "query_tower" not in meta and (res.artifact / "query.onnx").exists()
    d = meta["distill"]
    assert d["onnx_min_cosine_to_torch"] > 0.999
    assert d["dev_cosine_to_teacher"]["mean"] > d["dev_cosine_to_teacher_before_training"]["mean"]

    def matmuls(path: Path) -> int:
        return sum(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)

    assert 6 * matmuls(res.artifact / "query.onnx") == matmuls(teacher / "query.onnx") > 0
    vecs = QueryEncoder.load(res.artifact).encode(distill_texts()[:5])
    assert vecs.shape == (5, 384)
    with pytest.raises(ValueError, match="layers"):
        DistillConfig(layers=0)


def test_job_finds_the_zero_shot_tower_without_importing_torch(dpr_dir: Path) -> None:
    """``zero_shot_dir`` names the folder ``export_zero_shot`` wrote, and the job's passage
    encoder comes from it without torch or transformers (~3 s of imports per night)."""
    import subprocess
    import sys

    from offline.dpr.ids import zero_shot_dir
    from offline.dpr.train import DprTrainConfig, export_zero_shot

    assert export_zero_shot(dpr_dir).artifact == zero_shot_dir(dpr_dir)
    assert zero_shot_dir(dpr_dir, 16) != zero_shot_dir(dpr_dir)
    assert DprTrainConfig().max_length == 32
    code = (
        "import sys; from offline.online_build import load_passage_encoder; "
        "from rewrite.config import load_settings; s = load_settings(); "
        f"s.dpr.artifacts_dir = {str(dpr_dir)!r}; enc, kind = load_passage_encoder(s); "
        "print(kind, enc.encode(['play jazz']).shape, 'torch' in sys.modules, "
        "'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["zero-shot", "(1,", "384)", "False", "False"]
