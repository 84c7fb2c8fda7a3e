"""The LightGBM gate in front of the span detector (offline/detector/gate.py): features,
out-of-fold threshold, save/load, the gated detector, and the job skipping what it rules out."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_span_detector import OKAY, SORRY, synthetic_examples

from offline.detector.examples import ContextFeature, DetectorExample, Prediction
from offline.detector.gate import (
    FEATURE_NAMES,
    GATE_META,
    GATE_MODEL,
    SLOT_FEATURES,
    GatedDetector,
    RephraseGate,
    gate_features,
    train_gate,
)
from rewrite.config import DefectSettings, Settings

PATTERNS = DefectSettings().failure_response_patterns


def _labelled(n: int, seed: int, source: str) -> list[DetectorExample]:
    out = []
    for ex in synthetic_examples(n, seed):
        out.append(
            DetectorExample(
                f"{source}-{ex.example_id}",
                f"{source}-{ex.user_id}",
                source,
                ex.current,
                ex.context,
                ex.label,
            )
        )
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[RephraseGate, object, list[DetectorExample]]:
    train = _labelled(400, 1, "sim") + _labelled(200, 3, "dstc2")
    gate, report = RephraseGate.train(train, PATTERNS, target_recall=0.99)
    return gate, report, train


def test_features_per_slot_and_missing_slots() -> None:
    ex = DetectorExample(
        "e",
        "u",
        "sim",
        "play the sweet song on radio",
        (
            ContextFeature("t1", "play the sweet song on radio", 3.0, True, SORRY),
            ContextFeature("t0", "what time is it", 20.0, False, OKAY),
        ),
    )
    x = gate_features([ex], PATTERNS)
    assert x.shape == (1, len(FEATURE_NAMES)) and x.dtype == np.float32
    row = dict(zip(FEATURE_NAMES, x[0].tolist(), strict=True))
    assert row["c0_token_sort"] == 1.0 and row["c0_phonetic"] == 1.0
    assert row["c0_gap_s"] == 3.0 and row["c0_barge_in"] == 1.0
    assert row["c0_failure_response"] == 1.0 and row["c1_failure_response"] == 0.0
    assert row["c0_words"] == 6.0 and row["c1_words"] == 4.0
    assert row["c1_token_sort"] < 0.5
    assert all(math.isnan(row[f"c2_{name}"]) for name in SLOT_FEATURES)  # no third turn
    assert row["n_context"] == 2.0 and row["current_words"] == 6.0
    assert row["best_similarity"] == 1.0
    # the failure flag follows the patterns it is given
    assert gate_features([ex], [])[0][FEATURE_NAMES.index("c0_failure_response")] == 0.0


def test_threshold_keeps_the_target_recall_of_every_source(trained: tuple) -> None:
    gate, report, train = trained
    assert report.examples == len(train)
    for src in ("sim", "dstc2"):
        assert report.oof[src]["recall"] >= 0.99
    assert report.oof["all"]["skip_rate"] > 0.2  # easy synthetic negatives: the gate skips
    # held-out users: every rephrase kept, most non-rephrases skipped
    test = _labelled(300, 7, "sim")
    keep = gate.keep(test)
    pos = np.array([ex.label >= 0 for ex in test])
    assert keep[pos].mean() >= 0.98
    assert (~keep[~pos]).mean() > 0.5
    scores = gate.scores(test)
    assert scores.shape == (len(test),) and ((scores >= 0) & (scores <= 1)).all()


def test_train_rejects_one_class_and_bad_recall() -> None:
    neg = [ex for ex in _labelled(100, 1, "sim") if ex.label < 0]
    with pytest.raises(ValueError, match="both"):
        RephraseGate.train(neg, PATTERNS)
    with pytest.raises(ValueError, match="target_recall"):
        RephraseGate.train(_labelled(50, 1, "sim"), PATTERNS, target_recall=0.0)


def test_save_load_round_trip_and_refusals(trained: tuple, tmp_path: Path) -> None:
    gate, report, _ = trained
    assert RephraseGate.load(tmp_path) is None  # an artifact without a gate
    gate.save(tmp_path, report)
    loaded = RephraseGate.load(tmp_path)
    assert loaded is not None and loaded.threshold == gate.threshold
    test = _labelled(60, 9, "sim")
    np.testing.assert_array_equal(loaded.scores(test), gate.scores(test))
    meta = json.loads((tmp_path / GATE_META).read_text())
    assert meta["feature_names"] == list(FEATURE_NAMES) and meta["oof"] == report.oof
    # a model file that does not match its metadata is refused
    (tmp_path / GATE_MODEL).write_text((tmp_path / GATE_MODEL).read_text() + "\n")
    with pytest.raises(ValueError, match="does not match"):
        RephraseGate.load(tmp_path)
    # a gate trained on other features is refused with the command that retrains it
    gate.save(tmp_path, report)
    (tmp_path / GATE_META).write_text(json.dumps({**meta, "features_version": "gate-v0"}))
    with pytest.raises(ValueError, match="qrw train detector-gate"):
        RephraseGate.load(tmp_path)


class _Recorder:
    """A detector that answers "context turn 0" for everything and records what it saw."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def predict(self, examples: list[DetectorExample]) -> list[Prediction]:
        self.seen.extend(ex.example_id for ex in examples)
        return [Prediction(0, 0.9) for _ in examples]


