"""The absorbing-Markov-chain solver against chains solved by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from offline.markov import (
    RephraseChain,
    absorption_probabilities,
    fundamental_matrix,
    mine_pairs,
)
from rewrite.config import MarkovSettings

# Two transient states with a cycle: 0 -> 1 w.p. .5, 1 -> 0 w.p. .25.
Q = np.array([[0.0, 0.5], [0.25, 0.0]])
R = np.array([[0.5, 0.0], [0.25, 0.5]])


def test_fundamental_matrix_by_hand() -> None:
    # N = (I - Q)^-1 = 1/(1 - 1/8) * [[1, .5], [.25, 1]]
    expected = (8 / 7) * np.array([[1.0, 0.5], [0.25, 1.0]])
    np.testing.assert_allclose(fundamental_matrix(Q), expected, rtol=1e-12)


def test_absorption_probabilities_by_hand() -> None:
    # B = N R = [[5/7, 2/7], [3/7, 4/7]]
    b = absorption_probabilities(sp.csr_matrix(Q), sp.csr_matrix(R))
    np.testing.assert_allclose(b, [[5 / 7, 2 / 7], [3 / 7, 4 / 7]], rtol=1e-12)
    np.testing.assert_allclose(b.sum(axis=1), [1.0, 1.0])


def test_absorption_blocks_match_single_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    import offline.markov as m

    rng = np.random.default_rng(0)
    n = 30
    q = rng.random((n, n)) * (rng.random((n, n)) < 0.1)
    r = rng.random((n, n + 1)) * (rng.random((n, n + 1)) < 0.2) + np.eye(n, n + 1)
    tot = q.sum(1) + r.sum(1)
    q, r = q / tot[:, None], r / tot[:, None]
    full = absorption_probabilities(sp.csr_matrix(q), sp.csr_matrix(r))
    monkeypatch.setattr(m, "_BLOCK_CELLS", 7)  # force many column blocks
    blocked = m.absorption_probabilities(sp.csr_matrix(q), sp.csr_matrix(r))
    np.testing.assert_allclose(blocked, full, rtol=1e-10)
    np.testing.assert_allclose(full, np.linalg.inv(np.eye(n) - q) @ r, rtol=1e-8)


def _chains() -> list[RephraseChain]:
    w, x = "wether in boston", "weather in boston"
    return [
        RephraseChain((w, x), True, "u1"),
        RephraseChain((w, x), True, "u2"),
        RephraseChain((w,), False, "u3"),
        RephraseChain((x,), True, "u4"),
    ]


def test_mine_pairs_hand_solved() -> None:
    # W -> X twice, W -> FAIL once: B[W, success(X)] = 2/3; X always absorbs into itself.
    pairs, stats = mine_pairs(_chains(), MarkovSettings(min_support=2, min_users=2))
    assert [(p.source, p.rewrite) for p in pairs] == [("wether in boston", "weather in boston")]
    assert pairs[0].absorption_probability == pytest.approx(2 / 3, abs=1e-6)
    assert (pairs[0].support, pairs[0].n_users) == (2, 2)
    assert stats.states == 2 and stats.components_solved == 1


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        (MarkovSettings(min_absorption_probability=0.7), "probability"),
        (MarkovSettings(min_support=3), "support"),
        (MarkovSettings(min_users=3), "users"),
    ],
)
def test_thresholds_reject(settings: MarkovSettings, reason: str) -> None:
    pairs, stats = mine_pairs(_chains(), settings)
    assert pairs == []
    assert stats.rejected == {reason: 1}


def test_utterance_that_usually_works_is_not_rewritten() -> None:
    chains = [RephraseChain(("play jazz",), True, f"u{i}") for i in range(5)]
    chains += [RephraseChain(("play jazz", "play jazz music"), True, f"v{i}") for i in range(2)]
    pairs, stats = mine_pairs(chains, MarkovSettings(min_support=1, min_users=1))
    assert pairs == []
    assert stats.candidates == 0


def test_cycles_and_components_are_solved_separately() -> None:
    a, b, c = "call mum", "call mom", "colmom"
    chains = [
        RephraseChain((a, b, a, b), True, "u1"),  # the user went back and forth
        RephraseChain((a, b), True, "u2"),
        RephraseChain((c, b), True, "u3"),
        RephraseChain(("lights of", "lights off"), True, "u1"),
        RephraseChain(("lights of", "lights off"), True, "u2"),
    ]
    pairs, stats = mine_pairs(chains, MarkovSettings(min_support=1, min_users=1))
    got = {p.source: p.rewrite for p in pairs}
    assert got == {a: b, c: b, "lights of": "lights off"}
    assert stats.components == 2 and stats.components_solved == 2


def test_giant_component_is_skipped_and_reported() -> None:
    chains = [RephraseChain((f"s{i}", f"s{i + 1}"), True, f"u{i}") for i in range(10)]
    pairs, stats = mine_pairs(
        chains, MarkovSettings(min_support=1, min_users=1, max_component_states=5)
    )
    assert pairs == [] and stats.components_skipped_giant == 1
