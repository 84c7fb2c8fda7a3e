"""Experiment arms: deterministic salted-hash assignment, shares, explicit arms, and what each
arm lets the Rewriter do (precomputed pairs here; the online layers in test_online.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from rewrite.config import ArmSettings, ExperimentSettings, Settings
from rewrite.experiment import ArmAssigner, UnknownArmError
from rewrite.rewriter import Rewriter
from rewrite.store import StaticPairStore
from rewrite.types import InvalidRequestError, RewriteRequest


def test_assignment_is_deterministic_and_follows_the_shares() -> None:
    cfg = ExperimentSettings(enabled=True, name="exp-a")
    a, b = ArmAssigner(cfg), ArmAssigner(cfg)
    users = [f"user-{i}" for i in range(20_000)]
    arms = [a.assign(u).name for u in users]
    assert arms == [b.assign(u).name for u in users]
    counts = Counter(arms)
    assert set(counts) == {"control", "precomputed", "global", "global_personal"}
    for name in counts:  # 25% each; 20k users -> sd ~0.3 pt
        assert abs(counts[name] / len(users) - 0.25) < 0.015, counts


def test_a_new_experiment_name_reshuffles_users() -> None:
    users = [f"user-{i}" for i in range(2_000)]
    one = ArmAssigner(ExperimentSettings(enabled=True, name="exp-a"))
    two = ArmAssigner(ExperimentSettings(enabled=True, name="exp-b"))
    same = sum(one.assign(u).name == two.assign(u).name for u in users)
    assert 0.15 < same / len(users) < 0.35  # independent 4-way split: ~25% agree by chance


def test_uneven_shares_and_validation() -> None:
    cfg = ExperimentSettings(
        enabled=True,
        default_arm="control",
        arms={
            "control": ArmSettings(share=0.9),
            "treat": ArmSettings(share=0.1, layers=["global"]),
        },
    )
    counts = Counter(ArmAssigner(cfg).assign(f"u{i}").name for i in range(10_000))
    assert abs(counts["treat"] / 10_000 - 0.1) < 0.015
    with pytest.raises(ValidationError, match="sum to 1"):
        ExperimentSettings(arms={"control": ArmSettings(share=0.5)}, default_arm="control")
    with pytest.raises(ValidationError, match="unknown layer"):
        ArmSettings(share=1.0, layers=["telepathy"])
    with pytest.raises(ValidationError, match="default_arm"):
        ExperimentSettings(default_arm="nope")


def test_resolve_explicit_enabled_and_default() -> None:
    off = ArmAssigner(ExperimentSettings(enabled=False))
    assert off.resolve("anyone").name == "global_personal"
    assert off.resolve("anyone", "control").name == "control"
    with pytest.raises(UnknownArmError, match="unknown arm 'bogus'"):
        off.resolve("anyone", "bogus")
    on = ArmAssigner(ExperimentSettings(enabled=True))
    assert on.resolve("user-7").name == on.assign("user-7").name


@pytest.fixture
def rewriter(settings: Settings) -> Rewriter:
    s = settings.model_copy(deep=True)
    s.service.pipeline = ["normalize", "precomputed"]
    s.experiment = ExperimentSettings(enabled=True, name="exp-arms")
    store = StaticPairStore({"play jaz": ("play jazz", 0.9, 5, 3)}, version="v1")
    r = Rewriter(s, pair_store=store)
    r.warm_up()
    return r


def test_each_arm_applies_only_its_layers(rewriter: Rewriter) -> None:
    def ask(arm: str) -> tuple[bool, str, str]:
        res = rewriter.rewrite(RewriteRequest("play jaz", user_id="u1", arm=arm))
        return res.rewritten, res.arm, res.reason

    assert ask("control") == (False, "control", "control_arm")
    assert ask("precomputed")[:2] == (True, "precomputed")
    assert ask("global")[:2] == (True, "global")  # global includes the precomputed layer
    assert ask("global_personal")[:2] == (True, "global_personal")


def test_assigned_arm_is_returned_and_unknown_arm_is_invalid(rewriter: Rewriter) -> None:
    assigner = ArmAssigner(rewriter.settings.experiment)
    for user in ("u1", "u2", "u3", "u4", "u5"):
        res = rewriter.rewrite(RewriteRequest("play jaz", user_id=user))
        assert res.arm == assigner.assign(user).name
        assert res.rewritten == (res.arm != "control")
    with pytest.raises(InvalidRequestError, match="unknown arm"):
        rewriter.rewrite(RewriteRequest("play jaz", user_id="u1", arm="bogus"))
