"""Personal layer: pseudonymization, publishing personal histories, PersonalStore on real Redis."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis
from redisstats import command_calls

from offline.catalog import PersonalEntry
from offline.job import run_nightly
from offline.markov import RewritePair
from offline.publish import connect, content_hash, publish_pairs, version_content_hash
from rewrite import keyspace, privacy
from rewrite.config import DEV_USER_KEY, Settings, load_settings
from rewrite.personal import (
    PACKED_FIELD,
    PersonalStore,
    fp16_scorer,
    pack_history,
    unpack_history,
)
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.store import MembershipFilter, StoreUnavailableError

KEY = b"personal-test-key"
DIM = 8
PAIRS = [RewritePair("whats the whether", "what's the weather", 0.9, 3, 2)]


def _encode(texts: Sequence[str]) -> np.ndarray:
    """Deterministic stand-in for the passage encoder: (n, DIM) float32, L2-normalised."""
    rows = []
    for t in texts:
        seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
        rows.append(np.random.default_rng(seed).standard_normal(DIM))
    vecs = np.asarray(rows, dtype=np.float32).reshape(len(texts), DIM)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _history(user: str, items: list[tuple[str, int, float]]) -> list[PersonalEntry]:
    p = pseudonymize(user, KEY)
    return [PersonalEntry(p, text, count, ts) for text, count, ts in items]


ALICE = _history(
    "alice",
    [
        ("what's the weather in wilkerson", 5, 1.7e9),
        ("call mom", 2, 1.6e9),
        ("play jazz", 2, 1.65e9),
    ],
)
BOB = _history("bob", [("what's the weather in wilkinson", 3, 1.7e9)])


def _store(url: str, **kw: float) -> PersonalStore:
    return PersonalStore(url, KEY, version_cache_s=0.0, **kw)


def test_pseudonymize_is_keyed_hmac_hex32() -> None:
    p = pseudonymize("alice", KEY)
    assert len(p) == 32 and all(c in "0123456789abcdef" for c in p)
    assert p == pseudonymize("alice", KEY) != pseudonymize("alice", b"other-key")
    assert p != pseudonymize("alice2", KEY) and "alice" not in p
    assert p == hmac.new(KEY, b"alice", hashlib.sha256).hexdigest()[:32]
    with pytest.raises(ValueError):
        pseudonymize("alice", b"")


def test_user_key_warns_once_for_the_dev_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, settings: Settings
) -> None:
    monkeypatch.setattr(privacy, "_warned", False)
    dev = settings.model_copy(deep=True)
    dev.privacy.user_key = DEV_USER_KEY
    with caplog.at_level(logging.WARNING, logger="rewrite.privacy"):
        assert user_key_from_settings(dev) == DEV_USER_KEY.encode()
        user_key_from_settings(dev)
    assert sum("development key" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    monkeypatch.setattr(privacy, "_warned", False)
    monkeypatch.setenv("QRW_PRIVACY__USER_KEY", "s3cret")
    custom = load_settings()
    with caplog.at_level(logging.WARNING, logger="rewrite.privacy"):
        assert user_key_from_settings(custom) == b"s3cret"
    assert not caplog.records


@pytest.mark.integration
def test_publish_and_read_back_with_float16_vectors(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    res = publish_pairs(client, PAIRS, personal=ALICE + BOB, encode=_encode, encoder_id="enc-1")
    assert res.n_personal_users == 2
    meta = client.hgetall(keyspace.meta_key(res.version))
    assert meta["encoder_id"] == "enc-1" and meta["personal_dim"] == str(DIM)
    store = _store(redis_url)
    h = store.history("alice")
    assert h.version == res.version and h.user == pseudonymize("alice", KEY)
    # most used first, then most recent
    assert h.texts == ("what's the weather in wilkerson", "play jazz", "call mom")
    assert h.counts.tolist() == [5, 2, 2] and h.counts.dtype == np.int64
    assert h.last_seen.tolist() == [1.7e9, 1.65e9, 1.6e9] and h.last_seen.dtype == np.float64
    assert h.vectors is not None and h.vectors.dtype == np.float32 and h.vectors.shape == (3, DIM)
    np.testing.assert_allclose(h.vectors, _encode(h.texts), atol=2e-3)
    stored = redis.Redis.from_url(redis_url).hgetall(
        keyspace.personal_version_key(res.version, h.user)
    )
    assert list(stored) == [PACKED_FIELD]  # one binary field, no JSON lists
    texts = "\0".join(h.texts).encode()
    assert len(stored[PACKED_FIELD]) == 20 + 3 * 16 + 3 * DIM * 2 + len(texts)  # float16
    # float16 kept; per entry also its count, last-seen time and remembered catalog row
    assert h.nbytes < 512 + 3 * 24 + 3 * DIM * 2 + 3 * 49 + len(texts) + 1
    assert h.count_of("call mom") == 2 and h.count_of("never said") == 0
    store.close()


@pytest.mark.integration
def test_without_encoder_no_vectors_are_stored(redis_url: str, clean_redis: None) -> None:
    res = publish_pairs(connect(redis_url), PAIRS, personal=BOB)
    h = _store(redis_url).history("bob")
    assert h.version == res.version and h.vectors is None and len(h) == 1
    assert "personal_dim" not in connect(redis_url).hgetall(keyspace.meta_key(res.version))


@pytest.mark.integration
def test_users_only_see_their_own_history(redis_url: str, clean_redis: None) -> None:
    publish_pairs(connect(redis_url), PAIRS, personal=ALICE + BOB, encode=_encode)
    store = _store(redis_url)
    alice, bob = store.history("alice"), store.history("bob")
    assert set(alice.texts) == {e.text for e in ALICE}
    assert bob.texts == ("what's the weather in wilkinson",)
    assert not set(alice.texts) & set(bob.texts)
    stranger = store.history("mallory")
    assert len(stranger) == 0 and stranger.vectors is None
    assert len(store.history("")) == 0
    # a pseudonym is not a user id: asking with Alice's key string finds nothing
    assert len(store.history(pseudonymize("alice", KEY))) == 0
    # another deployment key cannot read Alice's history
    assert len(PersonalStore(redis_url, b"other-key").history("alice")) == 0


@pytest.mark.integration
def test_identical_input_gives_identical_version(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    first = publish_pairs(client, PAIRS, personal=ALICE + BOB, encode=_encode, encoder_id="e")
    shuffled = ALICE + BOB
    random.Random(3).shuffle(shuffled)
    again = publish_pairs(client, PAIRS, personal=shuffled, encode=_encode, encoder_id="e")
    assert again.unchanged and again.version == first.version
    assert version_content_hash(PAIRS, shuffled, "e", True) == version_content_hash(
        PAIRS, ALICE + BOB, "e", True
    )
    assert first.version == "v" + version_content_hash(PAIRS, ALICE + BOB, "e", True)[:16]
    last = ALICE[-1]
    bumped = [*ALICE[:-1], PersonalEntry(last.user, last.text, last.count + 1, last.last_seen)]
    others = {
        version_content_hash(PAIRS, bumped + BOB, "e", True),  # a count changed
        version_content_hash(PAIRS, ALICE, "e", True),  # a user's history dropped
        version_content_hash(PAIRS, ALICE + BOB, "e2", True),  # another encoder
        version_content_hash(PAIRS, ALICE + BOB, "e", False),  # no vectors
        version_content_hash(PAIRS, ALICE + BOB, "e", True, {"index_sha256": "x"}),
    }
    assert len(others) == 5 and first.version[1:] not in {h[:16] for h in others}
    assert version_content_hash(PAIRS) == content_hash(PAIRS)  # pair-only ids unchanged
    with pytest.raises(ValueError, match="duplicate"):
        publish_pairs(client, PAIRS, personal=ALICE + ALICE[:1])


@pytest.mark.integration
def test_reader_pinned_to_a_version_never_mixes(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    v1 = publish_pairs(client, PAIRS, personal=ALICE).version
    v2 = publish_pairs(client, PAIRS, personal=_history("alice", [("play rock", 1, 1.8e9)]))
    store = _store(redis_url)
    assert store.history("alice").texts == ("play rock",)
    old = store.history("alice", version=v1)
    assert old.version == v1 and old.texts[0] == "what's the weather in wilkerson"
    assert store.history("alice", version=v2.version).version == v2.version


@pytest.mark.integration
def test_malformed_history_reads_as_empty(redis_url: str, clean_redis: None) -> None:
    v = publish_pairs(connect(redis_url), PAIRS, personal=BOB).version
    key = keyspace.personal_version_key(v, pseudonymize("bob", KEY))
    raw = redis.Redis.from_url(redis_url)  # bytes: the packed field is binary
    try:
        blob = raw.hget(key, PACKED_FIELD)
        assert blob is not None
        raw.hset(key, PACKED_FIELD, blob[:-3])  # truncated
        assert len(_store(redis_url).history("bob")) == 0
        raw.hset(key, PACKED_FIELD, b"XXXX" + blob[4:])  # not the packed magic
        assert len(_store(redis_url).history("bob")) == 0
        # the JSON layout of versions published before the packed one, malformed
        raw.delete(key)
        raw.hset(key, mapping={"texts": json.dumps(["a"]), "counts": json.dumps([1, 2])})
        raw.hset(key, "last_seen", json.dumps([1.0]))
        assert len(_store(redis_url).history("bob")) == 0
    finally:
        raw.close()


@pytest.mark.integration
def test_histories_of_the_json_layout_are_still_read(redis_url: str, clean_redis: None) -> None:
    """A version published before the packed layout (JSON lists and a float16 ``vectors``
    field) reads as the same history as its packed form: the service can still answer from
    it (e.g. after a rollback to it)."""
    res = publish_pairs(connect(redis_url), PAIRS, personal=ALICE, encode=_encode)
    key = keyspace.personal_version_key(res.version, pseudonymize("alice", KEY))
    packed = _store(redis_url).history("alice")
    vectors = _encode(packed.texts).astype("<f2")
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.delete(key)
        raw.hset(
            key,
            mapping={
                "texts": json.dumps(list(packed.texts)),
                "counts": json.dumps(packed.counts.tolist()),
                "last_seen": json.dumps(packed.last_seen.tolist()),
                "vectors": vectors.tobytes(),
            },
        )
    finally:
        raw.close()
    legacy = _store(redis_url).history("alice")
    assert legacy.texts == packed.texts and legacy.version == packed.version
    assert np.array_equal(legacy.counts, packed.counts) and legacy.counts.dtype == np.int64
    assert np.array_equal(legacy.last_seen, packed.last_seen)
    assert legacy.vectors is not None and packed.vectors is not None
    assert np.array_equal(legacy.vectors, packed.vectors)
    assert np.array_equal(legacy.vectors, vectors.astype(np.float32))


@pytest.mark.integration
def test_nightly_publish_keys_hold_no_raw_user_ids(
    tmp_path: Path, settings: Settings, clean_redis: redis.Redis
) -> None:
    lines = [
        json.dumps(
            {
                "turn_id": f"t{i}",
                "user_id": f"raw-user-{i % 3}",
                "timestamp": f"2026-01-05T09:{i:02d}:00Z",
                "utterance": "play jazz" if i % 3 == 1 else "call mom",
                "response": "OK.",
            }
        )
        for i in range(12)
    ]
    (tmp_path / "day.jsonl").write_text("\n".join(lines) + "\n")
    s = settings.model_copy(deep=True)
    s.privacy.user_key = KEY.decode()
    report = run_nightly([tmp_path / "day.jsonl"], tmp_path / "run", s, publish=True)
    assert report.publish is not None and report.publish["n_personal_users"] == 3
    keys = list(clean_redis.scan_iter(match="*"))
    personal = [k for k in keys if ":personal:" in k]
    assert len(personal) == 3
    assert not [k for k in keys if "raw-user" in k]
    raw = redis.Redis.from_url(s.redis.url)  # bytes: the hashes hold float16 vectors too
    try:
        values = [v for k in personal for v in raw.hgetall(k).values()]
    finally:
        raw.close()
    assert values and not any(b"raw-user" in v for v in values)
    assert _store(s.redis.url).history("raw-user-1").texts == ("play jazz",)


def test_redis_down_raises_store_unavailable_quickly(tmp_path: Path) -> None:
    store = _store(f"unix://{tmp_path}/no-redis.sock", retry_after_s=5.0)
    t0 = time.perf_counter()
    with pytest.raises(StoreUnavailableError):
        store.history("alice")
    with pytest.raises(StoreUnavailableError, match="backing off"):
        store.history("alice", version="v1")  # no second connect attempt during back-off
    assert time.perf_counter() - t0 < 0.5
    tcp = _store("redis://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(StoreUnavailableError):
        tcp.history("alice", version="v1")


@pytest.mark.integration
def test_cache_serves_repeat_reads_until_expiry_and_forget_reaches_the_service(
    redis_url: str, clean_redis: redis.Redis
) -> None:
    from offline.forget import forget_user
    from rewrite import metrics

    res = publish_pairs(connect(redis_url), PAIRS, personal=ALICE + BOB, encode=_encode)
    store = _store(redis_url, cache_mb=1.0, cache_ttl_s=0.5)
    hits, misses = metrics.PERSONAL_CACHE_HIT._value.get(), metrics.PERSONAL_CACHE_MISS._value.get()
    first = store.history("alice")
    assert first.texts[0] == "what's the weather in wilkerson"
    assert first.scorer is not None and not first.counts.flags.writeable  # shared: read-only
    assert store.history("alice") is first  # second read: from the cache
    # "no history" of a user the version's filter does not list: no Redis read, no cache entry
    filtered = metrics.PERSONAL_FILTERED._value.get()
    assert len(store.history("mallory")) == 0 and len(store.history("mallory")) == 0
    assert metrics.PERSONAL_FILTERED._value.get() - filtered == 2
    assert metrics.PERSONAL_CACHE_HIT._value.get() - hits == 1
    assert metrics.PERSONAL_CACHE_MISS._value.get() - misses == 1
    assert store.history("bob").texts == ("what's the weather in wilkinson",)  # per user
    # a forgotten user's history disappears from Redis at once and from the cache on expiry
    forget_user(clean_redis, "alice", KEY, None)
    assert len(_store(redis_url).history("alice")) == 0  # uncached reader: gone
    assert store.history("alice") is first  # cached reader: until the expiry
    time.sleep(0.6)
    gone = store.history("alice")
    assert len(gone) == 0 and gone.version == res.version
    # while Redis is marked down the cache is not consulted: an outage is a pass-through
    assert len(store.history("bob")) == 1
    store._fail(ConnectionError("simulated outage"))
    with pytest.raises(StoreUnavailableError, match="backing off"):
        store.history("bob", version=res.version)


def test_user_filter_and_batched_reads_spare_redis_round_trips(
    redis_url: str, clean_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publish stores the pseudonyms with a history as a filter; a micro-batch of users is
    answered with one HGETALL per distinct listed user (pipelined), none for users the filter
    does not list; a version without the filter, or with a corrupt one, is read user by user
    as before; a pairs-only version answers everybody from its empty filter; a Redis failure
    during the batch is a StoreUnavailableError."""
    import rewrite.store as store_mod

    monkeypatch.setattr(store_mod, "_FILTER_CHUNK", 16)  # 2 users = 16 bytes: 1 read
    client = connect(redis_url)
    v = publish_pairs(client, PAIRS, personal=ALICE + BOB, encode=_encode).version
    raw = client.execute_command("GET", keyspace.personal_users_key(v), NEVER_DECODE=True)
    members = MembershipFilter.from_bytes(raw)
    assert len(members) == 2 and pseudonymize("alice", KEY) in members
    assert pseudonymize("bob", KEY) in members and pseudonymize("mallory", KEY) not in members
    store = _store(redis_url)
    users = ["mallory", "alice", "", "eve", "alice", "bob", "mallory"]
    before = command_calls(client, "hgetall")
    hists = store.histories(users)
    assert command_calls(client, "hgetall") - before == 2  # alice and bob, once each
    assert [len(h) for h in hists] == [0, 3, 0, 0, 3, 1, 0]
    assert hists[1] is hists[4] and hists[5].texts == ("what's the weather in wilkinson",)
    assert all(h.version == v for h in hists)
    assert hists[0].user == pseudonymize("mallory", KEY) and hists[2].user == ""
    # one round trip for the batch: the two reads went out in one pipeline
    calls: list[int] = []
    real = redis.client.Pipeline.execute

    def counted(pipe: redis.client.Pipeline, *a: object, **kw: object) -> object:
        calls.append(len(pipe.command_stack))
        return real(pipe, *a, **kw)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    assert [len(h) for h in store.histories(["bob", "alice"])] == [1, 3] and calls == [2]
    # same answers one user at a time
    assert [store.history(u).texts for u in users] == [h.texts for h in hists]
    # a version published without the filter, or with a corrupt one: every user is read
    for damage in ("delete", "corrupt"):
        v2 = publish_pairs(client, [], personal=BOB + _history(damage, [("x", 1, 1.0)])).version
        key = keyspace.personal_users_key(v2)
        client.delete(key) if damage == "delete" else client.set(key, b"\x01" * 9)
        reader = _store(redis_url)
        before = command_calls(client, "hgetall")
        assert [len(h) for h in reader.histories(["mallory", "bob"])] == [0, 1]
        assert reader.user_filter(v2) is None and command_calls(client, "hgetall") - before == 2
        reader.close()
    # a version without personal histories: an empty filter answers everybody
    v3 = publish_pairs(client, PAIRS).version
    before = command_calls(client, "hgetall")
    assert [len(h) for h in _store(redis_url).histories(["alice", "bob"], version=v3)] == [0, 0]
    assert command_calls(client, "hgetall") == before
    # Redis failing in the middle of a batch read
    down = _store(redis_url)
    down.histories(["alice"], version=v)  # version and filter read

    def boom(pipe: redis.client.Pipeline, *a: object, **kw: object) -> object:
        raise redis.ConnectionError("simulated outage")

    monkeypatch.setattr(redis.client.Pipeline, "execute", boom)
    with pytest.raises(StoreUnavailableError):
        down.histories(["alice", "bob"], version=v)
    with pytest.raises(StoreUnavailableError, match="backing off"):
        down.histories(["bob"], version=v)
    store.close()
    down.close()


