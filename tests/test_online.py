"""The online path end to end: nightly job (catalog, personal histories, FAISS index) →
publish → Rewriter with encode → global + personal retrieval → rerank → trigger.

Uses the zero-shot MiniLM DPR artifact (exported once per session into a temp dir) and the
heuristic ranker (no trained ranker there), a real Redis, and a real gRPC server.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from examples import online_test_settings, wilkerson_logs

from offline.job import run_nightly
from rewrite import metrics
from rewrite.config import FULL_PIPELINE, Settings
from rewrite.rewriter import Rewriter
from rewrite.types import RewriteRequest

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
ONLINE = list(FULL_PIPELINE)
FAIL = "Sorry, I didn't understand that."


def _row(
    tid: str, user: str, sec: float, utt: str, response: str = "Here you go.", **kw: str
) -> str:
    ts = (T0 + timedelta(seconds=sec)).isoformat().replace("+00:00", "Z")
    return json.dumps({"turn_id": tid, "user_id": user, "timestamp": ts, "utterance": utt,
                       "response": response, **kw})  # fmt: skip


@pytest.fixture
def online_settings(
    settings: Settings, dpr_dir: Path, tmp_path: Path, clean_redis: redis.Redis
) -> Iterator[Settings]:
    yield online_test_settings(settings, dpr_dir, tmp_path)


def test_global_fix_for_everyone_personal_fix_for_the_user_with_history(
    online_settings: Settings, tmp_path: Path
) -> None:
    s = online_settings
    logs = wilkerson_logs(tmp_path / "day-01.jsonl")
    report = run_nightly([logs], tmp_path / "run", s, publish=True)
    assert report.online is not None and report.online["encoder_kind"] == "zero-shot"
    assert report.publish is not None and report.publish["n_personal_users"] >= 7
    rewriter = Rewriter(s)
    rewriter.warm_up()
    try:
        query = "what's the weather in wilkerson"
        alice = rewriter.rewrite(RewriteRequest(query, user_id="alice", explain=True))
        assert alice.rewritten and alice.source == "global", (alice.reason, alice.candidates)
        assert alice.rewrite == "what's the weather in wilmington"
        assert alice.model_version == report.publish["version"]
        bob = rewriter.rewrite(RewriteRequest(query, user_id="bob", explain=True))
        assert bob.rewritten and bob.source == "personal"
        assert bob.rewrite == "what's the weather in wilkesboro"
        names = {c.text for c in bob.candidates}
        assert "what's the weather in wilmington" in names  # the global layer was there too
        assert all("dense_cosine" in c.features for c in bob.candidates)
        # an utterance that already succeeds for this user is never rewritten
        same = rewriter.rewrite(RewriteRequest("what's the weather in wilkesboro", user_id="bob"))
        assert not same.rewritten and same.reason in {"already_succeeds", "same_as_query"}
        # something unrelated is not forced onto a catalog entry
        other = rewriter.rewrite(RewriteRequest("set a timer for ten minutes", user_id="alice"))
        assert not other.rewritten and other.reason == "below_threshold"
        # a catalog entry succeeds as it is: the catalog gate ends it before any online work
        # (no FAISS search), unless `explain` asks for the candidates
        layer = rewriter.resources.online
        snap = layer.snapshot() if layer is not None else None
        assert snap is not None
        searched: list[int] = []
        real_search = snap.index.search

        def counting_search(*args: Any, **kwargs: Any) -> Any:
            searched.append(1)
            return real_search(*args, **kwargs)

        snap.index.search = counting_search  # type: ignore[method-assign]
        target = "what's the weather in wilmington"
        gated = rewriter.rewrite(RewriteRequest(target.upper(), user_id="carol"))
        assert (gated.rewritten, gated.reason, gated.source) == (False, "succeeds_globally", "none")
        assert gated.rewrite == target.upper() and gated.model_version == report.publish["version"]
        assert searched == [] and gated.candidates == ()
        # decided in `prepare` (the event loop's part): nothing is handed to the online workers
        prepared = rewriter.prepare(RewriteRequest(target, user_id="dave"))
        assert prepared.done and prepared.reason == "succeeds_globally"
        # bob's own fix is no catalog entry, but his cached history holds it: also decided in
        # `prepare` (already_succeeds, no Redis read); alice's history does not hold it
        own = "what's the weather in wilkesboro"
        assert own not in snap.index
        prepared = rewriter.prepare(RewriteRequest(own, user_id="bob"))
        assert prepared.done and prepared.reason == "already_succeeds"
        assert prepared.model_version == report.publish["version"]
        assert not rewriter.prepare(RewriteRequest(own, user_id="alice")).done
        bob_again = rewriter.rewrite(RewriteRequest(own, user_id="bob"))
        assert (bob_again.rewritten, bob_again.reason) == (False, "already_succeeds")
        assert searched == []  # none of them searched FAISS
        explained = rewriter.rewrite(RewriteRequest(target, user_id="carol", explain=True))
        assert (explained.rewritten, explained.reason) == (False, "succeeds_globally")
        assert searched == [1] and target in {c.text for c in explained.candidates}
        not_gated = rewriter.rewrite(RewriteRequest("set a timer for ten minutes", user_id="u"))
        assert not_gated.reason == "below_threshold" and searched == [1, 1]
        # the personal part needs the personal layer in the arm
        global_only = rewriter.prepare(RewriteRequest(own, user_id="bob", arm="global"))
        assert not global_only.done
        # a request the gate lets through carries the cached history it looked at: the
        # personal stage uses it instead of reading the cache again (one hit, same answer)
        hits0 = metrics.PERSONAL_CACHE_HIT._value.get()
        through = rewriter.prepare(RewriteRequest(query, user_id="bob"))
        assert not through.done and through.personal_history is not None
        assert rewriter.finish(rewriter.complete(through)).rewrite == own
        assert metrics.PERSONAL_CACHE_HIT._value.get() - hits0 == 1
        snap.index.search = real_search  # type: ignore[method-assign]
        # experiment arms: bob's own fix needs the personal layer; control rewrites nothing
        by_arm = {
            arm: rewriter.rewrite(RewriteRequest(query, user_id="bob", arm=arm))
            for arm in ("control", "precomputed", "global", "global_personal")
        }
        assert {a: r.arm for a, r in by_arm.items()} == {a: a for a in by_arm}
        assert not by_arm["control"].rewritten and by_arm["control"].reason == "control_arm"
        assert not by_arm["precomputed"].rewritten
        assert by_arm["precomputed"].reason == "arm_without_online_layers"
        assert (by_arm["global"].rewrite, by_arm["global"].source) == (
            "what's the weather in wilmington",
            "global",
        )
        assert (by_arm["global_personal"].rewrite, by_arm["global_personal"].source) == (
            "what's the weather in wilkesboro",
            "personal",
        )
    finally:
        rewriter.close()


def test_device_type_reaches_the_ranker_over_grpc(
    online_settings: Settings, tmp_path: Path
) -> None:
    """The turn logs' ``device_type`` → the catalog's per-entry counts → the published index →
    a gRPC request's ``device_type`` → the ranker's ``device_share`` / ``device_success_rate``
    (seen with ``explain``); a request without one gets the documented "unknown" values."""
    from rewrite.client import RewriteClient
    from rewrite.server import RewriteServer

    s = online_settings
    rows = []
    for k in range(6):  # "wilmington": 8 turns on speakers (all fine), 4 on displays (2 fail)
        for d in range(2):
            device = "speaker" if k < 4 else "display"
            fail = device == "display" and d == 1
            rows.append(
                _row(
                    f"u{k}-w{d}",
                    f"user{k}",
                    k * 5000 + d * 1000,
                    "what's the weather in wilmington",
                    FAIL if fail else "Here you go.",
                    device_type="Speaker" if device == "speaker" else "display",
                )
            )
    logs = tmp_path / "day-01.jsonl"
    logs.write_text("\n".join(rows) + "\n")
    s.catalog.min_success_rate = 0.5
    report = run_nightly([logs], tmp_path / "run", s, publish=True)
    assert report.publish is not None
    query, target = "what's the weather in wilkerson", "what's the weather in wilmington"
    feats = {}
    with (
        RewriteServer(s, host="127.0.0.1", port=0) as srv,
        RewriteClient(srv.target, timeout_s=10.0) as rc,
    ):
        for device in ("display", "SPEAKER", "tv", ""):
            res = rc.rewrite(RewriteRequest(query, "alice", explain=True, device_type=device))
            cand = next(c for c in res.candidates if c.text == target)
            feats[device] = (cand.features["device_share"], cand.features["device_success_rate"])
    rate = 10 / 12  # overall success rate of the entry
    assert feats["display"] == pytest.approx((4 / 12, (2 + 2 * rate) / (4 + 2)), abs=1e-6)
    assert feats["SPEAKER"] == pytest.approx((8 / 12, (8 + 2 * rate) / (8 + 2)), abs=1e-6)
    assert feats["tv"] == pytest.approx((0.0, rate), abs=1e-6)  # never said on a tv
    assert feats[""] == pytest.approx((-1.0, rate), abs=1e-6)  # unknown device type


def test_query_precision_setting_picks_the_query_tower(
    online_settings: Settings, tmp_path: Path
) -> None:
    """``dpr.query_precision``: ``fp32`` serves ``query.onnx`` (the exact vectors), ``int8``
    and ``auto`` (its check passed) ``query.int8.onnx``; both fix alice's utterance, with
    slightly different dense cosines."""
    logs = wilkerson_logs(tmp_path / "day-01.jsonl")
    run_nightly([logs], tmp_path / "run", online_settings, publish=True)
    query = "what's the weather in wilkerson"
    served: dict[str, tuple[str, float]] = {}
    for precision in ("fp32", "int8", "auto"):
        s = online_settings.model_copy(deep=True)
        s.dpr.query_precision = precision
        rewriter = Rewriter(s)
        rewriter.warm_up()
        try:
            res = rewriter.rewrite(RewriteRequest(query, user_id="alice", explain=True))
            layer = rewriter.resources.online
            snap = layer.snapshot() if layer is not None else None
            assert snap is not None
            assert res.rewrite == "what's the weather in wilmington" and res.source == "global"
            top = next(c for c in res.candidates if c.text == res.rewrite)
            served[precision] = (snap.encoder.onnx_path.name, top.features["dense_cosine"])
        finally:
            rewriter.close()
    assert served["fp32"][0] == "query.onnx"
    assert served["int8"][0] == served["auto"][0] == "query.int8.onnx"
    assert served["int8"][1] == served["auto"][1] != served["fp32"][1]
    assert abs(served["int8"][1] - served["fp32"][1]) < 0.05


def test_static_query_tower_serves_the_online_path(
    online_settings: Settings, static_dpr_dir: Path, tmp_path: Path
) -> None:
    """A static query tower (``qrw train dpr --query-static``) distilled from the zero-shot
    one: the job indexes with its (unchanged) passage tower, the service encodes with the
    numpy table, and the example that must work still works. Asking for an int8 query tower
    it does not have refuses the index (pass-through), never an error."""
    from rewrite.encoder import StaticEmbeddingBag

    s = online_settings.model_copy(deep=True)
    s.dpr.artifacts_dir = static_dpr_dir
    s.dpr.threads = 2  # reaches the global index's searches (as it does the query tower)
    logs = wilkerson_logs(tmp_path / "day-01.jsonl")
    report = run_nightly([logs], tmp_path / "run", s, publish=True)
    assert report.online is not None and report.online["encoder_kind"] == "static-query"
    query = "what's the weather in wilkerson"
    rewriter = Rewriter(s)
    rewriter.warm_up()
    try:
        layer = rewriter.resources.online
        snap = layer.snapshot() if layer is not None else None
        assert snap is not None and isinstance(snap.encoder.session, StaticEmbeddingBag)
        assert snap.index.search_threads == 2
        assert snap.encoder.onnx_path.name == "query.static.npy"
        alice = rewriter.rewrite(RewriteRequest(query, user_id="alice", explain=True))
        assert alice.rewritten and alice.source == "global", (alice.reason, alice.candidates)
        assert alice.rewrite == "what's the weather in wilmington"
        bob = rewriter.rewrite(RewriteRequest(query, user_id="bob", explain=True))
        assert (bob.rewrite, bob.source) == ("what's the weather in wilkesboro", "personal")
        other = rewriter.rewrite(RewriteRequest("set a timer for ten minutes", user_id="alice"))
        assert not other.rewritten
    finally:
        rewriter.close()
    s.dpr.query_precision = "int8"
    rewriter = Rewriter(s)
    rewriter.warm_up()
    try:
        layer = rewriter.resources.online
        assert layer is not None and layer.snapshot() is None
        res = rewriter.rewrite(RewriteRequest(query, user_id="alice"))
        assert not res.rewritten and res.reason == "online_unavailable"
    finally:
        rewriter.close()


def test_online_layer_passes_through_without_a_published_index(
    online_settings: Settings, tmp_path: Path
) -> None:
    rewriter = Rewriter(online_settings)
    rewriter.warm_up()
    try:
        res = rewriter.rewrite(RewriteRequest("what's the weather in wilkerson", user_id="a"))
        assert not res.rewritten and res.reason == "online_unavailable"
    finally:
        rewriter.close()


@pytest.mark.parametrize("fault", ["corrupt", "mismatched"])
def test_corrupt_index_of_a_new_version_is_refused_and_the_old_one_kept(
    online_settings: Settings, tmp_path: Path, clean_redis: redis.Redis, fault: str
) -> None:
    """A new active version whose index is corrupt (one flipped byte: checksum mismatch) or
    mismatched (built with another encoder than the version's) is refused and counted; the
    service keeps answering from the complete old snapshot."""
    import shutil

    from rewrite import keyspace
    from rewrite.online import INDEX_ERRORS, OnlineLayer

    s = online_settings
    report = run_nightly([wilkerson_logs(tmp_path / "d.jsonl")], tmp_path / "run", s, publish=True)
    assert report.publish is not None
    good = report.publish["version"]
    meta = clean_redis.hgetall(keyspace.meta_key(good))
    bad_dir = tmp_path / "corrupt-index"
    shutil.copytree(meta["index_dir"], bad_dir)
    if fault == "corrupt":
        blob = bytearray((bad_dir / "index.faiss").read_bytes())
        blob[-1] ^= 0xFF  # one flipped byte: the checksum no longer matches
        (bad_dir / "index.faiss").write_bytes(bytes(blob))
    else:  # the index says another encoder built it than the one the version names
        info = json.loads((bad_dir / "index.json").read_text())
        (bad_dir / "index.json").write_text(json.dumps({**info, "encoder_id": "other-encoder"}))
    rewriter = Rewriter(s)
    rewriter.warm_up()
    try:
        query = RewriteRequest("what's the weather in wilkerson", user_id="alice")
        assert rewriter.rewrite(query).model_version == good
        clean_redis.hset(keyspace.meta_key("v-bad"), mapping={**meta, "index_dir": str(bad_dir)})
        clean_redis.set(keyspace.ACTIVE, "v-bad")
        errors = INDEX_ERRORS._value.get()
        layer = rewriter.resources.online
        assert isinstance(layer, OnlineLayer)
        rewriter.rewrite(query)
        for _ in range(50):  # the pair store caches the active version for up to 1 s
            layer.wait_loaded()
            if INDEX_ERRORS._value.get() > errors:
                break
            rewriter.rewrite(query)
            time.sleep(0.05)
        assert INDEX_ERRORS._value.get() == errors + 1
        res = rewriter.rewrite(query)
        assert res.rewritten and res.model_version == good  # still the complete old snapshot
    finally:
        rewriter.close()


def _answer(res: Any) -> tuple[Any, ...]:
    """What a caller sees of a result (latency aside), scores rounded for float noise."""
    cands = tuple((c.text, c.source, round(c.score, 5)) for c in res.candidates)
    return (res.rewrite, res.rewritten, res.source, res.reason, res.arm, round(res.confidence, 5),
            res.model_version, cands)  # fmt: skip


def _activate(layer: Any, client: redis.Redis, meta: dict[str, str], version: str) -> None:
    """Publish ``meta`` as ``version``, make it active and wait until the online layer has
    tried to load it."""
    from rewrite import keyspace

    client.hset(keyspace.meta_key(version), mapping=meta)
    client.set(keyspace.ACTIVE, version)
    for _ in range(50):  # the pair store caches the active version for up to 1 s
        layer.snapshot()
        layer.wait_loaded()
        if version in layer._tried:
            return
        time.sleep(0.05)
    raise AssertionError(f"{version} never loaded")


@pytest.mark.parametrize("swap", ["overlap", "release_first"])
def test_a_swapped_out_index_returns_its_memory(
    online_settings: Settings,
    tmp_path: Path,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    swap: str,
) -> None:
    """Once the old snapshot of a swap is collected, its freed memory goes back to the OS
    (``return_freed_memory``, once per dropped index, off the request path); with
    ``overlap`` the old snapshot answers while the new index loads; each version's filter of
    users with a history is read before its snapshot serves."""
    import gc

    import rewrite.online as online
    from rewrite import keyspace
    from rewrite.retrieval import GlobalIndex

    s = online_settings.model_copy(deep=True)
    s.service.index_swap = swap  # type: ignore[assignment]
    report = run_nightly([wilkerson_logs(tmp_path / "d.jsonl")], tmp_path / "run", s, publish=True)
    assert report.publish is not None
    good = report.publish["version"]
    meta = clean_redis.hgetall(keyspace.meta_key(good))
    returned = threading.Event()
    monkeypatch.setattr(online, "return_freed_memory", returned.set)
    served_while_loading: list[str | None] = []
    real_load = GlobalIndex.load.__func__  # type: ignore[attr-defined]

    def spying_load(cls: type[GlobalIndex], *a: object, **kw: object) -> object:
        snap = layer._snapshot
        served_while_loading.append(None if snap is None else snap.version)
        return real_load(cls, *a, **kw)

    rewriter = Rewriter(s)
    rewriter.warm_up()
    layer = rewriter.resources.online
    monkeypatch.setattr(GlobalIndex, "load", classmethod(spying_load))
    try:
        # each loaded version's filter of users with a history is read before it serves
        assert layer.personal._filters.get(keyspace.personal_users_key(good)) is not None
        _activate(layer, clean_redis, meta, "v-two")
        assert layer._snapshot is not None and layer._snapshot.version == "v-two"
        # read (none published for it)
        assert keyspace.personal_users_key("v-two") in layer.personal._filters
        assert served_while_loading == [good if swap == "overlap" else None]
        gc.collect()
        assert returned.wait(5.0)
    finally:
        rewriter.close()


def test_release_first_swap_holds_one_index_and_restores_on_failure(
    online_settings: Settings,
    tmp_path: Path,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``service.index_swap: release_first``: the old snapshot is dropped before the new
    index loads (one index resident; the online layer passes through meanwhile); a corrupt
    new folder is refused before anything is dropped; a load that fails after the check
    (e.g. out of memory) brings the old version back."""
    import shutil

    from rewrite import keyspace
    from rewrite.online import INDEX_ERRORS, OnlineLayer
    from rewrite.retrieval import GlobalIndex

    s = online_settings.model_copy(deep=True)
    s.service.index_swap = "release_first"
    report = run_nightly([wilkerson_logs(tmp_path / "d.jsonl")], tmp_path / "run", s, publish=True)
    assert report.publish is not None
    good = report.publish["version"]
    meta = clean_redis.hgetall(keyspace.meta_key(good))
    served_while_loading: list[str | None] = []
    real_load = GlobalIndex.load.__func__  # type: ignore[attr-defined]

    def spying_load(cls: type[GlobalIndex], directory: Path, *a: object, **kw: object) -> object:
        snap = layer._snapshot
        served_while_loading.append(None if snap is None else snap.version)
        if Path(directory).name == "fails-to-load":
            raise MemoryError("simulated: no memory for a second index")
        return real_load(cls, directory, *a, **kw)

    rewriter = Rewriter(s)
    rewriter.warm_up()
    layer = rewriter.resources.online
    assert isinstance(layer, OnlineLayer)
    monkeypatch.setattr(GlobalIndex, "load", classmethod(spying_load))
    query = RewriteRequest("what's the weather in wilkerson", user_id="alice")

    def activate(version: str, index_dir: str) -> None:
        _activate(layer, clean_redis, {**meta, "index_dir": index_dir}, version)

    try:
        assert layer._snapshot is not None and layer._snapshot.version == good
        old_index = layer._snapshot.index
        activate("v-two", meta["index_dir"])  # a new version (same folder)
        assert served_while_loading == [None]  # the old snapshot was gone during the load
        assert layer._snapshot is not None and layer._snapshot.version == "v-two"
        assert layer._snapshot.index is not old_index
        assert rewriter.rewrite(query).rewritten
        # a corrupt folder: refused by the checksum before the snapshot is released
        bad = tmp_path / "corrupt"
        shutil.copytree(meta["index_dir"], bad)
        blob = bytearray((bad / "index.faiss").read_bytes())
        blob[-1] ^= 0xFF
        (bad / "index.faiss").write_bytes(bytes(blob))
        errors = INDEX_ERRORS._value.get()
        activate("v-corrupt", str(bad))
        assert INDEX_ERRORS._value.get() == errors + 1 and len(served_while_loading) == 1
        assert layer._snapshot is not None and layer._snapshot.version == "v-two"
        # a folder that passes the check but fails to load: the old version comes back
        fails = tmp_path / "fails-to-load"
        shutil.copytree(meta["index_dir"], fails)
        activate("v-fails", str(fails))
        assert INDEX_ERRORS._value.get() == errors + 2
        assert served_while_loading[1:] == [None, None]  # released, then the restore's load
        assert layer._snapshot is not None and layer._snapshot.version == "v-two"
        assert rewriter.rewrite(query).rewritten
    finally:
        rewriter.close()


def test_index_swap_lock_makes_a_load_wait_for_the_other_process(
    online_settings: Settings, tmp_path: Path, clean_redis: redis.Redis
) -> None:
    """``service.index_swap_lock``: while another holder (here this test, as another service
    process would) has the lock, a new version's index does not load and the old snapshot
    keeps answering; once it is released the load goes ahead."""
    import fcntl

    from rewrite import keyspace
    from rewrite.online import OnlineLayer

    s = online_settings.model_copy(deep=True)
    s.service.index_swap_lock = tmp_path / "swap.lock"
    report = run_nightly([wilkerson_logs(tmp_path / "d.jsonl")], tmp_path / "run", s, publish=True)
    assert report.publish is not None
    good = report.publish["version"]
    meta = clean_redis.hgetall(keyspace.meta_key(good))
    rewriter = Rewriter(s)
    rewriter.warm_up()  # the first load takes (and releases) the lock too
    layer = rewriter.resources.online
    assert isinstance(layer, OnlineLayer) and layer._snapshot is not None
    assert s.service.index_swap_lock.exists()
    query = RewriteRequest("what's the weather in wilkerson", user_id="alice")
    try:
        with open(s.service.index_swap_lock, "a+b") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX)
            clean_redis.hset(keyspace.meta_key("v-two"), mapping=meta)
            clean_redis.set(keyspace.ACTIVE, "v-two")
            deadline = time.monotonic() + 10
            while "v-two" not in layer._tried:  # the background load has started
                layer.snapshot()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(1.0)
            loading = layer._loading
            assert loading is not None and loading.is_alive()  # waiting for the lock
            assert layer._snapshot is not None and layer._snapshot.version == good
            assert rewriter.rewrite(query).rewritten  # the old version answers meanwhile
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
        layer.wait_loaded()
        assert layer._snapshot is not None and layer._snapshot.version == "v-two"
        assert rewriter.rewrite(query).rewritten
    finally:
        rewriter.close()


