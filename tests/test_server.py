"""End-to-end tests of the gRPC service: real server on 127.0.0.1, real Redis, real client.

A tiny version is published by hand through redis-py and :mod:`rewrite.keyspace` (pair
hashes, meta hash, then ``qrw:active``), exactly as the nightly publisher lays it out.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
import redis
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rewrite import keyspace, metrics
from rewrite._pb.queryrewrite.v1 import rewrite_pb2
from rewrite.client import RewriteClient
from rewrite.config import Settings
from rewrite.pipeline import RewriteState
from rewrite.redis_server import EmbeddedRedis
from rewrite.rewriter import Rewriter
from rewrite.server import (
    REWRITE_METHOD,
    SERVICE_NAME,
    RewriteServer,
    request_from_proto,
    request_to_proto,
    result_from_proto,
    result_to_proto,
)
from rewrite.types import (
    Candidate,
    ContextTurn,
    InvalidRequestError,
    RewriteRequest,
    RewriteResult,
)

pytestmark = pytest.mark.integration

PAIRS: dict[str, dict[str, str | float | int]] = {
    "play some dell": {
        "rewrite": "play songs by adele",
        "confidence": 0.87,
        "support": 12,
        "n_users": 5,
    },
    "turn of the lights": {
        "rewrite": "turn off the lights",
        "confidence": 0.93,
        "support": 40,
        "n_users": 17,
    },
}


# --------------------------------------------------------------------------- helpers


def publish(client: redis.Redis, version: str, pairs: dict[str, dict[str, Any]]) -> None:
    """Write a complete version (pairs + meta), then flip ``qrw:active`` to it."""
    for normalized, fields in pairs.items():
        for field, value in fields.items():
            client.hset(keyspace.pair_key(version, normalized), field, value)
    client.hset(
        keyspace.meta_key(version),
        mapping={
            "created_at": "2026-01-01T00:00:00+00:00",
            "n_pairs": len(pairs),
            "content_hash": "test",
            "complete": 1,
        },
    )
    client.lpush(keyspace.VERSIONS, version)
    client.set(keyspace.ACTIVE, version)


def poll(
    call: Callable[[], RewriteResult], done: Callable[[RewriteResult], bool], timeout_s: float = 5.0
) -> RewriteResult:
    """Call until ``done(result)`` (every 50 ms, at most ``timeout_s`` seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = call()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def raw_rewrite(channel: grpc.Channel) -> Any:
    """The Rewrite method on a plain channel (to see status codes without the client)."""
    return channel.unary_unary(
        REWRITE_METHOD,
        request_serializer=rewrite_pb2.RewriteRequest.SerializeToString,
        response_deserializer=rewrite_pb2.RewriteResponse.FromString,
    )


class RecordingRewriter(Rewriter):
    """A real Rewriter that records the requests it receives and can be slowed down."""

    def __init__(self, settings: Settings, delay_s: float = 0.0) -> None:
        super().__init__(settings)
        self.delay_s = delay_s
        self.requests: list[RewriteRequest] = []

    def prepare(self, request: RewriteRequest) -> RewriteState:
        # the servicer calls prepare (inline) → complete (maybe on a worker) → finish
        self.requests.append(request)
        if self.delay_s:
            time.sleep(self.delay_s)  # blocks the server's event loop, like slow CPU work
        return super().prepare(request)


class BrokenRewriter(Rewriter):
    """Validates like the real one, then fails with a message that must not leak."""

    def prepare(self, request: RewriteRequest) -> RewriteState:
        self.validate(request)
        raise RuntimeError("internal detail: password=hunter2")


@pytest.fixture(scope="module")
def published(grpc_server: RewriteServer, redis_url: str) -> str:
    """A fresh published version in the session Redis, visible to ``grpc_server``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    version = f"test-{uuid.uuid4().hex[:8]}"
    publish(client, version, PAIRS)
    client.close()
    with RewriteClient(grpc_server.target) as rc:
        seen = poll(
            lambda: rc.rewrite(RewriteRequest("play some dell", "u0")),
            lambda r: r.model_version == version,
        )
    assert seen.model_version == version, "server never saw the published version"
    return version


@pytest.fixture
def client(grpc_server: RewriteServer) -> Iterator[RewriteClient]:
    with RewriteClient(grpc_server.target, timeout_s=2.0) as rc:
        yield rc


@pytest.fixture(scope="module")
def channel(grpc_server: RewriteServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_server.target) as ch:
        yield ch


# --------------------------------------------------------------------------- (a) (b) (f)


def test_known_utterance_is_rewritten_after_normalization(
    client: RewriteClient, published: str
) -> None:
    result = client.rewrite(RewriteRequest("  Play SOME Dell?! ", "user-1", request_id="r-1"))
    assert result.rewritten is True
    assert result.rewrite == "play songs by adele"
    assert result.source == "precomputed"
    assert result.confidence == pytest.approx(0.87)
    assert result.model_version == published
    assert result.normalized == "play some dell"
    assert result.reason == ""
    assert result.request_id == "r-1"
    assert result.candidates == ()
    assert result.latency_ms > 0.0


def test_unknown_utterance_passes_through(client: RewriteClient, published: str) -> None:
    text = "What's the weather in Boston?"
    result = client.rewrite(RewriteRequest(text, "user-2"))
    assert result.rewritten is False
    assert result.rewrite == text
    assert result.source == "none"
    assert result.confidence == 0.0
    assert result.reason == "online_unavailable"  # no pair; the version has no online index
    assert result.normalized == "what's the weather in boston"
    assert result.model_version == published


def test_explain_returns_the_candidate(client: RewriteClient, published: str) -> None:
    result = client.rewrite(RewriteRequest("turn of the lights.", "user-3", explain=True))
    assert result.rewrite == "turn off the lights"
    assert len(result.candidates) == 1
    candidate = result.candidates[0]
    assert (candidate.text, candidate.source) == ("turn off the lights", "precomputed")
    assert candidate.score == pytest.approx(0.93)
    assert candidate.features == {"support": 40.0, "n_users": 17.0}


# --------------------------------------------------------------------------- (c)


def _invalid_cases(settings: Settings) -> list[tuple[str, rewrite_pb2.RewriteRequest, str]]:
    svc = settings.service
    long_text = "a" * (svc.max_utterance_chars + 1)
    turns = [rewrite_pb2.ContextTurn(utterance="hi")] * (svc.max_context_turns + 1)
    return [
        ("empty", rewrite_pb2.RewriteRequest(utterance="", user_id="u"), "utterance is required"),
        (
            "whitespace",
            rewrite_pb2.RewriteRequest(utterance=" \t \n", user_id="u"),
            "utterance is required and must not be blank",
        ),
        (
            "no user",
            rewrite_pb2.RewriteRequest(utterance="play jazz"),
            "user_id is required",
        ),
        (
            "control chars",
            rewrite_pb2.RewriteRequest(utterance="play\x07 jazz", user_id="u"),
            "utterance contains control characters",
        ),
        (
            "too long",
            rewrite_pb2.RewriteRequest(utterance=long_text, user_id="u"),
            f"utterance too long: {len(long_text)} > {svc.max_utterance_chars} chars",
        ),
        (
            "too many turns",
            rewrite_pb2.RewriteRequest(utterance="play jazz", user_id="u", context=turns),
            f"too many context turns: {len(turns)} > {svc.max_context_turns}",
        ),
        (
            "negative seconds_ago",
            rewrite_pb2.RewriteRequest(
                utterance="play jazz",
                user_id="u",
                context=[
                    rewrite_pb2.ContextTurn(utterance="hi", seconds_ago=3.0),
                    rewrite_pb2.ContextTurn(utterance="play jas", seconds_ago=-1.0),
                ],
            ),
            "context[1].seconds_ago must be >= 0",
        ),
        (
            "nan seconds_ago",
            rewrite_pb2.RewriteRequest(
                utterance="play jazz",
                user_id="u",
                context=[rewrite_pb2.ContextTurn(utterance="hi", seconds_ago=float("nan"))],
            ),
            "context[0].seconds_ago must be >= 0",
        ),
        (
            "unknown arm",
            rewrite_pb2.RewriteRequest(utterance="play jazz", user_id="u", arm="bogus"),
            "unknown arm 'bogus'",
        ),
        (
            "free-text device type",
            rewrite_pb2.RewriteRequest(utterance="play jazz", user_id="u", device_type="tv; x"),
            "device_type 'tv;_x' is not [a-z0-9_.-]+",
        ),
        (
            "oversized device type",
            rewrite_pb2.RewriteRequest(utterance="play jazz", user_id="u", device_type="t" * 65),
            "device_type longer than 64 chars",
        ),
    ]


def test_invalid_requests_get_invalid_argument(channel: grpc.Channel, settings: Settings) -> None:
    rewrite = raw_rewrite(channel)
    for name, request, message in _invalid_cases(settings):
        with pytest.raises(grpc.RpcError) as info:
            rewrite(request, timeout=2.0)
        err = info.value
        assert isinstance(err, grpc.Call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert message in err.details(), name
    # the empty-utterance message exactly
    with pytest.raises(grpc.RpcError) as info:
        rewrite(rewrite_pb2.RewriteRequest(utterance="", user_id="u"), timeout=2.0)
    assert isinstance(info.value, grpc.Call)
    assert info.value.details() == "utterance is required and must not be blank"


def test_client_raises_invalid_request_error(client: RewriteClient) -> None:
    with pytest.raises(InvalidRequestError, match=r"^user_id is required$"):
        client.rewrite(RewriteRequest("play jazz", ""))


def test_oversized_message_is_refused(channel: grpc.Channel, settings: Settings) -> None:
    big = "a" * (settings.service.max_message_bytes + 1)
    with pytest.raises(grpc.RpcError) as info:
        raw_rewrite(channel)(rewrite_pb2.RewriteRequest(utterance=big, user_id="u"), timeout=2.0)
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- (d)


def test_health_serving(client: RewriteClient, channel: grpc.Channel) -> None:
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    with pytest.raises(grpc.RpcError) as info:
        client.health("no.such.Service")
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    service = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
    method = service.methods_by_name["Rewrite"]
    assert method.input_type.full_name == "queryrewrite.v1.RewriteRequest"
    assert method.output_type.full_name == "queryrewrite.v1.RewriteResponse"


# --------------------------------------------------------------------------- (e)


def test_redis_outage_passes_through_then_recovers(settings: Settings, tmp_path: Path) -> None:
    own_redis = EmbeddedRedis(tmp_path / "redis")
    own_redis.start()
    try:
        own = settings.model_copy(deep=True)
        own.redis.url = own_redis.url
        r = redis.Redis.from_url(own_redis.url, decode_responses=True)
        publish(r, "outage-v1", PAIRS)
        r.close()
        with (
            RewriteServer(own, host="127.0.0.1", port=0) as srv,
            RewriteClient(srv.target, timeout_s=2.0) as rc,
        ):
            text = "Play some Dell"
            before = poll(lambda: rc.rewrite(RewriteRequest(text, "u")), lambda x: x.rewritten)
            assert (before.rewrite, before.model_version) == ("play songs by adele", "outage-v1")

            store_errors = metrics.STORE_ERRORS._value.get()
            passed = metrics.PASS_THROUGH.labels("store_unavailable")._value.get()
            assert own_redis.stop() is True
            # 1.6 s spans the store's 0.5 s back-off and its 1 s version cache expiring
            # the first call asks what the in-process pair cache cannot answer, so it meets
            # the outage; from then on the cached pair of `text` is not served either
            answered = 0
            until = time.monotonic() + 1.6
            while time.monotonic() < until:
                utt = text if answered % 2 else f"Play some jazz {answered}"
                down = rc.rewrite(RewriteRequest(utt, "u"))
                assert down.rewritten is False
                assert down.rewrite == utt
                assert down.source == "none"
                assert down.reason == "store_unavailable"
                assert down.confidence == 0.0
                answered += 1
                time.sleep(0.05)
            assert answered >= 10
            # every one counted: qrw_store_errors_total and the pass-through by reason
            assert metrics.STORE_ERRORS._value.get() == store_errors + answered
            unavailable = metrics.PASS_THROUGH.labels("store_unavailable")._value.get()
            assert unavailable == passed + answered

            own_redis.start()  # same data dir: dump.rdb saved by SHUTDOWN SAVE
            after = poll(lambda: rc.rewrite(RewriteRequest(text, "u")), lambda x: x.rewritten)
            assert after.rewritten is True
            assert after.rewrite == "play songs by adele"
            assert after.model_version == "outage-v1"
            assert after.reason == ""
    finally:
        own_redis.stop()


# --------------------------------------------------------------------------- (g)


def test_client_round_trips_context_turns(settings: Settings, published: str) -> None:
    rewriter = RecordingRewriter(settings)
    sent = RewriteRequest(
        utterance="play some dell",
        user_id="user-7",
        context=(
            ContextTurn("play some dale", "Sorry, I didn't get that.", 12.5, True),
            ContextTurn("play sam dell", "", 4.25, False),
        ),
        device_id="echo-42",
        locale="en-US",
        arm="global",
        explain=True,
        request_id="req-77",
    )
    with (
        RewriteServer(settings, host="127.0.0.1", port=0, rewriter=rewriter) as srv,
        RewriteClient(srv.target) as rc,
    ):
        result = rc.rewrite(sent)
    rewriter.close()
    assert rewriter.requests == [sent]
    assert result.request_id == "req-77"
    assert result.arm == "global"
    assert result.rewrite == "play songs by adele"
    assert len(result.candidates) == 1


def test_conversions_are_inverse() -> None:
    request = RewriteRequest(
        "a", "u", (ContextTurn("b", "c", 1.5, True),), "d", "e", "f", True, "g", "smart_tv"
    )
    assert request_from_proto(request_to_proto(request)) == request
    result = RewriteResult(
        rewrite="x",
        rewritten=True,
        source="precomputed",
        confidence=0.5,
        model_version="v",
        normalized="y",
        arm="a",
        reason="",
        candidates=(Candidate("x", "precomputed", 0.5, {"support": 2.0}),),
        latency_ms=1.25,
        request_id="r",
    )
    assert result_from_proto(result_to_proto(result)) == result


# --------------------------------------------------------------------------- robustness


def test_unexpected_error_passes_through_without_leaking(settings: Settings) -> None:
    with (
        RewriteServer(settings, host="127.0.0.1", port=0, rewriter=BrokenRewriter(settings)) as srv,
        RewriteClient(srv.target) as rc,
    ):
        result = rc.rewrite(RewriteRequest("Play some Dell", "u", request_id="r-9"))
        with pytest.raises(InvalidRequestError):
            rc.rewrite(RewriteRequest("", "u"))
    assert result.rewritten is False
    assert result.rewrite == "Play some Dell"
    assert result.source == "none"
    assert result.reason == "internal_error"
    assert result.request_id == "r-9"
    assert "hunter2" not in repr(result)


def test_expired_call_is_shed_and_overrun_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rewrite.server")
    own = settings.model_copy(deep=True)
    own.service.request_deadline_s = 0.2
    rewriter = RecordingRewriter(own, delay_s=0.5)
    with (
        RewriteServer(own, host="127.0.0.1", port=0, rewriter=rewriter) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        rewrite = raw_rewrite(ch)
        slow = rewrite.future(rewrite_pb2.RewriteRequest(utterance="one", user_id="u"), timeout=5)
        poll_until = time.monotonic() + 2.0
        while not rewriter.requests and time.monotonic() < poll_until:
            time.sleep(0.01)
        assert len(rewriter.requests) == 1
        late = rewrite.future(rewrite_pb2.RewriteRequest(utterance="two", user_id="u"), timeout=0.1)
        assert slow.result().rewrite == "one"
        with pytest.raises(grpc.RpcError) as info:
            late.result()
        assert isinstance(info.value, grpc.Call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.3)
        assert [r.utterance for r in rewriter.requests] == ["one"]  # the late one did no work
    rewriter.close()
    assert any("over its 200.0 ms budget" in r.getMessage() for r in caplog.records)


def test_graceful_shutdown_drains_and_reports_not_serving(settings: Settings) -> None:
    rewriter = RecordingRewriter(settings, delay_s=0.3)
    srv = RewriteServer(settings, host="127.0.0.1", port=0, rewriter=rewriter).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            in_flight = raw_rewrite(ch).future(
                rewrite_pb2.RewriteRequest(utterance="Play some Dell", user_id="u"), timeout=5
            )
            poll_until = time.monotonic() + 2.0
            while not rewriter.requests and time.monotonic() < poll_until:
                time.sleep(0.01)
            stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 1.0})
            stopper.start()
            assert in_flight.result().rewrite != ""  # the in-flight call completed
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopper.join(timeout=10)
            assert not stopper.is_alive()
            with pytest.raises(grpc.RpcError) as info:
                raw_rewrite(ch)(rewrite_pb2.RewriteRequest(utterance="x", user_id="u"), timeout=1)
            assert isinstance(info.value, grpc.Call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(grace_s=0)
        rewriter.close()


def test_metrics_endpoint(settings: Settings) -> None:
    with (
        RewriteServer(settings, host="127.0.0.1", port=0, metrics_port=0) as srv,
        RewriteClient(srv.target) as rc,
    ):
        rc.rewrite(RewriteRequest("hello there", "u"))
        assert srv.metrics_port
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    assert "qrw_requests_total" in body
    assert "qrw_rewrite_latency_seconds_bucket" in body


SERVE_SCRIPT = """
import logging, sys
from rewrite.config import load_settings
from rewrite.server import serve
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
settings = load_settings()
settings.redis.url = sys.argv[1]
serve(settings, port=0)
"""


def test_serve_stops_gracefully_on_sigterm(redis_url: str) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, redis_url],
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    )
    watchdog = threading.Timer(30.0, proc.kill)  # bounds the blocking reads below
    watchdog.start()
    try:
        assert proc.stderr is not None
        target = None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"qrw gRPC server on (\S+) ", line)
            if match:
                target = match.group(1)
                break
        assert target is not None, "".join(lines)
        with RewriteClient(target) as rc:
            assert rc.health() == "SERVING"
            assert rc.rewrite(RewriteRequest("hello", "u")).rewrite == "hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        rest = proc.stderr.read()
        assert "received SIGTERM; draining" in rest
        assert "qrw gRPC server stopped" in rest
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- online threads


class _ThreadProbeStage:
    """An offloadable stage that records which thread ran it and when (and sleeps, releasing
    the GIL like ONNX Runtime or FAISS would)."""

    name = "thread_probe"
    offload = True
    seen: ClassVar[list[tuple[str, float, float]]] = []

    def __init__(self, resources: Any) -> None:
        del resources

    def warm_up(self) -> None:
        return None

    def run(self, state: RewriteState) -> RewriteState:
        start = time.monotonic()
        time.sleep(0.3)
        _ThreadProbeStage.seen.append((threading.current_thread().name, start, time.monotonic()))
        return state


@pytest.mark.parametrize("threads", [0, 2])
def test_online_stages_run_on_worker_threads(settings: Settings, threads: int) -> None:
    """With ``service.online_threads`` > 0 the offloadable stages run on ``qrw-online``
    worker threads, so two concurrent online requests overlap in time; with 0 they run on the
    event loop's thread, one after the other. A precomputed hit never leaves the loop."""
    from rewrite.pipeline import register_stage

    register_stage("thread_probe", _ThreadProbeStage)
    s = settings.model_copy(deep=True)
    s.service.pipeline = ["normalize", "precomputed", "thread_probe"]
    s.service.online_threads = threads
    s.service.online_inline_max_ms = 0.0  # the first of two calls must not run on the loop
    _ThreadProbeStage.seen.clear()
    with RewriteServer(s, host="127.0.0.1", port=0) as srv, RewriteClient(srv.target) as rc:
        results: list[RewriteResult] = []
        callers = [
            threading.Thread(
                target=lambda i=i: results.append(
                    rc.rewrite(RewriteRequest(utterance=f"probe {i}", user_id=f"u{i}"))
                )
            )
            for i in range(2)
        ]
        for t in callers:
            t.start()
        for t in callers:
            t.join(10.0)
    assert len(results) == 2 and all(not r.rewritten for r in results)
    names = [name for name, _, _ in _ThreadProbeStage.seen]
    assert len(names) == 2
    (_, _, e0), (_, s1, _) = sorted(_ThreadProbeStage.seen, key=lambda x: x[1])
    if threads:
        assert all(n.startswith("qrw-online") for n in names), names
        assert s1 < e0, "two online requests did not overlap on two worker threads"
    else:
        assert not any(n.startswith("qrw-online") for n in names), names
        assert s1 >= e0, "inline online stages overlapped"


class _CountingSlowStage:
    """An offloadable stage that sleeps 0.25 s and counts how often it ran (by name)."""

    offload = True
    runs: ClassVar[Counter[str]] = Counter()

    def __init__(self, resources: Any, name: str) -> None:
        del resources
        self.name = name

    def warm_up(self) -> None:
        return None

    def run(self, state: RewriteState) -> RewriteState:
        time.sleep(0.25)
        _CountingSlowStage.runs[self.name] += 1
        return state


def test_online_stages_stop_when_over_budget_or_abandoned(settings: Settings) -> None:
    """Three 0.25 s online stages. With a 0.4 s server budget the third never starts and the
    caller gets a pass-through (``over_budget``) instead of waiting. A call the client cancels
    after 0.1 s (budget 5 s, so only the cancellation can stop it) is flagged ``abandoned``
    and its worker stops after the stage it is in: the later stages never run for it."""
    from rewrite.pipeline import register_stage
    from rewrite.server import REWRITE_METHOD, request_to_proto

    for name in ("slow_a", "slow_b", "slow_c"):
        register_stage(name, lambda r, name=name: _CountingSlowStage(r, name))
    s = settings.model_copy(deep=True)
    s.service.pipeline = ["normalize", "precomputed", "slow_a", "slow_b", "slow_c"]
    s.service.online_threads = 2
    s.service.request_deadline_s = 0.4
    _CountingSlowStage.runs.clear()
    with RewriteServer(s, host="127.0.0.1", port=0) as srv, RewriteClient(srv.target, 5.0) as rc:
        t0 = time.monotonic()
        res = rc.rewrite(RewriteRequest(utterance="something slow", user_id="u1"))
        waited = time.monotonic() - t0
    assert not res.rewritten and res.reason == "over_budget"
    assert dict(_CountingSlowStage.runs) == {"slow_a": 1, "slow_b": 1}
    assert waited < 0.75  # two stages, not three

    s.service.request_deadline_s = 5.0
    # a cancellation reaches a request on a worker; one running inline on the event loop
    # (service idle, fast stages) is not interrupted by it but still stops at its budget
    s.service.online_inline_max_ms = 0.0
    _CountingSlowStage.runs.clear()
    with RewriteServer(s, host="127.0.0.1", port=0) as srv:
        channel = grpc.insecure_channel(srv.target)
        call = channel.unary_unary(
            REWRITE_METHOD,
            request_serializer=rewrite_pb2.RewriteRequest.SerializeToString,
            response_deserializer=rewrite_pb2.RewriteResponse.FromString,
        )
        future = call.future(
            request_to_proto(RewriteRequest(utterance="nobody waits", user_id="u2")), timeout=5.0
        )
        time.sleep(0.1)
        assert future.cancel()
        time.sleep(0.9)  # the worker finishes slow_a; without the flag it would be in slow_c
        assert dict(_CountingSlowStage.runs) == {"slow_a": 1}
        channel.close()