def test_gated_detector_only_runs_the_kept_examples(trained: tuple) -> None:
    gate, _, _ = trained
    test = _labelled(120, 11, "sim")
    keep = gate.keep(test)
    assert keep.any() and not keep.all()
    inner = _Recorder()
    preds = GatedDetector(inner, gate).predict(test)
    assert inner.seen == [ex.example_id for ex, k in zip(test, keep, strict=True) if k]
    for p, k in zip(preds, keep, strict=True):
        assert (p.label, p.score) == ((0, 0.9) if k else (-1, 0.0))


def gated_artifact(artifact: Path, dest: Path, examples: list[DetectorExample]) -> Path:
    """A copy of a span detector artifact (files linked) with a gate trained on synthetic
    examples whose threshold is the median score of ``examples``, so that about half of them
    are gated and half go to the model."""
    dest.mkdir(parents=True)
    for f in Path(artifact).iterdir():
        if f.name not in (GATE_MODEL, GATE_META):
            (dest / f.name).symlink_to(f.resolve())
    gate, report = RephraseGate.train(_labelled(300, 1, "sim"), PATTERNS)
    gate.threshold = float(np.median(gate.scores(examples)))
    report.threshold = gate.threshold
    gate.save(dest, report)
    return dest


@pytest.mark.slow
def test_job_skips_what_the_gate_rules_out(
    tmp_path: Path, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With a gate in the artifact the job's span model scores only the kept examples (their
    links are the model's own decisions on them) and reports the gated candidate pairs; with
    ``rephrase.gate`` off it scores every pair."""
    from test_span_detector import tiny_span_artifact, write_synthetic_logs

    from offline.detector.examples import build_examples
    from offline.detector.inference import SpanDetector
    from offline.job import run_nightly
    from offline.schema import read_turn_logs
    from offline.sessionize import sessionize, to_turns

    logs = write_synthetic_logs(tmp_path / "day-01.jsonl", synthetic_examples(40, seed=5))
    s = settings.model_copy(deep=True)
    turns = to_turns(read_turn_logs([logs]).turns)
    sessions = sessionize(turns, s.session.gap_s)
    examples = build_examples(turns, sessions, s.rephrase.lookback_turns, s.rephrase.max_gap_s)
    artifact = gated_artifact(tiny_span_artifact(tmp_path_factory), tmp_path / "art", examples)
    gate = RephraseGate.load(artifact)
    assert gate is not None
    keep = gate.keep(examples)
    assert keep.any() and not keep.all()

    s.rephrase.detector = "bert_span"
    s.rephrase.detector_artifact = artifact
    s.rephrase.min_detector_score = 0.0
    c = run_nightly([logs], tmp_path / "run", s, publish=False).counts
    kept = [ex for ex, k in zip(examples, keep, strict=True) if k]
    assert c["rephrase_candidates_scored"] == sum(len(ex.context) for ex in kept)
    assert c["rephrase_candidates_gated"] == sum(
        len(ex.context) for ex, k in zip(examples, keep, strict=True) if not k
    )
    import pyarrow.parquet as pq

    preds = SpanDetector.load(artifact, backend=s.rephrase.detector_backend).predict(kept)
    model_pairs = {
        (ex.context[p.label].turn_id, ex.example_id)
        for ex, p in zip(kept, preds, strict=True)
        if p.label >= 0
    }
    links = {
        (r["earlier_turn_id"], r["later_turn_id"])
        for r in pq.read_table(tmp_path / "run" / "rephrases.parquet").to_pylist()
    }
    assert links and links <= model_pairs  # nothing from a gated example
    gated_ids = {ex.example_id for ex, k in zip(examples, keep, strict=True) if not k}
    assert not {later for _, later in links} & gated_ids

    s.rephrase.gate = False
    c = run_nightly([logs], tmp_path / "run-off", s, publish=False).counts
    assert c["rephrase_candidates_scored"] == sum(len(ex.context) for ex in examples)
    assert c["rephrase_candidates_gated"] == 0


def test_train_detector_gate_cli(tmp_path: Path) -> None:
    """`qrw train detector-gate` trains a gate into an existing artifact folder from the
    labelled training data; a recall outside (0, 1] is refused."""
    from typer.testing import CliRunner

    from offline.cli import app
    from offline.detector.examples import write_examples

    art = tmp_path / "art"
    art.mkdir()
    (art / "detector.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    write_examples(_labelled(200, 1, "sim"), data / "train.jsonl")
    runner = CliRunner()
    args = ["train", "detector-gate", "--artifact", str(art), "--work-dir", str(data)]
    res = runner.invoke(app, [*args, "--target-recall", "0.98"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["target_recall"] == 0.98
    assert RephraseGate.load(art) is not None
    res = runner.invoke(app, [*args, "--target-recall", "1.5"])
    assert res.exit_code != 0 and "target-recall" in res.output
    shutil.rmtree(data)
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and "qrw train detector" in res.output


def test_train_gate_writes_both_files(tmp_path: Path) -> None:
    report = train_gate(tmp_path, _labelled(200, 2, "sim"), PATTERNS, 0.99)
    assert (tmp_path / GATE_MODEL).exists() and (tmp_path / GATE_META).exists()
    assert report.target_recall == 0.99 and report.oof["sim"]["recall"] >= 0.99
