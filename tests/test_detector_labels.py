"""Detector labels: simulator truth -> context index, the DSTC2 weak-labelling rule (DSTC2:
Henderson, Thomson & Williams, SIGDIAL 2014) and the user-disjoint datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from offline.detector.examples import ContextFeature, DetectorExample, read_examples
from offline.detector.labels import (
    Act,
    LabelStats,
    RuleStats,
    build_datasets,
    call_rephrase_of,
    covers,
    dstc2_rephrase_of,
    failure_reasons,
    informative_acts,
    label_from_truth,
    prompt_values,
)
from rewrite.config import Settings

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared/data"
NEEDS_DATA = pytest.mark.skipif(
    not (DATA_ROOT / "dstc2/train.jsonl").is_file()
    or not (DATA_ROOT / "slurp/utterances.jsonl").is_file(),
    reason=f"DSTC2/SLURP data not found under {DATA_ROOT} (see shared/data/README.md)",
)

FOOD_Q = "What kind of food would you like?"
AREA_Q = "What part of town do you have in mind?"


# --- label_from_truth ---------------------------------------------------------------------


def _ex(eid: str, ctx_ids: list[str]) -> DetectorExample:
    ctx = tuple(
        ContextFeature(c, f"text {c}", 5.0 * (k + 1), False, "") for k, c in enumerate(ctx_ids)
    )
    return DetectorExample(eid, "u1", "sim", f"text {eid}", ctx)


def test_label_from_truth_exact_indices_and_out_of_context() -> None:
    examples = [
        _ex("t4", ["t3", "t2", "t1"]),  # newest first: t2 is index 1
        _ex("t5", ["t4", "t3", "t2"]),  # t0 is further back than the context
        _ex("t6", ["t5"]),  # no rephrase
        _ex("t7", ["t6", "t5"]),  # missing from the mapping: no rephrase
        _ex("t8", ["t7", "t6", "t5"]),  # newest-but-two
    ]
    truth: dict[str, str | None] = {"t4": "t2", "t5": "t0", "t6": None, "t8": "t5"}
    stats = LabelStats()
    out = label_from_truth(examples, truth, stats)
    assert [ex.label for ex in out] == [1, -1, -1, -1, 2]
    assert (stats.examples, stats.positives, stats.out_of_context) == (5, 2, 1)
    assert [ex.example_id for ex in out] == [ex.example_id for ex in examples]
    assert examples[0].label == -1  # inputs untouched


# --- the DSTC2 rule on hand-written calls ---------------------------------------------------


def _turn(idx: int, system: str, asr: str, transcription: str, *sem: str) -> dict[str, Any]:
    return {
        "turn_index": idx,
        "system": system,
        "asr_1best": asr,
        "transcription": transcription,
        "semantics": list(sem),
    }


def _call(*turns: dict[str, Any]) -> dict[str, Any]:
    return {"call_id": "c1", "caller_id": "x", "turns": list(turns)}


def test_rule_positive_same_inform_after_sorry() -> None:
    call = _call(
        _turn(0, FOOD_Q, "tie food", "thai food", "inform(food=thai)"),
        _turn(1, "Sorry I am a bit confused ; please tell me again what you are looking for .",
              "thai food please", "thai food please", "inform(food=thai)"),
    )  # fmt: skip
    stats = RuleStats()
    assert call_rephrase_of(call, stats=stats) == {"c1:0": None, "c1:1": "c1:0"}
    assert stats.positives == 1 and stats.reasons["clarify"] == 1


def test_rule_positive_reask_and_wrong_value() -> None:
    reask = _call(
        _turn(0, AREA_Q, "nor", "north", "inform(area=north)"),
        _turn(1, AREA_Q, "the north", "the north", "inform(area=north)"),
    )
    assert call_rephrase_of(reask)["c1:1"] == "c1:0"
    wrong = _call(
        _turn(0, FOOD_Q, "korean", "korean", "inform(food=korean)"),
        _turn(1, "I'm sorry but there is no restaurant serving corsica food", "korean food",
              "korean food", "reqalts()", "inform(food=korean)"),
    )  # fmt: skip
    assert call_rephrase_of(wrong)["c1:1"] == "c1:0"


def test_rule_negative_different_acts() -> None:
    call = _call(
        _turn(0, FOOD_Q, "tie food", "thai food", "inform(food=thai)"),
        _turn(1, "Sorry I am a bit confused ; please tell me again what you are looking for .",
              "indian food", "indian food", "inform(food=indian)"),
    )  # fmt: skip
    assert call_rephrase_of(call)["c1:1"] is None


def test_rule_negative_same_acts_after_successful_turn() -> None:
    call = _call(
        _turn(0, "golden wok is a nice place", "phone number", "phone number", "request(phone)"),
        _turn(1, "The phone number of golden wok is 01223 350688 .", "phone number",
              "phone number", "request(phone)"),
    )  # fmt: skip
    stats = RuleStats()
    assert call_rephrase_of(call, stats=stats)["c1:1"] is None
    assert stats.same_acts_no_failure == 1 and stats.positives == 0
    # The same request after the fallback prompt is a rephrase.
    call["turns"][1]["system"] = "golden wok is a great restaurant"
    assert call_rephrase_of(call)["c1:1"] == "c1:0"


def test_rule_ignores_non_informative_acts() -> None:
    call = _call(
        _turn(0, "Did you say you are looking for a restaurant in the west of town?", "yes", "yes",
              "affirm()"),
        _turn(1, "Sorry I am a bit confused ; please tell me again what you are looking for .",
              "yes", "yes", "affirm()"),
    )  # fmt: skip
    assert call_rephrase_of(call)["c1:1"] is None


def test_rule_chains_over_unlogged_turns_and_respects_max_back() -> None:
    sorry = "Sorry I am a bit confused ; please tell me again what you are looking for ."
    call = _call(
        _turn(0, FOOD_Q, "tie", "thai", "inform(food=thai)"),
        _turn(1, sorry, "", "thai", "inform(food=thai)"),  # empty ASR: not a log row
        _turn(2, sorry, "thai", "thai", "inform(food=thai)"),
    )
    stats = RuleStats()
    out = call_rephrase_of(call, logged={"c1:0", "c1:2"}, stats=stats)
    assert out == {"c1:0": None, "c1:2": "c1:0"}  # unlogged c1:1 is neither labelled nor a target
    assert stats.chained == 1
    # Candidate 4 logged turns back is beyond max_back=3.
    far = _call(
        _turn(0, FOOD_Q, "tie", "thai", "inform(food=thai)"),
        _turn(1, sorry, "south", "south", "inform(area=south)"),
        _turn(2, FOOD_Q, "cheap", "cheap", "inform(pricerange=cheap)"),
        _turn(3, FOOD_Q, "phone", "phone", "request(phone)"),
        _turn(4, "nandos is a nice place", "thai food", "thai food", "inform(food=thai)"),
    )
    assert call_rephrase_of(far, max_back=3)["c1:4"] is None
    assert call_rephrase_of(far, max_back=4)["c1:4"] == "c1:0"


def test_rule_parts() -> None:
    # "I don't care" resolves to the slot the preceding prompt asked for.
    assert informative_acts(["inform(this=dontcare)", "bye()"], AREA_Q) == {
        Act("inform", "area", "dontcare")
    }
    v = prompt_values("Sorry but there is no other restaurant in the cheap price range and the "
                      "west of town")  # fmt: skip
    assert v == {"food": set(), "area": {"west"}, "pricerange": {"cheap"}}
    assert prompt_values("Sorry would you like bistro or turkish food?")["food"] == {
        "bistro",
        "turkish",
    }
    thai = frozenset({Act("inform", "food", "thai")})
    assert covers(thai | {Act("inform", "area", "north")}, thai)
    assert covers(thai, thai | {Act("reqalts")})  # "how about thai" ~ "thai food"
    assert not covers(frozenset({Act("reqalts")}) | thai, frozenset({Act("reqalts")}))
    assert "misheard" in failure_reasons(
        frozenset({Act("inform", "food", "seafood")}),
        FOOD_Q,
        "la raza is in the cheap price range",
        "cheap food",
        "sea food",
    )
    # A confirm question is answered by a statement about its slot, whatever the value.
    assert not failure_reasons(
        frozenset({Act("confirm", "food", "thai")}), "x", "sala thong serves chinese food", "", ""
    )


# --- real data --------------------------------------------------------------------------------


@NEEDS_DATA
def test_rule_on_real_calls_finds_some_rephrases() -> None:
    res = dstc2_rephrase_of(DATA_ROOT / "dstc2/train.jsonl", max_calls=100)
    st = res.stats
    assert st.calls == 100 and st.judged == st.user_turns == len(res.rephrase_of)
    assert 0.03 < st.positives / st.judged < 0.3  # ~11 % on the full file
    for j, i in res.rephrase_of.items():
        if i is not None:
            cj, tj = j.rsplit(":", 1)
            ci, ti = i.rsplit(":", 1)
            assert cj == ci and int(ti) < int(tj)
            assert res.reasons[j]


@NEEDS_DATA
def test_build_datasets_small(tmp_path: Path) -> None:
    settings = Settings()
    out = tmp_path / "data"
    stats = build_datasets(out, DATA_ROOT, settings, sim_users=30, sim_days=1, sim_seed=1001,
                           dstc2_max_calls=80)  # fmt: skip
    names = ("train", "dev", "test_sim", "test_dstc2")
    splits = {n: read_examples(out / f"{n}.jsonl") for n in names}
    users = {n: {ex.user_id for ex in rows} for n, rows in splits.items()}
    for a in names:
        for b in names:
            if a < b:
                assert not users[a] & users[b], (a, b)
    assert {ex.source for ex in splits["test_sim"]} == {"sim"}
    assert {ex.source for ex in splits["test_dstc2"]} == {"dstc2"}
    assert {ex.source for ex in splits["train"]} == {"sim", "dstc2"}
    for rows in splits.values():
        for ex in rows:
            assert -1 <= ex.label < len(ex.context) <= settings.rephrase.lookback_turns
            if ex.label >= 0:
                assert ex.context[ex.label].turn_id != ex.example_id
    train = splits["train"]
    assert any(ex.label >= 0 for ex in train if ex.source == "sim")
    assert any(ex.label >= 0 for ex in train if ex.source == "dstc2")
    saved = json.loads((out / "stats.json").read_text())
    assert saved == json.loads(json.dumps(stats.to_json()))
    assert saved["files"]["train"]["all"]["examples"] == len(train)
    assert saved["rule"]["dstc2_dev"]["calls"] == 80