def test_a_micro_batch_answers_exactly_as_requests_one_by_one(
    online_settings: Settings, tmp_path: Path
) -> None:
    """``Rewriter.complete_batch`` (one encoder call, one FAISS search, one feature pass and
    one ranker call for the batch) gives every request the answer it gets alone — across
    users with and without a history, arms, context turns, device types and explain; a stage
    that raises on one request fails only that one; and over gRPC with one worker thread,
    concurrent calls are batched and answered as sequential ones."""
    from rewrite import batching
    from rewrite.client import RewriteClient
    from rewrite.online import RerankStage
    from rewrite.pipeline import register_stage
    from rewrite.server import RewriteServer
    from rewrite.types import ContextTurn

    s = online_settings
    logs = wilkerson_logs(tmp_path / "day-01.jsonl")
    report = run_nightly([logs], tmp_path / "run", s, publish=True)
    assert report.publish is not None
    wilkerson = "what's the weather in wilkerson"
    ctx = (ContextTurn("what's the weather in wilmington", seconds_ago=20.0),)
    requests = [
        RewriteRequest(wilkerson, user_id="alice", explain=True),
        RewriteRequest(wilkerson, user_id="bob", explain=True),
        RewriteRequest(wilkerson, user_id="bob", arm="global", explain=True),
        RewriteRequest(wilkerson, user_id="bob", arm="precomputed"),
        RewriteRequest(wilkerson, user_id="carol", arm="control"),
        RewriteRequest(
            "Whats the weather in Wilkerson?",
            user_id="dave",
            context=ctx,
            device_type="speaker",
            explain=True,
        ),
        RewriteRequest("what's the weather in wilkesboro", user_id="bob", explain=True),
        RewriteRequest("set a timer for ten minutes", user_id="alice", explain=True),
        RewriteRequest("play some jazz", user_id="carol"),
        RewriteRequest(wilkerson, user_id="erin", explain=True),  # a repeat: the query cache
    ]
    rewriter = Rewriter(s)
    rewriter.warm_up()
    try:
        alone = [_answer(rewriter.rewrite(r)) for r in requests]
        assert alone[0][:3] == ("what's the weather in wilmington", True, "global")
        assert alone[1][:3] == ("what's the weather in wilkesboro", True, "personal")
        states = [rewriter.prepare(r) for r in requests]
        n_online = sum(not st.done for st in states)
        assert n_online >= 7  # most of them reach the online stages
        batched = [_answer(rewriter.finish(st)) for st in rewriter.complete_batch(states)]
        assert batched == alone
    finally:
        rewriter.close()

    class RerankFailingOnTimers(RerankStage):
        def run_batch(self, states: Any) -> None:
            if any("timer" in st.normalized for st in states):
                raise RuntimeError("boom")
            super().run_batch(states)

    register_stage("rerank_failing_on_timers", RerankFailingOnTimers)
    s2 = s.model_copy(deep=True)
    s2.service.pipeline = [n if n != "rerank" else "rerank_failing_on_timers" for n in ONLINE]
    rewriter = Rewriter(s2)
    rewriter.warm_up()
    try:
        states = rewriter.complete_batch([rewriter.prepare(r) for r in requests])
        failed = [i for i, st in enumerate(states) if st.error is not None]
        assert failed == [7] and isinstance(states[7].error, RuntimeError)
        assert [_answer(rewriter.finish(st)) for i, st in enumerate(states) if i != 7] == [
            a for i, a in enumerate(alone) if i != 7
        ]
        with pytest.raises(RuntimeError, match="boom"):
            rewriter.rewrite(requests[7])
    finally:
        rewriter.close()

    # how many of the requests, sent one after the other to a fresh service, reach the online
    # stages: the catalog gate's `already_succeeds` needs the user's history in the cache
    # already, so this depends on the order (a request is decided early only once an earlier
    # one has read that user's history)
    fresh = Rewriter(s)
    fresh.warm_up()
    try:
        n_online_in_order = 0
        for r in requests:
            st = fresh.prepare(r)
            n_online_in_order += not st.done
            fresh.finish(st if st.done else fresh.complete(st))
    finally:
        fresh.close()
    assert n_online <= n_online_in_order <= n_online + 1

    s3 = s.model_copy(deep=True)
    s3.service.online_threads = 1  # one batch in flight: concurrent calls must queue
    batches_before = batching.BATCH_SIZE.collect()[0].samples
    count0 = next(x.value for x in batches_before if x.name.endswith("_count"))
    sum0 = next(x.value for x in batches_before if x.name.endswith("_sum"))
    many = [requests[i % len(requests)] for i in range(60)]
    inline0 = batching.INLINE._value.get()
    with RewriteServer(s3, host="127.0.0.1", port=0) as srv:
        import concurrent.futures

        with RewriteClient(srv.target, timeout_s=10.0) as rc:
            sequential = [_answer(rc.rewrite(r)) for r in requests]
            # one call at a time: each finds the service idle and runs on the event loop
            assert batching.INLINE._value.get() - inline0 == n_online_in_order
            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                parallel = list(pool.map(lambda r: _answer(rc.rewrite(r)), many))
        assert srv._servicer is not None and srv._servicer.open_calls == 0
    assert sequential == alone
    assert parallel == [alone[i % len(requests)] for i in range(60)]
    samples = batching.BATCH_SIZE.collect()[0].samples
    n_batches = next(x.value for x in samples if x.name.endswith("_count")) - count0
    n_batched = next(x.value for x in samples if x.name.endswith("_sum")) - sum0
    assert n_batched > n_batches  # some micro-batch held more than one request
