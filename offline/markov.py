"""Absorbing Markov chain over rephrase chains → precomputed rewrite pairs.

States are normalized utterances. Each rephrase chain ``u1 → u2 → … → un`` observed in a
session adds one transition count per step; its last turn is absorbed into
``success(un)`` when that turn succeeded, or into ``FAIL`` when it was a defect. Turns that
nobody rephrased are one-element chains, so an utterance that usually works carries its own
success mass. Chains hold the users' own turns only: a turn the service rewrote is cut out by
:func:`offline.job.build_chains`, so a served rewrite never adds to its own support or
absorption probability (:mod:`offline.self_learning`). With ``Q`` (transient → transient)
and ``R`` (transient → absorbing) the row-normalized counts, the absorption probabilities are

    B = N R,   N = (I − Q)⁻¹ (the fundamental matrix),

solved with a sparse LU factorization (``scipy.sparse.linalg.splu``) per connected
component of the rephrase graph — never a dense inverse of the whole graph. A pair is
(transient utterance → the success state with the highest absorption probability) when that
state is another utterance and probability, support and distinct users pass the thresholds.

Sources: Kemeny & Snell, *Finite Markov Chains* (1960), ch. 3; Ponnusamy et al.,
"Feedback-Based Self-Learning in Large-Scale Conversational AI Agents", AAAI 2020.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import splu

from rewrite.config import MarkovSettings

log = logging.getLogger(__name__)

FAIL = "<FAIL>"
_BLOCK_CELLS = 4_000_000  # dense (n × block) right-hand sides solved at a time


@dataclass(frozen=True)
class RephraseChain:
    """One chain of a user's turns, each rephrasing the previous.

    Attributes:
        utterances: normalized utterances in time order (length >= 1).
        success: whether the last turn succeeded (absorbed into ``success(last)``).
        user_id: the user behind the chain.
    """

    utterances: tuple[str, ...]
    success: bool
    user_id: str


@dataclass(frozen=True)
class RewritePair:
    """A mined rewrite: ``source`` → ``rewrite`` (both normalized)."""

    source: str
    rewrite: str
    absorption_probability: float
    support: int
    n_users: int


@dataclass
class MarkovStats:
    """Counts reported by :func:`mine_pairs` (``report.json`` ``markov``).

    ``components`` counts connected components with at least two states, ``largest_component``
    the states of the largest (singletons included), ``components_skipped_giant`` /
    ``states_skipped_giant`` the components over ``markov.max_component_states`` that were
    skipped (no pairs) and their states.
    """

    chains: int = 0
    states: int = 0
    rephrase_edges: int = 0
    components: int = 0
    components_solved: int = 0
    components_skipped_giant: int = 0
    states_skipped_giant: int = 0
    largest_component: int = 0
    candidates: int = 0
    pairs: int = 0
    min_users_effective: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def fundamental_matrix(q: np.ndarray) -> np.ndarray:
    """Dense ``N = (I − Q)⁻¹`` for a small chain (tests, docs).

    Args:
        q: (n, n) float64 transient-to-transient transition probabilities.

    Returns:
        (n, n) float64: expected visits to state j starting from state i.

    Raises:
        numpy.linalg.LinAlgError: ``I − Q`` is singular (some state never absorbs).
    """
    return np.linalg.inv(np.eye(q.shape[0]) - q)


def absorption_probabilities(q: sp.spmatrix, r: sp.spmatrix) -> np.ndarray:
    """``B = (I − Q)⁻¹ R`` by sparse LU, without forming the inverse.

    Args:
        q: (n, n) sparse, row-substochastic transient transitions.
        r: (n, m) sparse transient-to-absorbing transitions; rows of ``[Q R]`` sum to 1.

    Returns:
        (n, m) float64 dense absorption probabilities; rows sum to 1.

    Raises:
        RuntimeError: ``I − Q`` is singular (from SuperLU).
    """
    n = q.shape[0]
    a = (sp.identity(n, format="csc") - sp.csc_matrix(q)).tocsc()
    lu = splu(a)
    r = sp.csc_matrix(r)
    m = r.shape[1]
    step = max(1, _BLOCK_CELLS // max(n, 1))
    out = np.empty((n, m), dtype=np.float64)
    for c0 in range(0, m, step):
        block = r[:, c0 : c0 + step].toarray()
        out[:, c0 : c0 + step] = lu.solve(block)
    return out


def _support(chains: Iterable[RephraseChain]) -> tuple[Counter[tuple[str, str]], dict]:
    support: Counter[tuple[str, str]] = Counter()
    users: dict[tuple[str, str], set[str]] = defaultdict(set)
    for ch in chains:
        if not ch.success:
            continue
        target = ch.utterances[-1]
        for u in set(ch.utterances[:-1]):
            if u != target:
                support[(u, target)] += 1
                users[(u, target)].add(ch.user_id)
    return support, users


def solve_component(
    chains: Sequence[RephraseChain], settings: MarkovSettings, min_users: int
) -> tuple[list[RewritePair], int, Counter[str]]:
    """Solve one connected component of the rephrase graph and apply the pair thresholds.

    The one Markov solve both engines call (:mod:`offline.engine`): the local engine per
    component from :func:`mine_pairs`, the Spark engine per component through
    ``groupBy(component).applyInArrow``. Every chain that touches a state of a component lies
    entirely inside it (consecutive utterances are graph edges), so the counts, support and
    users computed here from the component's chains equal the global ones.

    Args:
        chains: every chain of one component, in the run's chain order (sessions by user and
            start time, chains by start turn) — state ``i`` is the ``i``-th distinct utterance
            in that order, which fixes the LU's row order and the argmax tie-breaks, so a
            component gives bit-identical probabilities whichever engine calls this.
        settings: thresholds ``min_absorption_probability`` and ``min_support``.
        min_users: effective distinct-user floor (``max(markov.min_users, privacy floor)``).

    Returns:
        (pairs in state order — not sorted; candidates considered; rejections by reason).

    Raises:
        RuntimeError: ``I − Q`` is singular (from SuperLU; cannot happen for chains that end
            in an absorbing state).
    """
    state_id: dict[str, int] = {}
    for ch in chains:
        for u in ch.utterances:
            state_id.setdefault(u, len(state_id))
    k = len(state_id)
    trans: Counter[tuple[int, int]] = Counter()
    absorb: Counter[tuple[int, int]] = Counter()  # (state, absorbing state id or -1 = FAIL)
    for ch in chains:
        ids = [state_id[u] for u in ch.utterances]
        for a, b in itertools.pairwise(ids):
            trans[(a, b)] += 1
        absorb[(ids[-1], ids[-1] if ch.success else -1)] += 1
    out_trans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (a, b), c in trans.items():
        out_trans[a].append((b, c))
    out_abs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (a, t), c in absorb.items():
        out_abs[a].append((t, c))
    names = list(state_id)
    support, users = _support(chains)
    q_rows, q_cols, q_vals, r_rows, r_cols, r_vals = [], [], [], [], [], []
    for g in range(k):
        total = sum(c for _, c in out_trans[g]) + sum(c for _, c in out_abs[g])
        for b, c in out_trans[g]:
            q_rows.append(g)
            q_cols.append(b)
            q_vals.append(c / total)
        for a, c in out_abs[g]:
            r_rows.append(g)
            r_cols.append(k if a < 0 else a)  # column k = FAIL
            r_vals.append(c / total)
    q = sp.csr_matrix((q_vals, (q_rows, q_cols)), shape=(k, k))
    r = sp.csr_matrix((r_vals, (r_rows, r_cols)), shape=(k, k + 1))
    success = absorption_probabilities(q, r)[:, :k]
    best = success.argmax(axis=1)
    rejected: Counter[str] = Counter()
    pairs: list[RewritePair] = []
    candidates = 0
    for li in range(k):
        tgt = int(best[li])
        prob = float(success[li, tgt])
        if tgt == li or prob <= 0.0:
            continue  # the utterance itself is its most likely success: no rewrite
        candidates += 1
        src, dst = names[li], names[tgt]
        sup = support.get((src, dst), 0)
        n_users = len(users.get((src, dst), ()))
        if prob < settings.min_absorption_probability:
            rejected["probability"] += 1
        elif sup < settings.min_support:
            rejected["support"] += 1
        elif n_users < min_users:
            rejected["users"] += 1
        else:
            pairs.append(RewritePair(src, dst, round(prob, 6), sup, n_users))
    return pairs, candidates, rejected


def mine_pairs(
    chains: Sequence[RephraseChain], settings: MarkovSettings, min_users_global: int = 1
) -> tuple[list[RewritePair], MarkovStats]:
    """Solve the absorbing chain per connected component and keep the pairs that pass.

    Connected components of the undirected rephrase graph (states = utterances, edges =
    observed rephrases between different utterances) come from
    ``scipy.sparse.csgraph.connected_components``; each component with at least two states is
    solved by :func:`solve_component` on its own chains. A component with more than
    ``settings.max_component_states`` states is **skipped** (no pairs from it) and counted in
    ``MarkovStats.components_skipped_giant`` with a WARNING: a giant component usually means
    generic utterances ("stop", "yes") link unrelated intents, and its pairs would not be
    trustworthy anyway; the cap keeps one solve's memory bounded.

    Args:
        chains: every chain of the run (including one-turn chains), in the run's chain order.
        settings: thresholds ``min_absorption_probability``, ``min_support``, ``min_users``
            and the component size cap ``max_component_states``.
        min_users_global: k-anonymity floor (``privacy.min_users_global``): a pair needs at
            least ``max(settings.min_users, min_users_global)`` distinct users behind the
            successful chains that support it.

    Returns:
        (pairs sorted by source, stats).
    """
    min_users = max(settings.min_users, min_users_global)
    stats = MarkovStats(chains=len(chains), min_users_effective=min_users)
    state_id: dict[str, int] = {}
    for ch in chains:
        for u in ch.utterances:
            state_id.setdefault(u, len(state_id))
    n = len(state_id)
    stats.states = n
    edge_set: set[tuple[int, int]] = set()
    for ch in chains:
        ids = [state_id[u] for u in ch.utterances]
        edge_set.update((a, b) for a, b in itertools.pairwise(ids) if a != b)
    stats.rephrase_edges = len(edge_set)
    if not edge_set:
        return [], stats
    edges = sorted(edge_set)
    rows = np.fromiter((a for a, _ in edges), dtype=np.int64, count=len(edges))
    cols = np.fromiter((b for _, b in edges), dtype=np.int64, count=len(edges))
    graph = sp.coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n)).tocsr()
    n_comp, labels = connected_components(graph, directed=False)
    comp_sizes = np.bincount(labels, minlength=n_comp)
    stats.components = int(np.count_nonzero(comp_sizes > 1))
    stats.largest_component = int(comp_sizes.max()) if n else 0
    chains_of: dict[int, list[RephraseChain]] = defaultdict(list)
    for ch in chains:
        lab = int(labels[state_id[ch.utterances[0]]])
        if comp_sizes[lab] > 1:
            chains_of[lab].append(ch)
    rejected: Counter[str] = Counter()
    pairs: list[RewritePair] = []
    for lab in sorted(chains_of):
        size = int(comp_sizes[lab])
        if size > settings.max_component_states:
            stats.components_skipped_giant += 1
            stats.states_skipped_giant += size
            log.warning("skipping giant component with %d states", size)
            continue
        stats.components_solved += 1
        got, candidates, rej = solve_component(chains_of[lab], settings, min_users)
        pairs.extend(got)
        stats.candidates += candidates
        rejected.update(rej)
    pairs.sort(key=lambda p: p.source)
    stats.pairs = len(pairs)
    stats.rejected = dict(rejected)
    return pairs, stats
