"""Agreement of the defect rule with reference defects: counts, precision/recall, kappa,
per-signal precision, and the DSTC2 reference built from the weak-labelling failure test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline.ab.agreement import defect_agreement, dstc2_reference_defects


def test_confusion_counts_and_kappa_by_hand() -> None:
    pred = [True, True, False, False, True, False, False, False]
    true = [True, False, True, False, True, False, False, False]
    reasons = ["barge_in", "rephrased", "", "", "rephrased,failure_response", "", "", ""]
    a = defect_agreement("x", pred, true, reasons)
    assert (a.tp, a.fp, a.fn, a.tn) == (2, 1, 1, 4)
    assert a.precision == pytest.approx(2 / 3, abs=1e-4)
    assert a.recall == pytest.approx(2 / 3, abs=1e-4)
    # p_o = 6/8; p_e = (3/8)(3/8) + (5/8)(5/8) = 34/64; kappa = (0.75 - 34/64) / (1 - 34/64)
    assert a.kappa == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64), abs=1e-4)
    assert a.by_reason["rephrased"] == {"fired": 2, "precision": 0.5}
    assert a.by_reason["barge_in"] == {"fired": 1, "precision": 1.0}
    perfect = defect_agreement("y", true, true)
    assert perfect.f1 == 1.0 and perfect.kappa == 1.0
    with pytest.raises(ValueError):
        defect_agreement("z", [True], [True, False])


def test_dstc2_reference_reads_the_failure_of_the_next_prompt(tmp_path: Path) -> None:
    call = {
        "call_id": "c1",
        "turns": [
            {"turn_index": 0, "system": "Hello, how may I help you?",
             "asr_1best": "cheap food", "transcription": "thai food",
             "semantics": ["inform(food=thai)"]},
            {"turn_index": 1, "system": "What kind of food would you like?",
             "asr_1best": "thai food", "transcription": "thai food",
             "semantics": ["inform(food=thai)"]},
            {"turn_index": 2, "system": "Bangkok city serves thai food.",
             "asr_1best": "thank you goodbye", "transcription": "thank you goodbye",
             "semantics": ["thankyou()", "bye()"]},
        ],
    }  # fmt: skip
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps(call) + "\n")
    ref = dstc2_reference_defects(path)
    # turn 0: the system re-asks for food after "thai food" -> failed; turn 1 is answered;
    # the last turn has no following prompt
    assert ref == {"c1:0": True, "c1:1": False, "c1:2": False}
