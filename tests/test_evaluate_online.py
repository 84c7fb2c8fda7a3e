"""`qrw evaluate online`: retrieval metrics, the BM25 / SymSpell / dense baselines, example
construction, trigger metrics and a small end-to-end run (job → publish → Rewriter replay) on
hand-written logs with a real Redis."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from logrows import turn_row

from offline.baselines_online import BM25Retriever, DenseRetriever, SymSpellRetriever
from offline.detector.downstream import DownstreamSource
from offline.evaluate_online import (
    FULL_STACK,
    build_examples,
    evaluate_online,
    match_form,
    match_form_joined,
    rank_of,
    retrieval_metrics,
    trigger_metrics,
)
from rewrite.config import Settings
from rewrite.types import RewriteRequest, RewriteResult

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
FAIL = "Sorry, I didn't understand that."
OK = "Here you go."
CATALOG = [
    "what's the weather in wilmington",
    "play some jazz",
    "turn off the kitchen lights",
    "what's the weather in boston",
    "set an alarm for seven am",
]


def _row(tid: str, user: str, sec: float, utt: str, response: str = OK) -> dict[str, object]:
    return turn_row(tid, user, sec, utt, response, t0=T0)


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- metrics


def test_retrieval_metrics_exact_values_with_a_miss() -> None:
    ranked = [
        ["a", "b", "c"],  # rank 1
        ["x", "a", "y"],  # rank 2
        ["p", "q", "r", "s", "t", "a"],  # rank 6: outside the top 5, inside the top 10
        ["m", "n"],  # miss
    ]
    m = retrieval_metrics("toy", ranked, ["a"] * 4, k=10)
    assert m.n == 4 and m.k == 10
    assert m.recall_at_1 == pytest.approx(0.25)
    assert m.recall_at_5 == pytest.approx(0.5)
    assert m.found_at_k == pytest.approx(0.75)
    assert m.mrr == pytest.approx((1 + 1 / 2 + 1 / 6 + 0) / 4)
    m5 = retrieval_metrics("toy", ranked, ["a"] * 4, k=5)  # rank 6 is cut off
    assert m5.mrr == pytest.approx((1 + 1 / 2) / 4) and m5.found_at_k == pytest.approx(0.5)
    empty = retrieval_metrics("none", [], [], k=10)
    assert (empty.n, empty.recall_at_1, empty.mrr) == (0, 0.0, 0.0)
    with pytest.raises(ValueError):
        retrieval_metrics("bad", [["a"]], ["a", "b"])
    assert m.distinct == 0 and m.distinct_recall_at_1 is None  # no queries given


def test_recall_over_distinct_queries_counts_a_repeated_miss_once() -> None:
    """One misheard utterance said three times (all misses) weighs 3 of 5 per-turn examples
    but 1 of 3 distinct queries; a query ranked differently per example (the personal layer)
    counts its average."""
    queries = ["stars the radio nie"] * 3 + [
        "brighton lights",
        "temperature gnu",
        "temperature gnu",
    ]
    targets = ["start the radio now"] * 3 + [
        "brighten lights",
        "temperature now",
        "temperature now",
    ]
    ranked = [["put the radio on"]] * 3 + [["brighten lights"]]
    ranked += [["temperature now"], ["temperature", "temperature now"]]
    m = retrieval_metrics("toy", ranked, targets, k=10, queries=queries)
    assert m.recall_at_1 == pytest.approx(2 / 6)
    assert m.distinct == 3
    assert m.distinct_recall_at_1 == pytest.approx((0 + 1 + 0.5) / 3)
    with pytest.raises(ValueError, match="queries"):
        retrieval_metrics("bad", ranked, targets, queries=queries[:2])


def test_rank_of_compares_matching_forms() -> None:
    assert match_form("I'm  looking for Food!") == "im looking for food"
    assert match_form("thank you good bye") != match_form("thank you goodbye")
    assert match_form_joined("thank you good bye") == match_form_joined("Thank you goodbye.")
    assert rank_of(["thai food", "i'm looking for food"], "im looking for food") == 2
    assert rank_of(["thai food"], "indian food") is None
    assert rank_of(["a", "b", "c"], "c", k=2) is None
    assert rank_of(["seafood"], "sea food") is None
    assert rank_of(["seafood"], "sea food", form=match_form_joined) == 1


def _res(utt: str, rewrite: str | None, source: str) -> tuple[RewriteRequest, RewriteResult]:
    req = RewriteRequest(utt, "u")
    done = rewrite is not None
    out = RewriteResult(
        rewrite or utt, done, source if done else "none", 0.9 if done else 0.0, "v1", utt
    )
    return req, out


def test_trigger_metrics_counts_online_rewrites_only() -> None:
    results = {
        "t1": _res("whats the weather in wilkerson", "what's the weather in wilmington", "global"),
        "t2": _res("play sum jazz", "play the news", "personal"),  # wrong rewrite
        "t3": _res("play some jazz", "play the news", "global"),  # trigger on a correct turn
        "t4": _res("turn of the lights", "turn off the lights", "precomputed"),
        "t5": _res("set an alarm", None, "none"),
        "t6": _res("no truth for me", "something", "global"),  # ignored: no truth row
    }
    truth = {
        "t1": "what's the weather in wilmington",
        "t2": "play some jazz",
        "t3": "play some jazz",
        "t4": "turn off the lights",
        "t5": "set an alarm",
    }
    tm = trigger_metrics(results, truth, success_fn=lambda text, ref: text.startswith("play"))
    assert tm.turns == 5
    assert (tm.triggered, tm.triggered_global, tm.triggered_personal) == (3, 2, 1)
    assert tm.correct == 1 and tm.triggered_on_correct_turns == 1 and tm.precomputed == 1
    assert tm.trigger_rate == pytest.approx(3 / 5)
    assert tm.precision_at_trigger == pytest.approx(1 / 3)
    assert tm.task_correct == 2 and tm.precision_at_trigger_task == pytest.approx(2 / 3)
    assert trigger_metrics(results, truth).task_correct is None


def test_build_examples_keeps_wrong_turns_whose_intent_is_in_the_catalog(tmp_path: Path) -> None:
    rows = [
        _row("a1", "alice", 0, "play some jazz"),  # correct
        _row("a2", "alice", 20, "whats the weather in wilkerson", FAIL),  # wrong, in catalog
        _row("b1", "bob", 0, "turn of the kitchen lights"),  # wrong, in catalog
        _row("c1", "carol", 0, "call my mother"),  # wrong, intended not in the catalog
        _row("d1", "dave", 0, "what's the weather in boston!"),  # correct after normalization
        _row("e1", "erin", 0, "no truth row"),
    ]
    truth = {
        "a1": "play some jazz",
        "a2": "whats the weather in wilmington",
        "b1": "turn off the kitchen lights",
        "c1": "call my brother",
        "d1": "what's the weather in Boston",
    }
    logs = _write(tmp_path / "held.jsonl", rows)
    tpath = _write(
        tmp_path / "truth.jsonl", [{"turn_id": k, "intended_text": v} for k, v in truth.items()]
    )
    ex = build_examples("toy", [logs], tpath, CATALOG)
    assert (ex.heldout_turns, ex.wrong_turns, ex.not_in_catalog) == (5, 3, 1)
    assert [e.turn_id for e in ex.examples] == ["b1", "a2"]  # replay order (time, turn id)
    by_id = {e.turn_id: e for e in ex.examples}
    # the target is the catalog's spelling (apostrophe), matched through the matching form
    assert by_id["a2"].target == "what's the weather in wilmington"
    assert by_id["a2"].query == "whats the weather in wilkerson"
    assert [c.utterance for c in by_id["a2"].context] == ["play some jazz"]
    assert by_id["a2"].context[0].seconds_ago == pytest.approx(20.0)
    assert by_id["b1"].user_id == "bob" and by_id["b1"].context == ()
    assert ex.catalog_coverage == pytest.approx(2 / 3)
    assert ex.query_in_catalog == 0
    # spacing-insensitive: "play somejazz" is then the right utterance, not a wrong one
    _write(logs, [*rows, _row("f1", "fred", 5, "play somejazz")])
    _write(
        tpath,
        [{"turn_id": k, "intended_text": v} for k, v in {**truth, "f1": "play some jazz"}.items()],
    )
    assert build_examples("toy", [logs], tpath, CATALOG).wrong_turns == 4
    assert build_examples("toy", [logs], tpath, CATALOG, form=match_form_joined).wrong_turns == 3


# --------------------------------------------------------------------------- baselines


def test_bm25_top1_for_a_misspelling() -> None:
    bm25 = BM25Retriever(CATALOG)
    hits = bm25.search(["play sum jazz", "whats the weather in wilmington", "qqq zzz"], k=3)
    assert hits[0][0][0] == "play some jazz"
    assert hits[1][0][0] == "what's the weather in wilmington"  # shares "wilmington"
    assert hits[2] == []  # no known word: no hit (BM25 score 0 is never returned)
    assert all(len(h) <= 3 for h in hits)
    assert all(a[1] >= b[1] for h in hits for a, b in itertools.pairwise(h))


def test_symspell_corrects_then_matches_the_catalog() -> None:
    sym = SymSpellRetriever(CATALOG, frequencies=[50, 20, 10, 30, 5])
    assert sym.correct("turn of the kitchin lights") == "turn off the kitchen lights"
    hits = sym.search(["turn of the kitchin lights", "what's the wether in wilmingtn"], k=3)
    assert hits[0][0] == ("turn off the kitchen lights", 3.0)
    assert hits[1][0][0] == "what's the weather in wilmington"
    assert len(hits[0]) == 3 and len({t for t, _ in hits[0]}) == 3
    with pytest.raises(ValueError):
        SymSpellRetriever(CATALOG, frequencies=[1])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dpr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zero-shot DPR artifact, exported once for this module."""
    from offline.dpr.train import export_zero_shot

    root = tmp_path_factory.mktemp("dpr")
    export_zero_shot(root)
    return root


