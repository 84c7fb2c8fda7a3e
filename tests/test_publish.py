"""Publishing to a real Redis: versioned keys, atomic flip, no mixed reads, rollback."""

from __future__ import annotations

import threading

import pytest
import redis
from redisstats import command_calls

from offline.markov import RewritePair
from offline.publish import PublishError, connect, publish_pairs, rollback
from rewrite import keyspace
from rewrite.store import PairStore, StoreUnavailableError

pytestmark = pytest.mark.integration

N_KEYS = 400


def _pairs(tag: str) -> list[RewritePair]:
    return [RewritePair(f"utt {i}", f"fix {i} {tag}", 0.9, 3, 2) for i in range(N_KEYS)]


def test_publish_then_lookup_and_idempotent(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    res = publish_pairs(client, _pairs("a"))
    assert res.previous is None and res.n_pairs == N_KEYS and not res.unchanged
    store = PairStore(redis_url, version_cache_s=0.0)
    hit = store.lookup("utt 7")
    assert hit is not None and hit.rewrite == "fix 7 a" and hit.version == res.version
    assert hit.confidence == pytest.approx(0.9) and (hit.support, hit.n_users) == (3, 2)
    assert store.lookup("never seen") is None
    again = publish_pairs(client, _pairs("a"))
    assert again.unchanged and again.version == res.version
    assert client.lrange(keyspace.VERSIONS, 0, -1) == [res.version]


def test_reader_during_publish_never_sees_a_mix(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    v1 = publish_pairs(client, _pairs("a")).version
    tags = {v1: "a"}
    stop = threading.Event()
    seen: set[str] = set()
    mixed: list[str] = []
    reader = redis.Redis.from_url(redis_url, decode_responses=True)

    def read_loop() -> None:
        while not stop.is_set():
            version = reader.get(keyspace.ACTIVE)
            assert version is not None
            pipe = reader.pipeline(transaction=False)
            for i in range(0, N_KEYS, 40):
                pipe.hget(keyspace.pair_key(version, f"utt {i}"), "rewrite")
            got = {v.rsplit(" ", 1)[1] if v else "missing" for v in pipe.execute()}
            seen.add(version)
            if len(got) != 1:
                mixed.append(f"{version}: {got}")

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        for tag in ["b", "c", "d"]:
            v = publish_pairs(client, _pairs(tag), keep_versions=2).version
            tags[v] = tag
    finally:
        stop.set()
        t.join(10)
    assert not mixed, mixed[:3]
    assert len(seen) >= 2  # the reader really ran across flips


def test_rollback_restores_previous_and_expires_old(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    v1 = publish_pairs(client, _pairs("a"), keep_versions=2, version_ttl_s=1000).version
    v2 = publish_pairs(client, _pairs("b"), keep_versions=2, version_ttl_s=1000).version
    v3 = publish_pairs(client, _pairs("c"), keep_versions=2, version_ttl_s=1000).version
    assert client.get(keyspace.ACTIVE) == v3
    assert client.ttl(keyspace.pair_key(v3, "utt 1")) == -1
    assert client.ttl(keyspace.pair_key(v2, "utt 1")) == -1  # kept for rollback
    assert 0 < client.ttl(keyspace.pair_key(v1, "utt 1")) <= 1000  # expires later
    old, new = rollback(client, version_ttl_s=1000)
    assert (old, new) == (v3, v2)
    assert client.get(keyspace.ACTIVE) == v2
    assert client.hget(keyspace.pair_key(v2, "utt 5"), "rewrite") == "fix 5 b"
    assert 0 < client.ttl(keyspace.pair_key(v3, "utt 1")) <= 1000
    old, new = rollback(client, version_ttl_s=1000)
    assert (old, new) == (v2, v1)
    assert client.ttl(keyspace.pair_key(v1, "utt 1")) == -1  # made permanent again
    with pytest.raises(PublishError):
        rollback(client)


def test_half_written_version_is_invisible(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    v1 = publish_pairs(client, _pairs("a")).version
    # a crashed publish: keys of another version written, never flipped
    client.hset(keyspace.pair_key("vcrashed", "utt 1"), mapping={"rewrite": "junk"})
    store = PairStore(redis_url, version_cache_s=0.0)
    hit = store.lookup("utt 1")
    assert hit is not None and hit.rewrite == "fix 1 a" and hit.version == v1
    with pytest.raises(PublishError):
        rollback(client)  # the crashed version is not in history and not complete


def test_lock_blocks_concurrent_publish(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    client.set(keyspace.PUBLISH_LOCK, "someone-else", ex=30)
    with pytest.raises(PublishError, match="in progress"):
        publish_pairs(client, _pairs("a"))
    assert client.get(keyspace.ACTIVE) is None


def test_duplicate_sources_rejected(redis_url: str, clean_redis: None) -> None:
    client = connect(redis_url)
    dup = [RewritePair("x", "y", 0.9, 2, 2), RewritePair("x", "z", 0.8, 2, 2)]
    with pytest.raises(ValueError):
        publish_pairs(client, dup)


def test_unreachable_redis_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(PublishError, match="qrw redis start"):
        connect("unix:///nonexistent/qrw.sock", timeout_s=0.2)


def _hgetall_calls(client: redis.Redis) -> int:
    return command_calls(client, "hgetall")


def test_pair_cache_answers_without_redis_and_follows_the_active_version(
    redis_url: str, clean_redis: None
) -> None:
    """The in-process pair cache: a repeated lookup (a pair or a miss) costs no Redis round
    trip; publish and rollback are new versions, so the next lookup sees them at once; an
    outage is still a pass-through although the answer is cached."""
    client = connect(redis_url)
    v1 = publish_pairs(client, _pairs("a")).version
    store = PairStore(redis_url, version_cache_s=0.0, pair_cache_size=100)
    before = _hgetall_calls(client)
    for _ in range(5):
        hit = store.lookup("utt 3")
        assert hit is not None and (hit.rewrite, hit.version) == ("fix 3 a", v1)
        assert store.lookup("never seen") is None  # no source: the filter answers
    assert _hgetall_calls(client) - before == 1  # one per (version, source)
    v2 = publish_pairs(client, _pairs("b")).version
    hit = store.lookup("utt 3")
    assert hit is not None and (hit.rewrite, hit.version) == ("fix 3 b", v2)
    rollback(client)
    hit = store.lookup("utt 3")
    assert hit is not None and (hit.rewrite, hit.version) == ("fix 3 a", v1)
    assert _hgetall_calls(client) - before == 2  # v1's answer came back from the cache
    # bounded: the least recently used answers are evicted
    for i in range(200):
        store.lookup(f"utt {i}")
    assert len(store._cache or ()) == 100
    # Redis unreachable: the back-off makes it a StoreUnavailableError, cached or not
    down = PairStore("unix:///nonexistent/qrw.sock", version_cache_s=0.0, pair_cache_size=100)
    with pytest.raises(StoreUnavailableError):
        down.lookup("utt 3")
    down._version, down._version_at = v1, 1e18  # the active version still cached
    down._cache[(v1, "utt 3")] = hit  # type: ignore[index]
    with pytest.raises(StoreUnavailableError, match="backing off"):
        down.lookup("utt 3")
    store.close()
    down.close()


def test_pair_source_filter_answers_misses_without_redis(
    redis_url: str, clean_redis: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publish stores the version's pair sources as a filter (sorted 64-bit hashes); the
    service reads it once per version (in GETRANGE chunks) and answers "no pair" for any
    other utterance without a lookup; pairs are still found. A version without the filter
    (an older publisher) or with a corrupt one is served by lookups as before; a version
    without pairs answers every lookup from its empty filter."""
    import rewrite.store as store_mod
    from rewrite.store import MembershipFilter

    monkeypatch.setattr(store_mod, "_FILTER_CHUNK", 64)  # 400 sources = 3,200 bytes = 50 reads
    client = connect(redis_url)
    v1 = publish_pairs(client, _pairs("a")).version
    raw = client.execute_command("GET", keyspace.pair_sources_key(v1), NEVER_DECODE=True)
    assert raw == MembershipFilter.build(p.source for p in _pairs("a")).to_bytes()
    filt = MembershipFilter.from_bytes(raw)
    assert len(filt) == N_KEYS and all(f"utt {i}" in filt for i in range(N_KEYS))
    assert not any(f"utt {i}" in filt for i in range(N_KEYS, 2 * N_KEYS))
    store = PairStore(redis_url, version_cache_s=0.0)
    before = _hgetall_calls(client)
    assert all(store.lookup(f"other {i}") is None for i in range(300))
    hit = store.lookup("utt 5")
    assert hit is not None and hit.rewrite == "fix 5 a"
    assert _hgetall_calls(client) - before == 1  # only the source was looked up
    assert store.source_filter(v1) is not None and len(store.source_filter(v1) or ()) == N_KEYS
    # a version published without the filter, or with a corrupt one: lookups as before
    for damage in ("delete", "corrupt"):
        v = publish_pairs(client, _pairs(damage)).version
        key = keyspace.pair_sources_key(v)
        if damage == "delete":
            client.delete(key)
        else:
            client.set(key, b"\x01" * 7)
        reader = PairStore(redis_url, version_cache_s=0.0)
        before = _hgetall_calls(client)
        assert reader.lookup("other") is None
        hit = reader.lookup("utt 9")
        assert hit is not None and hit.rewrite == f"fix 9 {damage}"
        assert reader.source_filter(v) is None and _hgetall_calls(client) - before == 2
        reader.close()
    # no pairs at all: an empty filter
    publish_pairs(client, [])
    empty = PairStore(redis_url, version_cache_s=0.0)
    before = _hgetall_calls(client)
    assert empty.lookup("utt 9") is None and _hgetall_calls(client) == before
    store.close()
    empty.close()
