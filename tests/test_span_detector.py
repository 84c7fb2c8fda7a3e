"""The span rephrase detector: rendering, masked decoding, tiny training, reload, ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from offline.detector.examples import ContextFeature, DetectorExample
from offline.detector.span_model import RenderConfig, Renderer, decode

SLURP = Path(__file__).resolve().parents[2] / "shared" / "data" / "slurp" / "utterances.jsonl"


def _ex(label: int = 0) -> DetectorExample:
    ctx = (
        ContextFeature("t2", "play the sweet singh on radio", 3.0, True, "Sorry, I didn't get it"),
        ContextFeature("t1", "what time is it", 20.0, False, "It is five"),
    )
    return DetectorExample("t3", "u", "test", "play the sweet song on radio", ctx, label)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    from offline.detector.train import base_model_path, load_tokenizer_and_model

    tok, _ = load_tokenizer_and_model(base_model_path())
    return Renderer(tok, RenderConfig())


def test_gold_span_is_exactly_the_rephrased_utterance(renderer: Renderer) -> None:
    r = renderer.render(_ex(label=0))
    a, b = r.gold
    assert renderer.tok.decode(r.input_ids[a : b + 1]) == "play the sweet singh on radio"
    assert r.spans[1] != r.gold and len(r.spans) == 2
    tokens = renderer.tok.convert_ids_to_tokens(r.input_ids)
    assert tokens[0] == "[CLS]" and "[BARGE]" in tokens and "[GAP1]" in tokens
    assert r.token_type_ids[: tokens.index("[SEP]") + 1] == [0] * (tokens.index("[SEP]") + 1)
    assert renderer.render(_ex(label=-1)).gold == (0, 0)


def test_decode_respects_masks(renderer: Renderer) -> None:
    r = renderer.render(_ex(label=1))
    n = len(r.input_ids)
    start, end = np.zeros((1, n), np.float32), np.zeros((1, n), np.float32)
    start[0, 1], end[0, 2] = 50.0, 50.0  # inside the current utterance: not allowed
    b0 = r.spans[0][1]
    a1, b1 = r.spans[1]
    start[0, b0], end[0, a1] = 30.0, 20.0  # across two turns (b0 -> b1 = 65): not allowed
    start[0, a1], end[0, b1] = 10.0, 35.0  # the whole of turn 1 (45) beats (a1, a1) = 30
    p = decode(start, end, [r])[0]
    assert p.label == 1 and p.exact_span
    start[0, 0], end[0, 0] = 40.0, 40.0  # CLS (80) wins now
    assert decode(start, end, [r])[0].label == -1


@pytest.mark.slow
@pytest.mark.skipif(not SLURP.exists(), reason=f"SLURP corpus not found at {SLURP}")
def test_tiny_training_lowers_loss_reloads_identically_and_exports(tmp_path: Path) -> None:
    from offline.detector.inference import SpanDetector
    from offline.detector.pipeline import simulated_examples
    from offline.detector.train import SpanTrainConfig, train_span_detector
    from offline.simulate import simulate
    from rewrite.config import load_settings

    simulate(SLURP, users=60, days=1, seed=5, out=tmp_path / "sim")
    splits = simulated_examples(tmp_path / "sim", load_settings())
    train, dev = splits["train"][:80], splits["train"][80:120]
    assert any(ex.label >= 0 for ex in train)
    res = train_span_detector(train, dev, SpanTrainConfig.tiny(), tmp_path / "art", progress=False)
    hist = res.metrics["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]  # dev loss went down
    agree = res.metrics["onnx_agreement"]
    assert agree["onnx_cosine"] > 0.9999 and agree["onnx_int8_cosine"] >= 0.99
    meta = json.loads((res.artifact / "detector.json").read_text())
    assert meta["steps"] == 12
    # reload: identical torch outputs, same predictions on every backend
    a = SpanDetector.load(res.artifact, backend="torch")
    b = SpanDetector.load(res.artifact, backend="torch")
    rendered = [a.renderer.render(ex) for ex in dev[:16]]
    sa, ea = a.logits(rendered)
    sb, eb = b.logits(rendered)
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    np.testing.assert_allclose(ea, eb, atol=1e-6)
    labels = [p.label for p in a.predict(dev)]
    assert labels == [p.label for p in SpanDetector.load(res.artifact, "onnx").predict(dev)]
    # identical training data + config reuses the artifact
    again = train_span_detector(train, dev, SpanTrainConfig.tiny(), tmp_path / "art")
    assert again.reused and again.artifact == res.artifact
