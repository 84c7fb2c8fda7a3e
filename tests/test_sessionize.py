"""Sessionization edge cases."""

from __future__ import annotations

import pytest

from offline.sessionize import Turn, sessionize


def _t(idx: int, user: str, ts: float, tid: str | None = None) -> Turn:
    return Turn(idx, tid or f"t{idx}", user, ts, "x", "x", "", False, 0, "")


def test_gap_boundary_is_inclusive() -> None:
    turns = [_t(0, "u", 0.0), _t(1, "u", 300.0), _t(2, "u", 600.001)]
    sessions = sessionize(turns, gap_s=300.0)
    assert [s.turns for s in sessions] == [(0, 1), (2,)]


def test_out_of_order_input_and_users_are_separated() -> None:
    turns = [_t(0, "b", 50.0), _t(1, "a", 20.0), _t(2, "a", 10.0), _t(3, "b", 5000.0)]
    sessions = sessionize(turns, gap_s=60.0)
    assert [(s.user_id, s.turns) for s in sessions] == [("a", (2, 1)), ("b", (0,)), ("b", (3,))]
    assert [s.session_id for s in sessions] == ["a#0", "b#0", "b#1"]


def test_equal_timestamps_order_by_turn_id() -> None:
    turns = [_t(0, "u", 1.0, "z"), _t(1, "u", 1.0, "a")]
    assert sessionize(turns, 10.0)[0].turns == (1, 0)


def test_empty_and_zero_gap() -> None:
    assert sessionize([], 10.0) == []
    turns = [_t(0, "u", 1.0), _t(1, "u", 1.0), _t(2, "u", 1.5)]
    assert [s.turns for s in sessionize(turns, 0.0)] == [(0, 1), (2,)]


def test_negative_gap_rejected() -> None:
    with pytest.raises(ValueError):
        sessionize([], -1.0)