@pytest.mark.integration
def test_cache_is_keyed_by_version_and_bounded_in_memory(
    redis_url: str, clean_redis: redis.Redis
) -> None:
    client = connect(redis_url)
    v1 = publish_pairs(client, PAIRS, personal=ALICE, encode=_encode).version
    v2 = publish_pairs(client, PAIRS, personal=_history("alice", [("play rock", 1, 1.8e9)]))
    store = _store(redis_url, cache_mb=1.0, cache_ttl_s=60.0)
    assert store.history("alice", version=v1).texts[0] == "what's the weather in wilkerson"
    assert store.history("alice").texts == ("play rock",)  # the active version: another key
    assert store.history("alice", version=v2.version).version == v2.version
    # a history larger than the whole cache is served but not kept
    tiny = _store(redis_url, cache_mb=100 / 2**20, cache_ttl_s=60.0)  # 100 bytes
    a = tiny.history("alice", version=v1)
    assert len(a) == 3 and a.nbytes > 100
    assert tiny.history("alice", version=v1) is not a
    with pytest.raises(ValueError, match=">= 0"):
        _store(redis_url, cache_mb=-1.0)


@pytest.mark.integration
def test_nightly_encodes_each_catalog_text_once_for_index_and_histories(
    tmp_path: Path,
    settings: Settings,
    clean_redis: redis.Redis,
    dpr_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The index stage keeps the passage vectors of the catalog texts that personal histories
    hold too, so the publish stage encodes only the texts outside the catalog: over one night
    every text reaches the passage tower once, and the published history vectors are the
    tower's vectors (float16) whichever stage computed them."""
    from rewrite.encoder import PassageEncoder

    common, rare = ["call mom", "play jazz"], ["play the blues by the river", "dim the den"]
    said = [(f"u{u}", t) for u in range(4) for t in common] + [("u0", rare[0]), ("u1", rare[1])]
    lines = [  # one turn per session (an hour apart): nothing is a rephrase
        json.dumps(
            {
                "turn_id": f"t{i}",
                "user_id": user,
                "timestamp": f"2026-01-05T{i:02d}:00:00Z",
                "utterance": text,
                "response": "OK.",
            }
        )
        for i, (user, text) in enumerate(said)
    ]
    (tmp_path / "day.jsonl").write_text("\n".join(lines) + "\n")
    s = settings.model_copy(deep=True)
    s.privacy.user_key = KEY.decode()
    s.dpr.artifacts_dir = dpr_dir
    s.dpr.index_root = tmp_path / "index-root"
    s.catalog.min_users = s.catalog.min_frequency = 3
    encoded: list[str] = []
    original = PassageEncoder.encode

    def counting(self: PassageEncoder, texts: Sequence[str]) -> np.ndarray:
        encoded.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(PassageEncoder, "encode", counting)
    report = run_nightly([tmp_path / "day.jsonl"], tmp_path / "run", s, publish=True)
    assert report.online is not None and report.online["index_entries"] == 2  # the common two
    assert report.publish is not None and report.publish["n_personal_users"] == 4
    assert sorted(encoded) == sorted(common + rare)  # each text once, over index + publish
    monkeypatch.setattr(PassageEncoder, "encode", original)
    from offline.dpr.train import export_zero_shot

    tower = PassageEncoder.load(export_zero_shot(dpr_dir).artifact)  # the one the job used
    for user in ("u0", "u1"):
        h = _store(s.redis.url).history(user)
        assert h.vectors is not None and set(h.texts) & set(common) and set(h.texts) & set(rare)
        np.testing.assert_allclose(h.vectors, tower.encode(list(h.texts)), atol=2e-3)


def test_fp16_scorer_decodes_numpys_values_for_every_half_float() -> None:
    """The FAISS index that holds a history's stored vectors gives back numpy's float32 value
    of every one of the 65,536 float16 bit patterns (zeros, subnormals, inf, NaN included),
    and a blob that is not ``n`` rows of float16 is refused."""
    patterns = np.arange(65536, dtype=np.uint16).astype("<u2")
    blob = patterns.tobytes()
    got = np.asarray(fp16_scorer(blob, 256).reconstruct_n(0, 256))
    want = np.frombuffer(blob, dtype="<f2").reshape(256, 256).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (256, 256)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    for bad, n in ((b"", 1), (b"\x00" * 6, 2), (b"\x00" * 4, 0)):
        with pytest.raises(ValueError, match="float16 rows"):
            fp16_scorer(bad, n)


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_packed_history_round_trips_and_refuses_bad_input() -> None:
    texts = ["play jazz", "what's the weather in zürich", "call mom"]
    vectors = _unit_rows(3, 16, 1).astype("<f2")
    blob = pack_history(texts, [5, 2, 1], [1.7e9, 1.65e9 + 0.25, 1.6e9], vectors)
    h = unpack_history(blob, "u", "v1")
    assert (h.user, h.version, h.texts) == ("u", "v1", tuple(texts))
    assert h.counts.tolist() == [5, 2, 1] and h.counts.dtype == np.int64
    assert h.last_seen.tolist() == [1.7e9, 1.65e9 + 0.25, 1.6e9]
    assert h.last_seen.dtype == np.float64 and not h.last_seen.flags.writeable
    assert h.dim == 16 and h.vectors is not None
    assert np.array_equal(h.vectors, vectors.astype(np.float32))  # float16 values, exactly
    # without vectors, and with no entries at all
    bare = unpack_history(pack_history(texts[:1], [3], [1.0]))
    assert bare.texts == ("play jazz",) and bare.scorer is None and bare.vectors is None
    assert bare.dim == 0
    assert len(unpack_history(pack_history([], [], []))) == 0
    with pytest.raises(ValueError, match="NUL"):
        pack_history(["a\x00b"], [1], [1.0])
    with pytest.raises(ValueError, match="counts"):
        pack_history(["a", "b"], [1], [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        pack_history(["a", "b"], [1, 1], [1.0, 2.0], vectors[:1])
    for bad in (blob[:10], blob[:-40], b"QRWX" + blob[4:], blob[:4] + b"\x09" + blob[5:]):
        with pytest.raises(ValueError):
            unpack_history(bad)
    with pytest.raises(ValueError, match="header says"):
        unpack_history(blob + b"\x00extra")


def test_history_top_matches_a_stable_argsort_of_float32_scores() -> None:
    """``top`` (FAISS fp16 search) picks the entries a stable argsort of ``vectors @ query``
    would, best first, equal scores in entry order; scores within float32 rounding."""
    n, dim = 200, 64
    rows = _unit_rows(n, dim, 2)
    rows[50] = rows[7]  # an exact tie: the earlier entry first
    rows[120] = rows[7]
    h = unpack_history(pack_history([f"t{i}" for i in range(n)], [1] * n, [0.0] * n, rows))
    assert h.vectors is not None
    for seed in range(20):
        q = _unit_rows(1, dim, 100 + seed)[0]
        if seed == 0:
            q = h.vectors[7] / np.linalg.norm(h.vectors[7])
        full = h.vectors @ q
        want = np.argsort(-full, kind="stable")[:10]
        ids, scores = h.top(q, 10)
        assert ids.tolist() == want.tolist()
        np.testing.assert_allclose(scores, full[want], rtol=0, atol=1e-6)
        if seed == 0:
            assert ids[:3].tolist() == [7, 50, 120]
    q = _unit_rows(1, dim, 9)[0]
    assert h.top(q, 0)[0].size == 0 and h.top(q, 10_000)[0].size == n
    with pytest.raises(ValueError, match="dims"):
        h.top(np.ones(dim + 1, dtype=np.float32), 3)
    with pytest.raises(ValueError, match="no vectors"):
        unpack_history(pack_history(["a"], [1], [0.0])).top(q, 3)