@pytest.mark.slow
def test_dense_zero_shot_baseline(dpr_dir: Path) -> None:
    art = next(p for p in dpr_dir.iterdir() if (p / "dpr.json").exists())
    dense = DenseRetriever(CATALOG, art, "minilm_zero_shot")
    hits = dense.search(["turn off the lights", "put on some jazz music"], k=2)
    assert hits[0][0][0] == "turn off the kitchen lights"
    assert hits[1][0][0] == "play some jazz"
    assert -1.0 <= hits[0][1][1] <= hits[0][0][1] <= 1.0 + 1e-5


def _toy_source(tmp_path: Path) -> DownstreamSource:
    mine: list[dict[str, object]] = []
    for k in range(5):
        u = f"user{k}"
        for d in range(2):
            t = k * 5000 + d * 1000
            mine.append(_row(f"{u}-w{d}", u, t, "what's the weather in wilmington"))
            mine.append(_row(f"{u}-j{d}", u, t + 400, "play some jazz"))
    for d in range(4):  # bob's own place, only in his personal history
        mine.append(_row(f"bob-w{d}", "bob", 90000 + d * 1000, "what's the weather in wilkesboro"))
    day2 = 86400 * 2
    held = [
        _row("h-a1", "alice", day2, "what's the weather in wilkerson", FAIL),
        _row("h-a2", "alice", day2 + 15, "what's the weather in wilmington"),
        _row("h-b1", "bob", day2 + 100, "what's the weather in wilkerson"),
        _row("h-u1", "user1", day2 + 200, "play some jazz"),
        _row("h-u2", "user2", day2 + 300, "set a timer for ten minutes"),
        _row("h-u3", "user3", day2 + 400, "what's the weather in wilkerson", FAIL),
    ]
    truth = {
        "h-a1": "what's the weather in wilmington",
        "h-a2": "what's the weather in wilmington",
        "h-b1": "what's the weather in wilkesboro",
        "h-u1": "play some jazz",
        "h-u2": "set a timer for ten minutes",
        "h-u3": "what's the weather in wilmington",
    }
    return DownstreamSource(
        "toy",
        (_write(tmp_path / "mine.jsonl", mine),),
        (_write(tmp_path / "held.jsonl", held),),
        _write(
            tmp_path / "truth.jsonl", [{"turn_id": k, "intended_text": v} for k, v in truth.items()]
        ),
    )


