"""Reranker features, the LightGBM lambdarank ranker, threshold choice and the trigger decision.

Fast tests check features, trigger rules and the threshold rule on hand-made numbers; the
``slow`` ones train a tiny ranker (a few seconds on 2 cores) on the synthetic task of
:func:`offline.rerank_train.synthetic_task`, where fuzzy similarity, frequency and personal
history decide better than the (nearly entity-blind) dense score.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from offline.cli import app
from offline.rerank_train import (
    CatalogEntry,
    FuzzyCatalogRetriever,
    PersonalEntry,
    RankerTrainConfig,
    RankerTrainResult,
    RankGroup,
    TopChoice,
    choose_threshold,
    cross_fit_ranker,
    folds_by_user,
    group_matrix,
    group_rows,
    read_groups,
    split_by_user,
    synthetic_task,
    take_groups,
    top_choices,
    train_ranker,
    trigger_metrics,
    trigger_rows,
    write_groups,
)
from rewrite.config import RerankSettings
from rewrite.normalize import phonetic_key
from rewrite.rerank import (
    FEATURE_NAMES,
    RANKER_META_FILE,
    RANKER_MODEL_FILE,
    RANKER_ONNX_FILE,
    TRIGGER_MODEL_FILE,
    TRIGGER_ONNX_FILE,
    HeuristicRanker,
    Ranker,
    candidate_features,
    feature_matrix,
    load_ranker,
    trigger,
    trigger_features,
)
from rewrite.retrieval import DeviceTypeStat, RetrievedCandidate
from rewrite.types import ContextTurn

Q = "what's the weather in wilkersen"


def _cands() -> list[RetrievedCandidate]:
    return [
        RetrievedCandidate("what's the weather in wilkerson", "global", 0.81, 120, 0.9, 40),
        RetrievedCandidate(
            "what's the weather in wilkinson", "personal", 0.79, 15, 0.8, 6, 4, 7200.0
        ),
        RetrievedCandidate(Q, "global", 0.99, 2, 0.1, 1),
        RetrievedCandidate("play music by adele", "global", 0.12, 900, 0.95, 300),
        RetrievedCandidate("call tina", "personal", -0.2, 0, 0.0, 0, 1, -1.0),
    ]


# --------------------------------------------------------------------------- features


def test_feature_names_fixed_order() -> None:
    assert FEATURE_NAMES == (
        "token_set_ratio", "partial_ratio", "ratio", "jaro_winkler", "phonetic_ratio",
        "phonetic_equal", "dense_cosine", "log_frequency", "success_rate", "log_n_users",
        "log_personal_count", "has_personal", "personal_log_age_s", "is_personal",
        "len_diff_words", "query_in_context", "context_max_ratio", "identical_to_query",
        "device_share", "device_success_rate",
    )  # fmt: skip


def test_device_features_from_the_catalog_counts_and_the_request_device_type() -> None:
    show = RetrievedCandidate(
        "show me the weather", "global", 0.8, 10, 0.7, 5,
        device_types=(DeviceTypeStat("display", 8, 8), DeviceTypeStat("speaker", 2, 0)),
    )  # fmt: skip
    plain = RetrievedCandidate("what's the weather", "global", 0.8, 10, 0.9, 5)
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}

    def dev(device_type: str) -> list[tuple[float, float]]:
        x = feature_matrix("whats the whether", [show, plain], 0.0, (), device_type)
        return [(float(r[col["device_share"]]), float(r[col["device_success_rate"]])) for r in x]

    # display: 8 of 10 turns, 8 of 8 fine, smoothed with 2 pseudo-turns at the overall 0.7
    assert dev("display")[0] == pytest.approx((0.8, (8 + 2 * 0.7) / (8 + 2)))
    assert dev("speaker")[0] == pytest.approx((0.2, (0 + 2 * 0.7) / (2 + 2)))
    # a device type the entry was never said on: share 0, the overall rate (prior only)
    assert dev("tv")[0] == pytest.approx((0.0, 0.7))
    # unknown request device type, or no device-type data for the entry: -1, overall rate
    assert dev("")[0] == pytest.approx((-1.0, 0.7))
    assert dev("display")[1] == pytest.approx((-1.0, 0.9))


def test_features_finite_in_documented_ranges() -> None:
    ctx = (ContextTurn("Play music by Adele!", "ok", 12.0),)
    x = feature_matrix(Q, _cands(), 1e9, ctx)
    assert x.shape == (5, len(FEATURE_NAMES)) and x.dtype == np.float32
    assert np.isfinite(x).all()
    col = {n: x[:, i] for i, n in enumerate(FEATURE_NAMES)}
    for name in ("token_set_ratio", "partial_ratio", "ratio", "jaro_winkler", "phonetic_ratio",
                 "success_rate", "context_max_ratio"):  # fmt: skip
        assert ((col[name] >= 0) & (col[name] <= 1)).all(), name
    for name in ("phonetic_equal", "has_personal", "is_personal", "query_in_context",
                 "identical_to_query"):  # fmt: skip
        assert set(col[name].tolist()) <= {0.0, 1.0}, name
    assert ((col["dense_cosine"] >= -1) & (col["dense_cosine"] <= 1)).all()
    for name in ("log_frequency", "log_n_users", "log_personal_count"):
        assert (col[name] >= 0).all(), name
    assert (np.abs(col["len_diff_words"]) <= 20).all()
    np.testing.assert_allclose(col["log_frequency"][0], math.log1p(120), rtol=1e-6)
    # personal recency: log1p(age) when known, -1 when unknown / not personal
    np.testing.assert_allclose(col["personal_log_age_s"], [-1, math.log1p(7200), -1, -1, -1],
                               rtol=1e-6)  # fmt: skip
    assert col["has_personal"].tolist() == [0, 1, 0, 0, 1]
    assert col["is_personal"].tolist() == [0, 1, 0, 0, 1]
    assert col["len_diff_words"].tolist() == [0, 0, 0, -1, -3]
    # the context (normalized here) contains a candidate, not the query
    assert col["query_in_context"].tolist() == [0] * 5
    assert col["context_max_ratio"][3] == 1.0 and col["context_max_ratio"][0] < 1.0
    assert feature_matrix(Q, [], 0.0).shape == (0, len(FEATURE_NAMES))


def test_identical_and_phonetic_flags() -> None:
    feats = [candidate_features(Q, c, 0.0) for c in _cands()]
    assert [f["identical_to_query"] for f in feats] == [0, 0, 1, 0, 0]
    assert feats[2]["ratio"] == 1.0 and feats[2]["phonetic_equal"] == 1.0
    # "wilkersen" sounds like "wilkerson" (same Metaphone code), not like "wilkinson"
    assert phonetic_key("wilkersen") == phonetic_key("wilkerson") != phonetic_key("wilkinson")
    assert feats[0]["phonetic_equal"] == 1.0 and feats[1]["phonetic_equal"] == 0.0
    assert feats[0]["phonetic_ratio"] > feats[1]["phonetic_ratio"]


def test_candidate_features_match_matrix_row_and_order() -> None:
    ctx = (ContextTurn("What's the weather in Wilkersen?"),)
    x = feature_matrix(Q, _cands(), 0.0, ctx)
    for i, c in enumerate(_cands()):
        f = candidate_features(Q, c, 0.0, ctx)
        assert list(f) == list(FEATURE_NAMES)
        np.testing.assert_array_equal(np.array(list(f.values()), dtype=np.float32), x[i])
    assert x[:, FEATURE_NAMES.index("query_in_context")].tolist() == [1.0] * 5


def test_bad_metadata_stays_finite() -> None:
    c = RetrievedCandidate("call tina", "global", float("nan"), -3, float("inf"), -1)
    assert np.isfinite(feature_matrix("call dina", [c], 0.0)).all()


# --------------------------------------------------------------------------- trigger


@pytest.mark.parametrize(
    ("best_text", "score", "success", "expected"),
    [
        (None, 9.0, 0, (False, "no_candidates")),
        ("call tina", 9.0, 1, (False, "already_succeeds")),
        ("call tina", 9.0, 7, (False, "already_succeeds")),
        ("call dina", 9.0, 0, (False, "same_as_query")),
        ("call tina", 0.49, 0, (False, "below_threshold")),
        ("call tina", float("nan"), 0, (False, "below_threshold")),
        ("call tina", 0.5, 0, (True, "triggered")),
    ],
)
def test_trigger_reasons(
    best_text: str | None, score: float, success: int, expected: tuple[bool, str]
) -> None:
    d = trigger("call dina", best_text, score, 0.5, success)
    assert (d.rewrite, d.reason) == expected
    # a query that is itself a global catalog entry (it succeeds for many users) is kept
    g = trigger("call dina", best_text, score, 0.5, success, query_in_catalog=True)
    if expected[1] in ("triggered", "below_threshold", "same_as_query"):
        assert (g.rewrite, g.reason) == (False, "succeeds_globally")
    else:
        assert (g.rewrite, g.reason) == expected


@pytest.mark.parametrize("count", [1, 2, 100])
@pytest.mark.parametrize("score", [0.0, 1e6, float("inf")])
def test_query_that_succeeds_for_user_is_never_rewritten(count: int, score: float) -> None:
    assert not trigger("call dina", "call tina", score, -1e9, count).rewrite
    # a stricter catalog.personal_min_count lets a single success through
    assert trigger("call dina", "call tina", 1e6, 0.0, 1, min_success_count=2).rewrite


# --------------------------------------------------------------------------- threshold rule


def _tc(scores: list[float], correct: list[bool], eligible: list[bool] | None = None) -> TopChoice:
    n = len(scores)
    return TopChoice(
        np.array(scores, dtype=np.float64),
        np.array(correct),
        np.array(eligible if eligible is not None else [True] * n),
        np.where(np.array(correct), 1, 2),
    )


def test_choose_threshold_lowest_with_precision() -> None:
    # cumulative precision from the top: 1, 1, 1, .75, .8, .667 → lowest ok threshold is 3
    tc = _tc([5, 4, 3, 2, 1, 0], [True, True, True, False, True, False])
    thr, met = choose_threshold(tc, 0.75)
    assert met and thr == 1.0
    thr, met = choose_threshold(tc, 0.9)
    assert met and thr == 3.0
    m = trigger_metrics(tc, thr)
    assert m["precision_at_trigger"] == 1.0 and m["trigger_rate"] == 0.5
    # tied scores trigger together: a threshold inside a tie is not reachable
    thr, met = choose_threshold(_tc([5, 4, 4, 1], [True, True, False, True]), 0.9)
    assert met and thr == 5.0
    # nothing reaches the target → above every score, nothing triggers
    # too few dev triggers: precision on 2 groups is chance, not met
    assert choose_threshold(_tc([5, 4, 3], [True, True, True]), 0.9, min_triggers=4)[1] is False
    assert choose_threshold(_tc([5, 4, 3], [True, True, True]), 0.9, min_triggers=3) == (3.0, True)
    thr, met = choose_threshold(_tc([3, 2], [False, True]), 0.9)
    assert (
        not met and thr > 3 and trigger_metrics(_tc([3, 2], [False, True]), thr)["triggered"] == 0
    )
    # top == query (not eligible) never counts as a trigger
    tc = _tc([9, 1], [True, True], eligible=[False, True])
    assert trigger_metrics(tc, 0.0)["triggered"] == 1


def test_missing_correct_candidate_counts_as_wrong_trigger() -> None:
    g = RankGroup("call dina", "u1", "call gina", [RetrievedCandidate("call tina", "global", 0.9)])
    gm = group_matrix([g])
    tc = top_choices([g], np.array([2.0]), gm.offsets)
    assert tc.eligible[0] and not tc.correct[0] and tc.rank[0] == 0
    assert trigger_metrics(tc, 1.0)["precision_at_trigger"] == 0.0


def test_split_by_user_is_disjoint_and_groups_roundtrip(tmp_path: Path) -> None:
    groups, _ = synthetic_task(n_users=30, queries_per_user=3, seed=3)
    splits = split_by_user(groups, 0.2, 0.2, seed=1)
    users = {k: {g.user for g in v} for k, v in splits.items()}
    assert all(users.values())
    assert not (users["train"] & users["dev"] or users["train"] & users["test"]
                or users["dev"] & users["test"])  # fmt: skip
    assert sum(len(v) for v in splits.values()) == len(groups)
    g0 = replace(groups[0], context=(ContextTurn("call tina", "ok", 3.0, True),))
    write_groups([g0, *groups[1:]], tmp_path / "g.parquet")
    back = read_groups(tmp_path / "g.parquet")
    assert back[0] == g0 and back[1:] == groups[1:]


def test_folds_by_user_deal_users_round_robin() -> None:
    groups, _ = synthetic_task(n_users=23, queries_per_user=3, seed=3)
    fold = folds_by_user(groups, 5, seed=1)
    assert fold.shape == (len(groups),) and set(fold.tolist()) == set(range(5))
    folds_of_user: dict[str, set[int]] = {}
    for g, f in zip(groups, fold.tolist(), strict=True):
        folds_of_user.setdefault(g.user, set()).add(f)
    assert all(len(fs) == 1 for fs in folds_of_user.values())  # no user in two folds
    users_per_fold = np.bincount([next(iter(fs)) for fs in folds_of_user.values()])
    assert users_per_fold.max() - users_per_fold.min() <= 1  # 23 users: 5, 5, 5, 4, 4
    assert np.array_equal(fold, folds_by_user(groups, 5, seed=1))
    assert not np.array_equal(fold, folds_by_user(groups, 5, seed=2))
    with pytest.raises(ValueError, match="2 folds"):
        folds_by_user(groups, 1, seed=1)


def test_take_groups_keeps_each_groups_rows() -> None:
    groups, _ = synthetic_task(n_users=4, queries_per_user=2, seed=5)
    gm = group_matrix(groups)
    idx = np.array([3, 0, 5])
    sub = take_groups(gm, idx)
    assert np.array_equal(sub.sizes(), gm.sizes()[idx])
    for j, g in enumerate(idx.tolist()):
        lo, hi = int(gm.offsets[g]), int(gm.offsets[g + 1])
        np.testing.assert_array_equal(sub.x[sub.offsets[j] : sub.offsets[j + 1]], gm.x[lo:hi])
        np.testing.assert_array_equal(sub.y[sub.offsets[j] : sub.offsets[j + 1]], gm.y[lo:hi])
    np.testing.assert_array_equal(group_rows(gm, idx), np.r_[
        np.arange(gm.offsets[3], gm.offsets[4]), np.arange(gm.offsets[0], gm.offsets[1]),
        np.arange(gm.offsets[5], gm.offsets[6])])  # fmt: skip
    assert len(take_groups(gm, np.zeros(0, dtype=np.int64)).x) == 0


@pytest.mark.slow
def test_cross_fit_scores_each_fold_with_a_model_that_never_saw_it() -> None:
    """Out-of-fold scores of a fold equal those of a model trained on the other folds alone,
    for the chosen number of rounds, and differ from the in-sample scores of a model that
    did see the fold."""
    import lightgbm as lgb

    from offline.rerank_train import _dataset

    groups, _ = synthetic_task(n_users=60, queries_per_user=6, seed=4)
    gm = group_matrix(groups)
    fold = folds_by_user(groups, 3, seed=0)
    config = replace(RankerTrainConfig(), num_boost_round=60, num_threads=1)
    cf = cross_fit_ranker(gm, fold, config)
    assert 1 <= cf.rounds <= 60 and len(cf.curve) == 60 and len(cf.fold_best) == 3
    # one-standard-error rule: the fewest rounds within one SE of the best mean
    assert cf.se > 0 and cf.curve[cf.rounds - 1] >= max(cf.curve) - cf.se
    assert all(v < max(cf.curve) - cf.se for v in cf.curve[: cf.rounds - 1])
    held = np.nonzero(fold == 1)[0]
    rows = group_rows(gm, held)
    ds = _dataset(take_groups(gm, np.nonzero(fold != 1)[0]))
    assert ds is not None
    alone = lgb.train(config.params(), ds, num_boost_round=cf.rounds)
    np.testing.assert_allclose(cf.oof[rows], alone.predict(gm.x[rows]), rtol=1e-9, atol=1e-12)
    full = _dataset(gm)
    assert full is not None
    seen = lgb.train(config.params(), full, num_boost_round=cf.rounds).predict(gm.x[rows])
    assert np.abs(seen - cf.oof[rows]).max() > 1e-3


def test_fuzzy_retriever_merges_personal_layer() -> None:
    cat = [CatalogEntry("call tina", 50, 0.9, 10), CatalogEntry("call dina", 5, 0.8, 2)]
    gen = FuzzyCatalogRetriever(cat, {"u1": [PersonalEntry("call dina", 3, 60.0)]}, top_k=5)
    by = {c.text: c for c in gen("call gina", "u1")}
    assert by["call dina"].layer == "personal" and by["call dina"].personal_count == 3
    assert by["call dina"].frequency == 5  # global metadata kept
    assert by["call tina"].layer == "global"
    assert all(c.layer == "global" for c in gen("call gina", "u2"))


def test_fuzzy_retriever_gives_history_entries_their_catalog_metadata() -> None:
    """As in the service (:func:`rewrite.online.merge_personal`): a history entry the global
    top-k missed still carries its catalog metadata (training features = serving features);
    one outside the catalog carries none, and an unknown age stays -1."""
    cat = [CatalogEntry("call tina", 50, 0.9, 10), CatalogEntry("play jazz", 7, 0.6, 3)]
    personal = {"u1": [PersonalEntry("play jazz", 2, 30.0)], "u2": [PersonalEntry("call mina", 1)]}
    gen = FuzzyCatalogRetriever(cat, personal, top_k=1)
    by = {c.text: c for c in gen("call gina", "u1")}
    assert by["call tina"].layer == "global"
    jazz = by["play jazz"]
    assert jazz.layer == "personal" and (jazz.frequency, jazz.n_users) == (7, 3)
    assert jazz.success_rate == 0.6 and jazz.personal_age_s == 30.0
    mina = {c.text: c for c in gen("call gina", "u2")}["call mina"]
    assert mina.frequency == 0 and mina.personal_count == 1 and mina.personal_age_s == -1.0


# --------------------------------------------------------------------------- fallback, loading


def test_heuristic_ranker_and_fallback(tmp_path: Path) -> None:
    h = HeuristicRanker(0.7)
    s = h.score(Q, _cands(), 0.0)
    x = feature_matrix(Q, _cands(), 0.0)
    np.testing.assert_allclose(s, 0.6 * x[:, 6] + 0.4 * x[:, 2] + 0.1 * x[:, 11], rtol=1e-6)
    settings = RerankSettings(artifacts_dir=tmp_path / "none", heuristic_threshold=0.66)
    r = load_ranker(settings)
    assert isinstance(r, HeuristicRanker) and r.trigger_threshold == 0.66
    r = load_ranker(settings.model_copy(update={"trigger_threshold": 0.5}))
    assert r.trigger_threshold == 0.5
    with pytest.raises(FileNotFoundError):  # an explicit artifact is never silently replaced
        load_ranker(settings.model_copy(update={"artifact": tmp_path / "missing"}))


# --------------------------------------------------------------------------- trained ranker


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> RankerTrainResult:
    groups, _ = synthetic_task(n_users=200, queries_per_user=8, seed=0)
    out = tmp_path_factory.mktemp("ranker")
    return train_ranker(groups, out, RankerTrainConfig(), heuristic_threshold=0.8)


@pytest.mark.slow
def test_trained_ranker_beats_dense_order(trained: RankerTrainResult) -> None:
    m = trained.meta["metrics"]
    for split in ("oof", "test"):
        ranker, dense, heur = m[split]["ranker"], m[split]["dense"], m[split]["heuristic"]
        assert m[split]["groups"] >= 200
        assert ranker["recall@1"] >= 0.75, (split, ranker)
        assert ranker["recall@1"] >= dense["recall@1"] + 0.25, (split, ranker, dense)
        assert ranker["recall@1"] > heur["recall@1"] and ranker["mrr"] > dense["mrr"]
    # frequency and fuzzy similarity carry the model, not the dense score
    gain = trained.meta["feature_importance_gain"]
    assert gain["log_frequency"] > gain["dense_cosine"]
    assert max(gain, key=gain.__getitem__) in {"ratio", "token_set_ratio", "jaro_winkler"}


@pytest.mark.slow
def test_trigger_model_precision_on_held_out_users(trained: RankerTrainResult) -> None:
    meta = trained.meta
    assert meta["threshold_met"] and meta["target_precision"] == 0.9
    assert meta["trigger_model"] and meta["trigger_model"]["file"] == "trigger.txt"
    ranker = Ranker.load(trained.artifact)
    assert ranker.trigger_scorer is not None and ranker.backend == "onnxruntime"
    assert ranker.trigger_threshold == meta["trigger_threshold"]
    assert 0.0 < ranker.trigger_threshold < 1.0  # a probability now, not a lambdarank score
    # the threshold was chosen on out-of-fold probabilities for precision >= 0.9
    assert meta["metrics"]["oof"]["ranker"]["precision_at_trigger"] >= 0.9
    test = trained.splits["test"]
    decisions = []
    for g in test:  # recompute with the online API: score → sort → decision_score → trigger()
        x = feature_matrix(g.query, g.candidates, g.now_s, g.context, g.device_type)
        s = ranker.score_matrix(x)
        if not len(s):
            decisions.append((False, False))
            continue
        order = np.argsort(-s, kind="stable")
        best = g.candidates[int(order[0])]
        p = ranker.decision_score(x[order[0]], s[order])
        assert 0.0 <= p <= 1.0
        known = any(c.text == g.query for c in g.candidates)  # a catalog/history entry
        d = trigger(g.query, best.text, p, ranker.trigger_threshold, 0, query_in_catalog=known)
        decisions.append((d.rewrite, g.is_correct(best.text)))
    triggered = [ok for rewrite, ok in decisions if rewrite]
    assert meta["metrics"]["test"]["ranker"]["triggered"] == len(triggered)
    assert len(triggered) / len(test) >= 0.2
    assert sum(triggered) / len(triggered) >= 0.8
    # the heuristic baseline on the same held-out users is less precise
    assert meta["metrics"]["test"]["heuristic"]["precision_at_trigger"] < sum(triggered) / len(
        triggered
    )
    assert ranker.confidence(0.7) == 0.7 and ranker.confidence(1.5) == 1.0


@pytest.mark.slow
def test_save_load_identical_scores_and_deterministic(
    trained: RankerTrainResult, tmp_path: Path
) -> None:
    ranker = Ranker.load(trained.artifact)
    assert ranker.model_version == trained.artifact.name == trained.meta["content_hash"]
    assert (trained.artifact.parent / "LATEST").read_text().strip() == trained.artifact.name
    gm = group_matrix(trained.splits["test"])
    assert trained.booster is not None
    # the service runs the ONNX export; LightGBM (the training runtime) is the reference
    assert ranker.backend == "onnxruntime"
    onnx_scores, lgb_scores = ranker.score_matrix(gm.x), trained.booster.predict(gm.x)
    assert np.max(np.abs(onnx_scores - lgb_scores)) <= 1e-4
    assert trained.meta["onnx"]["ranker_max_abs_diff"] <= 1e-4
    for lo, hi in zip(gm.offsets[:-1], gm.offsets[1:], strict=True):  # same top choice
        if hi > lo:
            assert np.argmax(onnx_scores[lo:hi]) == np.argmax(lgb_scores[lo:hi])
    reference = Ranker.load(trained.artifact, backend="lightgbm")
    np.testing.assert_array_equal(reference.score_matrix(gm.x), lgb_scores)
    assert reference.trigger_scorer is not None
    rows = trigger_rows(trained.splits["test"], gm, lgb_scores)
    assert ranker.trigger_scorer is not None
    np.testing.assert_allclose(
        ranker.trigger_scorer.predict(rows), reference.trigger_scorer.predict(rows), atol=1e-5
    )
    via_settings = load_ranker(RerankSettings(artifacts_dir=trained.artifact.parent))
    assert isinstance(via_settings, Ranker)
    assert via_settings.model_version == ranker.model_version
    # same data + config → same model file and content hash
    groups = [g for split in trained.splits.values() for g in split]
    again = train_ranker(groups, tmp_path, RankerTrainConfig(), update_latest=False)
    assert again.meta["content_hash"] == trained.meta["content_hash"]
    assert (again.artifact / RANKER_MODEL_FILE).read_bytes() == (
        trained.artifact / RANKER_MODEL_FILE
    ).read_bytes()
    assert not (tmp_path / "LATEST").exists()


@pytest.mark.slow
def test_load_refuses_corrupt_or_foreign_model(trained: RankerTrainResult, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    model = (trained.artifact / RANKER_MODEL_FILE).read_text()
    (bad / RANKER_MODEL_FILE).write_text(model.replace("learning_rate", "learning_rat3", 1))
    (bad / RANKER_META_FILE).write_text((trained.artifact / RANKER_META_FILE).read_text())
    with pytest.raises(ValueError, match="sha256"):
        Ranker.load(bad)
    meta = json.loads((trained.artifact / RANKER_META_FILE).read_text())
    meta["feature_names"] = meta["feature_names"][::-1]
    (bad / RANKER_MODEL_FILE).write_text(model)
    (bad / RANKER_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not in this code's order"):
        Ranker.load(bad)
    meta["feature_names"] = ["no_such_feature", *meta["feature_names"][1:]]
    (bad / RANKER_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"no_such_feature.*unknown to this code"):
        Ranker.load(bad)
    # a tampered trigger model is refused too
    (bad / RANKER_META_FILE).write_text((trained.artifact / RANKER_META_FILE).read_text())
    trig = (trained.artifact / TRIGGER_MODEL_FILE).read_text()
    (bad / TRIGGER_MODEL_FILE).write_text(trig.replace("sigmoid", "sigmoix", 1))
    with pytest.raises(ValueError, match=r"trigger\.txt: sha256"):
        Ranker.load(bad)
    (bad / TRIGGER_MODEL_FILE).write_text(trig)
    with pytest.raises(FileNotFoundError):  # the ONNX export is missing from `bad`
        Ranker.load(bad)
    for name in (RANKER_ONNX_FILE, TRIGGER_ONNX_FILE):
        (bad / name).write_bytes((trained.artifact / name).read_bytes())
    assert Ranker.load(bad).trigger_scorer is not None
    onnx = (trained.artifact / RANKER_ONNX_FILE).read_bytes()
    (bad / RANKER_ONNX_FILE).write_bytes(onnx[:-8] + bytes(8))
    with pytest.raises(ValueError, match=r"ranker\.onnx: sha256"):
        Ranker.load(bad)
    # an artifact trained before the export (no "onnx" in its meta) still loads, on LightGBM
    meta = json.loads((trained.artifact / RANKER_META_FILE).read_text())
    del meta["onnx"]
    (bad / RANKER_META_FILE).write_text(json.dumps(meta))
    legacy = Ranker.load(bad)
    assert legacy.backend == "lightgbm" and legacy.trigger_scorer is not None
    with pytest.raises(FileNotFoundError, match="no ONNX export"):
        Ranker.load(bad, backend="onnxruntime")


def test_a_model_trained_before_the_device_features_is_served_on_its_columns(
    tmp_path: Path,
) -> None:
    """An artifact whose ``feature_names`` are the 18 features before ``device_share`` /
    ``device_success_rate`` loads (logged) and scores the columns it knows; its trigger model
    likewise. Same scores as LightGBM on those columns."""
    import lightgbm as lgb

    old = [n for n in FEATURE_NAMES if not n.startswith("device_")]
    old_trig = [*(f"top1_{n}" for n in old), "top1_score", "score_margin"]
    rng = np.random.default_rng(0)
    x = rng.random((400, len(FEATURE_NAMES))).astype(np.float32)
    keep = [FEATURE_NAMES.index(n) for n in old]
    y = (x[:, FEATURE_NAMES.index("ratio")] > 0.5).astype(np.float32)
    params = {"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    booster = lgb.train(params, lgb.Dataset(x[:, keep], y), num_boost_round=5)
    tparams = {**params, "objective": "binary"}
    xt = rng.random((400, len(old_trig))).astype(np.float32)
    tbooster = lgb.train(tparams, lgb.Dataset(xt, xt[:, 2] > 0.5), num_boost_round=5)
    d = tmp_path / "old"
    d.mkdir()
    (d / RANKER_MODEL_FILE).write_text(booster.model_to_string())
    (d / TRIGGER_MODEL_FILE).write_text(tbooster.model_to_string())
    meta = {"content_hash": "old", "feature_names": old, "trigger_threshold": 0.5,
            "trigger_model": {"feature_names": old_trig}}  # fmt: skip
    (d / RANKER_META_FILE).write_text(json.dumps(meta))
    ranker = Ranker.load(d)
    assert ranker.backend == "lightgbm" and ranker.feature_names == tuple(old)
    np.testing.assert_allclose(ranker.score_matrix(x), booster.predict(x[:, keep]), rtol=1e-6)
    scores = np.array([0.9, 0.2])
    full = trigger_features(x[0], scores)[0]
    t_keep = [
        i for i, n in enumerate((*(f"top1_{n}" for n in FEATURE_NAMES), "top1_score",
                                 "score_margin")) if n in old_trig
    ]  # fmt: skip
    assert ranker.decision_score(x[0], scores) == pytest.approx(
        float(tbooster.predict(full[None, t_keep])[0])
    )


@pytest.mark.slow
def test_device_type_decides_where_the_catalog_says_it_matters(
    trained: RankerTrainResult,
) -> None:
    """The synthetic task's display users mean "austin" where speaker users mean "boston"
    (a slot family split by device type): for a slot word misheard as a third value the
    trained ranker picks by the request's device type, and the device features carry gain."""
    gain = trained.meta["feature_importance_gain"]
    assert gain["device_share"] + gain["device_success_rate"] > 0
    ranker = Ranker.load(trained.artifact)
    _, retriever = synthetic_task(n_users=10, queries_per_user=1, seed=0)
    query = "what's the weather in houston"  # heard a third value of the family
    cands = retriever(query, "nobody")
    texts = [c.text for c in cands]
    assert {"what's the weather in boston", "what's the weather in austin"} <= set(texts)
    picks = {}
    for device in ("speaker", "display"):
        s = ranker.score(query, cands, 0.0, (), device)
        top = {t: v for t, v in zip(texts, s, strict=True)}
        picks[device] = top["what's the weather in austin"] - top["what's the weather in boston"]
    # austin gains on boston for a display user, by a clear margin
    assert picks["display"] > picks["speaker"] + 0.5, picks