@pytest.mark.slow
def test_evaluate_online_end_to_end(
    settings: Settings, dpr_dir: Path, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    s = settings.model_copy(deep=True)
    s.dpr.artifacts_dir = dpr_dir
    s.rerank.artifacts_dir = tmp_path / "no-ranker"  # heuristic ranker
    s.rerank.trigger_threshold = 0.55  # as in test_online: zero-shot wilkerson→wilmington
    result = evaluate_online([_toy_source(tmp_path)], s, tmp_path / "work")
    (src,) = result.sources
    # wrong held-out turns: a1, u3 (wilmington: in the catalog) and b1 (wilkesboro: bob only)
    assert (src.heldout_turns, src.wrong_turns, src.examples, src.not_in_catalog) == (6, 3, 2, 1)
    systems = {m.system: m for m in src.retrieval}
    assert set(systems) == {"bm25", "symspell", "minilm_zero_shot", FULL_STACK}
    for m in systems.values():
        assert m.n == 2
        for v in (m.recall_at_1, m.recall_at_5, m.mrr, m.found_at_k):
            assert 0.0 <= v <= 1.0
        assert m.recall_at_1 <= m.recall_at_5 <= m.found_at_k
    assert systems["bm25"].recall_at_1 == 1.0
    assert systems[FULL_STACK].recall_at_1 == 1.0
    t = src.trigger
    assert t is not None and t.turns == 6
    assert t.triggered == t.triggered_global + t.triggered_personal
    assert 0 <= t.correct <= t.triggered <= t.turns
    assert t.trigger_rate == pytest.approx(t.triggered / t.turns)
    assert t.triggered + t.precomputed == src.service["rewritten"]
    # alice (no history) gets the global fix; bob and user3 their own successful utterance
    # (user3's history holds wilmington, so the merged candidate is "personal")
    assert (t.triggered_global, t.triggered_personal, t.correct) == (1, 2, 3)
    assert t.triggered_on_correct_turns == 0 and t.precision_at_trigger == 1.0
    assert src.service["turns"] == 6 and src.service["wins"] == 3 and src.service["losses"] == 0
    assert src.stack["ranker"] == "heuristic" and src.stack["encoder_kind"] == "zero-shot"