@pytest.mark.slow
def test_personal_history_wins_for_its_user_only(trained: RankerTrainResult) -> None:
    ranker = Ranker.load(trained.artifact)
    glob = {
        v: RetrievedCandidate(f"what's the weather in {v}", "global", 0.8, f, 0.9, f // 4)
        for v, f in (("wilkerson", 200), ("wilkinson", 50), ("wilson", 22), ("wilkes", 12))
    }
    query = "what's the weather in wilkirson"  # one letter from wilkerson and wilkinson
    mine = replace(glob["wilkinson"], layer="personal", personal_count=6, personal_age_s=86400.0)
    for cands, expected in (
        (list(glob.values()), "wilkerson"),  # no history: the global fix
        ([glob["wilkerson"], mine, glob["wilson"], glob["wilkes"]], "wilkinson"),
    ):
        s = ranker.score(query, cands, 0.0)
        assert cands[int(np.argmax(s))].text.endswith(expected), (expected, s)


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_train_ranker_from_groups_and_run(tmp_path: Path) -> None:
    groups, retriever = synthetic_task(n_users=120, queries_per_user=6, seed=5)
    write_groups(groups, tmp_path / "groups.parquet")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "ranker", "--data", str(tmp_path / "groups.parquet"),
                              "--out", str(tmp_path / "a")])  # fmt: skip
    assert res.exit_code == 0, res.output
    name = (tmp_path / "a" / "LATEST").read_text().strip()
    assert Ranker.load(tmp_path / "a" / name).meta["source"].startswith("data:")

    run = tmp_path / "run"
    run.mkdir()
    pairs = sorted({(g.query, g.correct) for g in groups if g.query != g.correct})
    pq.write_table(pa.Table.from_pylist([
        {"source": s, "rewrite": r, "absorption_probability": 0.9, "support": 3, "n_users": 2}
        for s, r in pairs]), run / "pairs.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist([asdict(c) for c in retriever.catalog]),
                   run / "catalog.parquet")  # fmt: skip
    res = runner.invoke(app, ["train", "ranker", "--run", str(run), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "LATEST").exists()
    res = runner.invoke(app, ["train", "ranker", "--out", str(tmp_path / "c")])
    assert res.exit_code != 0


def test_examples_from_rephrases_acceptable_rewrites_and_negatives(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from offline.catalog import CatalogEntry, PersonalEntry, write_catalog, write_personal
    from offline.job import REPHRASES_SCHEMA
    from offline.rerank_train import examples_from_rephrases

    cat = ["play jazz music", "play some jazz", "call mom"]
    write_catalog(
        [CatalogEntry(t, 5, 3, 1.0, "", "", 0.0) for t in cat], tmp_path / "catalog.parquet"
    )
    links = [("play jas", "play jazz music", "u1"), ("play jas", "play some jazz", "u2"),
             ("play jas", "play jas", "u3"), ("cal mom", "not in catalog", "u4")]  # fmt: skip
    rows = [{"earlier_turn_id": f"e{i}", "later_turn_id": f"l{i}", "earlier": a, "later": b,
             "score": 1.0, "user": u, "ts": 10.0, "device_type": ("speaker", "tv")[i % 2]}
            for i, (a, b, u) in enumerate(links)]  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist(rows, schema=REPHRASES_SCHEMA), tmp_path / "rephrases.parquet"
    )
    fine = ["turn on the lights", "what time is it", "stop", "play jas", "call mom"]
    write_personal([PersonalEntry("u9", t, 2, 5.0) for t in fine], tmp_path / "personal.parquet")
    ex = examples_from_rephrases(tmp_path, negatives_per_positive=1.0, seed=3)
    pos = [e for e in ex if e.query != e.rewrite]
    assert {(e.user, e.rewrite, e.also_correct) for e in pos} == {
        ("u1", "play jazz music", ("play some jazz",)),
        ("u2", "play some jazz", ("play jazz music",)),
    }
    neg = [e for e in ex if e.query == e.rewrite]
    # never a catalog entry or a rephrased text; as many as positives
    assert len(neg) == 2 and {e.query for e in neg} <= {
        "turn on the lights",
        "what time is it",
        "stop",
    }
    # the query turn's device type; negatives draw theirs from the positives' (never all
    # "unknown": that made "device type known" a label the trigger model learnt)
    assert {e.user: e.device_type for e in pos} == {"u1": "speaker", "u2": "tv"}
    assert all(e.device_type in {"speaker", "tv"} for e in neg)
    g = RankGroup("play jas", "u1", "play jazz music", [], also_correct=("play some jazz",))
    assert g.is_correct("play some jazz") and g.is_correct("play jazz music")
    assert not g.is_correct("call mom")


def test_onnx_export_keeps_every_split_of_float32_inputs() -> None:
    """LightGBM splits at double midpoints between training values; ONNX TreeEnsemble holds
    float32 thresholds. Rounded to nearest, a 500-tree model on 20,000 random rows moved one
    row's split (score off by 0.048); rounded down, every float32 input takes the same branch,
    so the export matches LightGBM up to float32 sums of the leaves."""
    import re

    import lightgbm as lgb

    from offline.rerank_train import _float32_thresholds, export_trees_onnx
    from rewrite.rerank import OnnxTreeScorer

    rng = np.random.default_rng(0)
    x = rng.random((20_000, len(FEATURE_NAMES))).astype(np.float32)
    utility = (x[:, 6] + 0.5 * x[:, 2] + 0.1 * rng.standard_normal(len(x))).reshape(1000, 20)
    y = np.zeros_like(utility)
    y[np.arange(1000), utility.argmax(axis=1)] = 1.0
    params = {**RankerTrainConfig().params(), "num_threads": 1}
    ds = lgb.Dataset(x, label=y.reshape(-1), group=[20] * 1000, params={"verbosity": -1})
    booster = lgb.train(params, ds, num_boost_round=500)
    model = booster.model_to_string()
    rounded = _float32_thresholds(model)
    thresholds = [
        float(v) for line in re.findall(r"^threshold=(.*)$", rounded, re.M) for v in line.split()
    ]
    assert thresholds and all(float(np.float32(t)) == t for t in thresholds)
    np.testing.assert_array_equal(lgb.Booster(model_str=rounded).predict(x), booster.predict(x))
    data, diff = export_trees_onnx(model, x)
    assert diff <= 1e-4
    onnx_scores = OnnxTreeScorer(data).predict(x)
    assert np.max(np.abs(onnx_scores - booster.predict(x))) == pytest.approx(diff)
    # the binary trigger model keeps its probability output
    bin_booster = lgb.train(
        {"objective": "binary", "verbosity": -1, "num_threads": 1},
        lgb.Dataset(x, label=y.reshape(-1), params={"verbosity": -1}),
        num_boost_round=50,
    )
    bdata, bdiff = export_trees_onnx(bin_booster.model_to_string(), x)
    probs = OnnxTreeScorer(bdata, "probability").predict(x[:100])
    assert bdiff <= 1e-4 and np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs, bin_booster.predict(x[:100]), atol=1e-5)
