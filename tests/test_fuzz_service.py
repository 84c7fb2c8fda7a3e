"""Bad input to the service: property-based tests (hypothesis) and a bounded fuzz run of the
gRPC API, plus its message-size limit and per-call deadlines.

The contract under test (README "The service"): every request gets either a well-formed
response or ``INVALID_ARGUMENT`` with a message; a message over ``service.max_message_bytes``
gets ``RESOURCE_EXHAUSTED``; nothing else (``UNKNOWN``, ``INTERNAL``, ...) ever reaches the
caller, the server never crashes and its memory stays flat. The API has no batch RPC
(``proto/queryrewrite/v1/rewrite.proto`` has only the unary ``Rewrite``), so there are no
batch limits to test.

Everything runs against the full pipeline of a real published version: the module publishes
a small nightly run (catalog, personal histories, FAISS index of the zero-shot DPR encoder)
plus two precomputed pairs into its own embedded Redis, so fuzzed text reaches normalization,
the pair lookup, the ONNX query encoder, FAISS, the personal store and the reranker, not just
the validator. Requests are checked against an independent statement of the contract
(:func:`violations`), so a valid request that is refused fails the test as much as an invalid
one that is answered.

Already covered in ``tests/test_server.py`` (not repeated here): one example of each invalid
request, a message far over the limit, a call whose deadline passed while it queued (shed
without running), an overrun against ``service.request_deadline_s`` (logged), and drain on
shutdown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from procs import SERVING_LINE, start_qrw_serve, stop_process, wait_for_log

from offline.job import run_nightly
from rewrite import keyspace
from rewrite._pb.queryrewrite.v1 import rewrite_pb2 as pb
from rewrite.client import RewriteClient, rewrite_stub
from rewrite.config import FULL_PIPELINE, ServiceSettings, Settings, load_settings
from rewrite.normalize import normalize_utterance
from rewrite.pipeline import RewriteState
from rewrite.redis_server import EmbeddedRedis
from rewrite.rewriter import Rewriter
from rewrite.server import (
    MAX_STATUS_MESSAGE_CHARS,
    REWRITE_METHOD,
    RewriteServer,
    request_from_proto,
    result_to_proto,
)
from rewrite.store import MembershipFilter
from rewrite.types import InvalidRequestError, RewriteRequest, RewriteResult

pytestmark = pytest.mark.integration

#: Limits the strategies are built around (the fixtures check the served settings agree).
LIMITS: ServiceSettings = load_settings().service
ARMS: tuple[str, ...] = tuple(load_settings().experiment.arms)
DEFAULT_ARM: str = load_settings().experiment.default_arm
SOURCES = frozenset({"precomputed", "global", "personal", "none"})
#: Statuses a caller may ever see from Rewrite (RESOURCE_EXHAUSTED only for big messages).
ALLOWED = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
CALL_TIMEOUT_S = 20.0  # generous: the sandbox shares its 2 cores with other work

#: Hypothesis settings: deterministic (derandomize, no example database) and bounded.
FUZZ = hsettings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- the data

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
PAIRS = {
    "play some dell": ("play songs by adele", 0.87),
    "turn of the lights": ("turn off the lights", 0.93),
}
#: Utterances that reach each layer (precomputed, global, personal for "bob", pass-through).
KNOWN = (
    "play some dell",
    "turn of the lights",
    "what's the weather in wilkerson",
    "what's the weather in wilmington",
    "play some jazz",
    "set a timer for ten minutes",
)


def _row(tid: str, user: str, sec: float, utt: str) -> str:
    ts = (T0 + timedelta(seconds=sec)).isoformat().replace("+00:00", "Z")
    return json.dumps(
        {"turn_id": tid, "user_id": user, "timestamp": ts, "utterance": utt, "response": "Ok."}
    )


def _logs(path: Path) -> Path:
    """Six users succeed with "...wilmington", bob with "...wilkesboro" (the layout of
    ``tests/test_online.py``), carol with "play some jazz"."""
    rows = [
        _row(f"user{k}-w{d}", f"user{k}", k * 5000 + d * 1000, "what's the weather in wilmington")
        for k in range(6)
        for d in range(2)
    ]
    rows += [
        _row(f"bob-w{d}", "bob", 90000 + d * 1000, "what's the weather in wilkesboro")
        for d in range(4)
    ]
    rows += [_row(f"carol-{d}", "carol", 120000 + d * 1000, "play some jazz") for d in range(2)]
    path.write_text("\n".join(rows) + "\n")
    return path


@dataclass(frozen=True)
class FuzzEnv:
    """A Redis holding a published version with an online index, and settings serving it."""

    settings: Settings
    redis_url: str
    version: str
    env: dict[str, str]  # environment that makes a `qrw serve` subprocess serve the same


@pytest.fixture(scope="module")
def fuzz_env(
    settings: Settings, dpr_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzEnv]:
    """Own embedded Redis with one published version (pairs + online index + histories)."""
    root = tmp_path_factory.mktemp("fuzz")
    own_redis = EmbeddedRedis(root / "redis")
    own_redis.start()
    try:
        s = settings.model_copy(deep=True)
        s.redis.url = own_redis.url
        s.dpr.artifacts_dir = dpr_dir
        s.dpr.index_root = root / "index"
        s.rerank.artifacts_dir = root / "no-ranker"  # the heuristic ranker
        s.rerank.trigger_threshold = 0.55  # as in tests/test_online.py (zero-shot MiniLM)
        s.service.pipeline = list(FULL_PIPELINE)
        assert s.service.model_dump(exclude={"pipeline"}) == LIMITS.model_dump(
            exclude={"pipeline"}
        ), "the strategies assume the configured service limits"
        assert tuple(s.experiment.arms) == ARMS and not s.experiment.enabled
        report = run_nightly([_logs(root / "day.jsonl")], root / "run", s, publish=True)
        assert report.publish is not None and report.online is not None
        version = str(report.publish["version"])
        client = redis.Redis.from_url(own_redis.url, decode_responses=True)
        for normalized, (target, confidence) in PAIRS.items():
            client.hset(
                keyspace.pair_key(version, normalized),
                mapping={"rewrite": target, "confidence": confidence, "support": 9, "n_users": 4},
            )
        # pairs added by hand: the version's pair-source filter must name them too
        prefix = keyspace.pair_key(version, "")
        sources = [k.removeprefix(prefix) for k in client.scan_iter(match=prefix + "*")]
        client.set(keyspace.pair_sources_key(version), MembershipFilter.build(sources).to_bytes())
        client.close()
        env = {
            "REDIS_URL": own_redis.url,
            "QRW_DPR__ARTIFACTS_DIR": str(dpr_dir),
            "QRW_DPR__INDEX_ROOT": str(root / "index"),
            "QRW_RERANK__ARTIFACTS_DIR": str(root / "no-ranker"),
            "QRW_RERANK__TRIGGER_THRESHOLD": "0.55",
        }
        yield FuzzEnv(s, own_redis.url, version, env)
    finally:
        own_redis.stop()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_env: FuzzEnv) -> Iterator[RewriteServer]:
    """A real server on 127.0.0.1 serving the fuzz version with every layer on."""
    server = RewriteServer(fuzz_env.settings, host="127.0.0.1", port=0).start()
    try:
        with RewriteClient(server.target, timeout_s=CALL_TIMEOUT_S) as rc:
            hit = rc.rewrite(RewriteRequest("what's the weather in wilkerson", "bob"))
        assert (hit.source, hit.model_version) == ("personal", fuzz_env.version), hit
        yield server
    finally:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def fuzz_rewriter(fuzz_env: FuzzEnv) -> Iterator[Rewriter]:
    """An in-process Rewriter over the same version."""
    rewriter = Rewriter(fuzz_env.settings)
    rewriter.warm_up()
    try:
        yield rewriter
    finally:
        rewriter.close()


@pytest.fixture(scope="module")
def rpc(fuzz_server: RewriteServer) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """``Rewrite`` on a plain channel (status codes as they are, no client wrapping)."""
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield rewrite_stub(channel)


@pytest.fixture(scope="module")
def raw_rpc(fuzz_server: RewriteServer) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    """``Rewrite`` taking and returning raw bytes (to send undecodable requests)."""
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel.unary_unary(
            REWRITE_METHOD, request_serializer=None, response_deserializer=None
        )


# --------------------------------------------------------------------------- the contract


def _bad_control(text: str) -> bool:
    """C0 controls other than tab/newline/CR, and DEL (the documented rule)."""
    return any((ord(c) < 32 and c not in "\t\n\r") or c == "\x7f" for c in text)


def test_validator_flags_exactly_the_contract_control_characters() -> None:
    """The validator's scan (one regex) flags exactly the contract's characters, tried
    alone and inside text at every code point of the Basic Multilingual Plane."""
    from rewrite.rewriter import _has_bad_control_chars

    for cp in range(0x10000):
        c = chr(cp)
        assert _has_bad_control_chars(c) == _bad_control(c), hex(cp)
        assert _has_bad_control_chars(f"turn {c} on") == _bad_control(f"turn {c} on"), hex(cp)
    assert not _has_bad_control_chars("")


def violations(req: pb.RewriteRequest, svc: ServiceSettings = LIMITS) -> list[str]:
    """Every way ``req`` breaks the API contract, as a fragment its error message contains.

    Written from the contract (README, proto comments, ``service.*`` limits), not from the
    validator: the service reports the first violation it finds, so an invalid request's
    message must contain one of these fragments; a request with none must be answered.
    """
    out: list[str] = []
    u = req.utterance
    if not u.strip():
        out.append("utterance is required")
    if len(u) > svc.max_utterance_chars:
        out.append("utterance too long")
    if _bad_control(u):
        out.append("control characters")
    if not req.user_id.strip():
        out.append("user_id is required")
    if len(req.user_id) > svc.max_user_id_chars:
        out.append("user_id longer than")
    if len(req.request_id) > svc.max_request_id_chars:
        out.append("request_id longer than")
    if len(req.context) > svc.max_context_turns:
        out.append("too many context turns")
    for i, turn in enumerate(req.context):
        if math.isnan(turn.seconds_ago) or turn.seconds_ago < 0:
            out.append(f"context[{i}].seconds_ago")
        if len(turn.utterance) > svc.max_utterance_chars:
            out.append(f"context[{i}].utterance too long")
    if req.arm and req.arm not in ARMS:
        out.append("unknown arm")
    return out


def check_response(req: pb.RewriteRequest, resp: pb.RewriteResponse) -> None:
    """A well-formed answer to a valid ``req`` (rewrite or pass-through, never an error)."""
    assert isinstance(resp.rewrite, str)
    assert resp.source in SOURCES, resp.source
    assert resp.arm == (req.arm or DEFAULT_ARM)
    assert math.isfinite(resp.latency_ms) and resp.latency_ms >= 0.0
    assert 0.0 <= resp.confidence <= 1.0
    assert resp.request_id == req.request_id
    if resp.reason == "control_arm":  # the control arm runs no stage, not even normalize
        assert resp.normalized == "" and not resp.rewritten
    else:
        assert resp.normalized == normalize_utterance(req.utterance)
    assert resp.reason != "internal_error", "an unexpected exception inside the Rewriter"
    if resp.rewritten:
        assert resp.source != "none" and resp.rewrite and resp.reason == ""
    else:
        assert (resp.source, resp.rewrite, resp.confidence) == ("none", req.utterance, 0.0)
        assert resp.reason
    if not req.explain:
        assert not resp.candidates
    for cand in resp.candidates:
        assert cand.source in SOURCES and math.isfinite(cand.score)


def check_status(
    req_size: int, problems: Sequence[str], code: grpc.StatusCode, details: str
) -> None:
    """The status a request of ``req_size`` bytes with ``problems`` must get."""
    assert code in ALLOWED, (code, details)
    if req_size > LIMITS.max_message_bytes:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    elif problems:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details, problems)
        assert details and len(details) <= MAX_STATUS_MESSAGE_CHARS
        assert any(p in details for p in problems), (details, problems)
    else:
        assert code == grpc.StatusCode.OK, (code, details)


def call(rpc: grpc.UnaryUnaryMultiCallable, request: Any) -> tuple[grpc.StatusCode, str, Any]:
    """One call: ``(status, details, response or None)``."""
    try:
        return grpc.StatusCode.OK, "", rpc(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        return err.code(), err.details() or "", None


# --------------------------------------------------------------------------- strategies


def _chars(*ranges: tuple[int, int]) -> st.SearchStrategy[str]:
    return st.one_of(*(st.characters(min_codepoint=a, max_codepoint=b) for a, b in ranges))


LATIN = _chars((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF))
CYRILLIC = _chars((0x0400, 0x04FF))
CJK = _chars((0x4E00, 0x9FFF))
ARABIC = _chars((0x0600, 0x06FF))
DEVANAGARI = _chars((0x0900, 0x097F))
#: Emoji code points, plus ZWJ, variation selector and skin-tone modifier on their own.
EMOJI = st.one_of(
    _chars((0x1F300, 0x1FAFF), (0x2600, 0x27BF)),
    st.sampled_from(["\u200d", "\ufe0f", "\U0001f3fd"]),
)
#: Multi-code-point emoji: a flag (regional indicators) and a ZWJ family with a skin tone.
EMOJI_SEQUENCE = st.sampled_from(
    ["\U0001f1fa\U0001f1f8", "👩\u200d👩\u200d👧", "👍\U0001f3fd", "❤️"]
)
CONTROL = _chars((0x00, 0x1F), (0x7F, 0x9F))
WHITESPACE = st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2003\u2028\u2029\u3000"))
#: Any Unicode scalar value a proto string can carry (no surrogates).
ANY_CHAR = st.characters(codec="utf-8")
SPACE = st.just(" ")


def _text(
    alphabet: st.SearchStrategy[str], max_size: int = 80, min_size: int = 0
) -> st.SearchStrategy[str]:
    """Text of ``alphabet`` elements (single characters or multi-code-point pieces)."""
    return st.lists(alphabet, min_size=min_size, max_size=max_size).map("".join)


def _repeat(base: str, n: int) -> str:
    """``base`` repeated to exactly ``n`` characters (cheap long strings)."""
    return (base * (n // len(base) + 1))[:n]


def long_text(sizes: Sequence[int]) -> st.SearchStrategy[str]:
    """Strings of exactly one of ``sizes`` characters (or a random size up to the largest)."""
    base = _text(st.one_of(LATIN, CJK, EMOJI, EMOJI_SEQUENCE, SPACE, ANY_CHAR), 12, min_size=1)
    size = st.one_of(st.sampled_from(sizes), st.integers(1, max(sizes)))
    return st.builds(_repeat, base, size)


MAX_U = LIMITS.max_utterance_chars
UTTERANCE = st.one_of(
    st.sampled_from(KNOWN),
    st.builds(
        lambda text, upper, punct: (text.upper() if upper else text) + punct,
        st.sampled_from(KNOWN),
        st.booleans(),
        st.sampled_from(["", "?!", " …", "  ", "\u200b", "\t"]),
    ),
    st.just(""),
    _text(WHITESPACE, max_size=20, min_size=1),
    _text(st.one_of(LATIN, CYRILLIC, CJK, ARABIC, DEVANAGARI, SPACE)),
    _text(st.one_of(EMOJI, EMOJI_SEQUENCE, LATIN, SPACE)),
    _text(st.one_of(CONTROL, LATIN, SPACE), min_size=1),
    _text(ANY_CHAR, max_size=200),
    long_text([MAX_U - 1, MAX_U, MAX_U + 1, 5_000, 100_000]),
)
USER_ID = st.one_of(
    st.sampled_from(["bob", "alice", "user0", "carol"]),
    st.just(""),
    _text(WHITESPACE, max_size=5, min_size=1),
    _text(ANY_CHAR, max_size=40, min_size=1),
    long_text([LIMITS.max_user_id_chars, LIMITS.max_user_id_chars + 1, 10_000]),
)
SECONDS_AGO = st.one_of(
    st.floats(min_value=0.0, max_value=3600.0),
    st.floats(allow_nan=True, allow_infinity=True),
)
CONTEXT_TURN = st.builds(
    lambda utterance, response, seconds_ago, barge_in: pb.ContextTurn(
        utterance=utterance, response=response, seconds_ago=seconds_ago, barge_in=barge_in
    ),
    st.one_of(st.sampled_from(KNOWN), _text(ANY_CHAR), long_text([MAX_U, MAX_U + 1, 50_000])),
    st.one_of(st.just(""), _text(ANY_CHAR, max_size=40), long_text([20_000])),
    SECONDS_AGO,
    st.booleans(),
)
CONTEXT: st.SearchStrategy[list[pb.ContextTurn]] = st.one_of(
    st.just([]),
    st.lists(CONTEXT_TURN, max_size=4),
    st.lists(
        CONTEXT_TURN, min_size=LIMITS.max_context_turns, max_size=LIMITS.max_context_turns + 3
    ),
)
ARM = st.one_of(
    st.just(""),
    st.sampled_from(ARMS),
    _text(ANY_CHAR, max_size=30, min_size=1),
    long_text([20_000]),
)
REQUEST_ID = st.one_of(
    st.just(""),
    _text(ANY_CHAR, max_size=40),
    long_text([LIMITS.max_request_id_chars, LIMITS.max_request_id_chars + 1, 100_000]),
)
#: Each field: a strategy of valid values and one of anything (valid or not).
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "utterance": st.sampled_from(KNOWN),
    "user_id": st.sampled_from(["bob", "alice", "user3"]),
    "context": st.just([]),
    "device_id": st.just("echo-1"),
    "locale": st.just("en-US"),
    "arm": st.sampled_from(["", *ARMS]),
    "explain": st.booleans(),
    "request_id": st.just("r-1"),
}
WILD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "utterance": UTTERANCE,
    "user_id": USER_ID,
    "context": CONTEXT,
    "device_id": _text(ANY_CHAR, max_size=20),
    "locale": st.sampled_from(["", "en-US", "de-DE", "ar-EG", "hi-IN", "zh-CN", "xx"]),
    "arm": ARM,
    "explain": st.booleans(),
    "request_id": REQUEST_ID,
}


def _request(**fields: Any) -> pb.RewriteRequest:
    return pb.RewriteRequest(**fields)


#: Requests with every field fuzzed (most of them break the contract somewhere).
WILD_REQUESTS = st.builds(_request, **WILD_FIELDS)
#: Valid requests but for one fuzzed field (so each field's own check is reached: the service
#: reports only the first violation it finds).
ONE_FIELD_REQUESTS = st.one_of(
    *(st.builds(_request, **{**VALID_FIELDS, name: WILD_FIELDS[name]}) for name in WILD_FIELDS)
)
#: Requests whose only odd part is the text (so they get past validation and through every
#: stage: normalization, pair lookup, encoder, FAISS, personal store, reranker, trigger).
TEXT_REQUESTS = st.builds(
    _request,
    utterance=UTTERANCE,
    user_id=st.one_of(st.sampled_from(["bob", "alice", "user3"]), _text(ANY_CHAR, 20, 1)),
    context=st.lists(
        st.builds(
            lambda u, s: pb.ContextTurn(utterance=u, seconds_ago=s),
            st.one_of(st.sampled_from(KNOWN), _text(ANY_CHAR)),
            st.floats(min_value=0.0, allow_infinity=True),
        ),
        max_size=3,
    ),
    arm=st.sampled_from(["", *ARMS]),
    explain=st.booleans(),
    request_id=_text(ANY_CHAR, max_size=20),
)
REQUESTS = st.one_of(WILD_REQUESTS, ONE_FIELD_REQUESTS, TEXT_REQUESTS)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Byte edits of a serialized request: ``(position, value)``; value 256 deletes."""
    buf = bytearray(data)
    for pos, value in edits:
        if not buf:
            break
        i = pos % len(buf)
        if value == 256:
            del buf[i]
        else:
            buf[i] = value
    return bytes(buf)


RAW_REQUESTS = st.one_of(
    st.binary(max_size=300),
    st.builds(
        _mutate,
        REQUESTS.map(lambda r: r.SerializeToString()).filter(lambda b: len(b) < 20_000),
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 256)), min_size=1, max_size=4),
    ),
)


# --------------------------------------------------------------------------- hypothesis


def test_fuzzed_requests_get_a_response_or_invalid_argument(
    rpc: grpc.UnaryUnaryMultiCallable, fuzz_server: RewriteServer
) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(req=REQUESTS)
    def one(req: pb.RewriteRequest) -> None:
        problems = violations(req)
        code, details, resp = call(rpc, req)
        check_status(req.ByteSize(), problems, code, details)
        seen[code.name] += 1
        if resp is not None:
            check_response(req, resp)
            seen[f"source:{resp.source}"] += 1

    one()
    # the strategies reached every outcome, including real rewrites by every layer
    for key in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "source:none"):
        assert seen[key] > 0, seen
    assert seen["source:precomputed"] + seen["source:global"] + seen["source:personal"] > 0, seen
    with RewriteClient(fuzz_server.target) as rc:
        assert rc.health() == "SERVING"


def test_fuzzed_requests_in_process(fuzz_rewriter: Rewriter) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(req=REQUESTS)
    def one(req: pb.RewriteRequest) -> None:
        problems = violations(req)
        try:
            result = fuzz_rewriter.rewrite(request_from_proto(req))
        except InvalidRequestError as err:
            assert problems, f"valid request refused: {err}"
            assert any(p in str(err) for p in problems), (str(err), problems)
            seen["invalid"] += 1
            return
        assert not problems, f"invalid request answered: {problems}"
        assert isinstance(result, RewriteResult)
        check_response(req, result_to_proto(result))
        seen[result.source] += 1

    one()
    assert seen["invalid"] > 0 and seen["none"] > 0, seen
    assert seen["precomputed"] + seen["global"] + seen["personal"] > 0, seen


def test_undecodable_request_bytes_get_invalid_argument(
    raw_rpc: grpc.UnaryUnaryMultiCallable,
) -> None:
    seen: Counter[str] = Counter()

    @FUZZ
    @given(data=RAW_REQUESTS)
    def one(data: bytes) -> None:
        code, details, out = call(raw_rpc, data)
        try:
            req = pb.RewriteRequest.FromString(data)
        except DecodeError:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert details.startswith("malformed RewriteRequest"), details
            seen["malformed"] += 1
            return
        check_status(len(data), violations(req), code, details)
        if out is not None:
            check_response(req, pb.RewriteResponse.FromString(out))
        seen[code.name] += 1

    one()
    assert seen["malformed"] > 0 and seen["INVALID_ARGUMENT"] + seen["OK"] > 0, seen


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    ("name", "request_", "fragment"),
    [
        # a long unknown arm was quoted whole in the status message, whose trailer then broke
        # gRPC's 16 KiB metadata limit: the caller saw RESOURCE_EXHAUSTED for a small request
        ("long arm", pb.RewriteRequest(utterance="hi", user_id="u", arm="x" * 20_000), "arm"),
        ("arm é", pb.RewriteRequest(utterance="hi", user_id="u", arm="é" * 3_000), "(3000 chars)"),
        # request_id is echoed: a request just under the limit got a response over it
        # ("Sent message larger than max" as RESOURCE_EXHAUSTED)
        (
            "long request_id",
            pb.RewriteRequest(utterance="漢" * 1000, user_id="u", request_id="x" * 255_000),
            "request_id longer than 256 chars",
        ),
    ],
)
def test_regressions_found_by_fuzzing(
    rpc: grpc.UnaryUnaryMultiCallable, name: str, request_: pb.RewriteRequest, fragment: str
) -> None:
    assert request_.ByteSize() <= LIMITS.max_message_bytes
    code, details, _ = call(rpc, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
    assert fragment in details and len(details) <= MAX_STATUS_MESSAGE_CHARS


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff",  # corrupt wire format (was UNKNOWN)
        b"\x0a\x02\xc3\x28\x12\x01u",  # utterance with invalid UTF-8 (was UNKNOWN)
    ],
)
def test_malformed_bytes_regression(raw_rpc: grpc.UnaryUnaryMultiCallable, data: bytes) -> None:
    code, details, _ = call(raw_rpc, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("malformed RewriteRequest: Error parsing message")


# --------------------------------------------------------------------------- limits


def _padded(size: int) -> pb.RewriteRequest:
    """A valid request of exactly ``size`` serialized bytes (padding in ``device_id``, which
    the service neither validates nor echoes)."""
    req = pb.RewriteRequest(utterance="play some dell", user_id="u")
    base = req.ByteSize()
    for n in range(max(0, size - base - 6), size - base):  # tag + length prefix: 2-6 bytes
        req.device_id = "d" * n
        if req.ByteSize() == size:
            return req
    raise AssertionError(f"cannot build a {size}-byte request")


def test_message_size_limit_boundary(rpc: grpc.UnaryUnaryMultiCallable) -> None:
    limit = LIMITS.max_message_bytes
    at_limit = _padded(limit)
    code, details, resp = call(rpc, at_limit)
    assert code == grpc.StatusCode.OK, details
    assert resp.rewrite == "play songs by adele"  # processed, not just accepted
    code, details, _ = call(rpc, _padded(limit + 1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert str(limit) in details  # gRPC names the limit: "... larger than max (N vs. limit)"
    code, _, resp = call(rpc, pb.RewriteRequest(utterance="turn of the lights", user_id="u"))
    assert code == grpc.StatusCode.OK and resp.rewrite == "turn off the lights"


class SlowRewriter(Rewriter):
    """A real Rewriter whose calls take ``delay_s`` longer (blocking, like CPU work)."""

    def __init__(self, settings: Settings, delay_s: float) -> None:
        super().__init__(settings)
        self.delay_s = delay_s
        self.calls = 0

    def prepare(self, request: RewriteRequest) -> RewriteState:
        self.calls += 1
        time.sleep(self.delay_s)
        return super().prepare(request)


def _budgets_logged(caplog: pytest.LogCaptureFixture) -> list[float]:
    """Budgets (ms) named by the server's overrun warnings so far."""
    found = []
    for rec in caplog.records:
        m = re.search(r"over its ([0-9.]+) ms budget", rec.getMessage())
        if m and rec.name == "rewrite.server":
            found.append(float(m.group(1)))
    return found


def test_client_deadline_shorter_than_the_work(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A call running past the client's deadline: the client gets DEADLINE_EXCEEDED, the
    overrun is logged against the client's (shorter) budget, and the server keeps serving.
    A call without a client deadline is budgeted ``service.request_deadline_s``."""
    caplog.set_level(logging.WARNING, logger="rewrite.server")
    own = settings.model_copy(deep=True)
    own.service.request_deadline_s = 0.25
    rewriter = SlowRewriter(own, delay_s=0.4)
    try:
        with (
            RewriteServer(own, host="127.0.0.1", port=0, rewriter=rewriter) as srv,
            grpc.insecure_channel(srv.target) as ch,
            RewriteClient(srv.target, timeout_s=5.0) as rc,
        ):
            rewrite = rewrite_stub(ch)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                rewrite(pb.RewriteRequest(utterance="hello", user_id="u"), timeout=0.1)
            assert isinstance(info.value, grpc.Call)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.35  # the client did not wait for the work
            deadline = time.monotonic() + 3.0
            while not _budgets_logged(caplog) and time.monotonic() < deadline:
                time.sleep(0.02)
            (client_budget,) = _budgets_logged(caplog)
            # the client's 100 ms deadline, not the 250 ms cap; gRPC rounds the grpc-timeout
            # header up when it encodes it, so the server can see a few ms more (100.6 seen)
            assert 0.0 < client_budget <= 120.0

            # no client deadline: the call completes, over the server's own 250 ms budget
            resp = rewrite(pb.RewriteRequest(utterance="play some dell", user_id="u"))
            assert resp.source in SOURCES and resp.rewrite
            assert _budgets_logged(caplog)[1:] == [250.0]

            rewriter.delay_s = 0.0  # the server kept serving
            assert rc.health() == "SERVING"
            assert rc.rewrite(RewriteRequest("hello again", "u")).rewrite == "hello again"
            assert rewriter.calls == 3
    finally:
        rewriter.close()


# --------------------------------------------------------------------------- fuzz run


def random_request(rng: random.Random) -> pb.RewriteRequest:
    """One random request for the fuzz run: the families of the hypothesis strategies (every
    field wild / one wild field in a valid request / only the text odd), drawn with a seeded
    ``random.Random`` so client threads can generate thousands cheaply."""
    pools = {
        "latin": "abcdefghijklmnopqrstuvwxyz ÀÉßñ",
        "cyrillic": "".join(map(chr, range(0x0410, 0x0450))) + " ",
        "cjk": "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(32)),
        "arabic": "".join(map(chr, range(0x0621, 0x064B))) + " ",
        "devanagari": "".join(map(chr, range(0x0905, 0x0940))) + " ",
        "emoji": "😀🎶👩‍👩‍👧🇺🇸🏽❤️\u200d ",
        "control": "".join(map(chr, range(32))) + "\x7f\x85\x9f abc",
        "whitespace": " \t\n\r\u00a0\u2003\u3000",
    }

    def text(n: int, kinds: Sequence[str] = (*pools, "any", "known")) -> str:
        kind = rng.choice(kinds)
        if kind == "known":
            return rng.choice(KNOWN)
        if kind == "any":
            chars: list[str] = []
            while len(chars) < n:
                c = rng.randrange(0x110000)
                if not 0xD800 <= c < 0xE000:
                    chars.append(chr(c))
            return "".join(chars)
        return "".join(rng.choice(pools[kind]) for _ in range(n))

    def size() -> int:
        return rng.choice([0, 1, 5, 20, 60, MAX_U, MAX_U + 1, rng.randrange(1, 3000)])

    def wild_utterance() -> str:
        if rng.random() < 0.03:
            return _repeat(text(20) or "x", 100_000)
        return text(size())

    def wild_context() -> list[pb.ContextTurn]:
        n = rng.choice([0, 1, 3, LIMITS.max_context_turns, LIMITS.max_context_turns + 1])
        return [
            pb.ContextTurn(
                utterance=text(rng.choice([0, 10, 40, MAX_U + 1])),
                response=text(rng.choice([0, 20])),
                seconds_ago=rng.choice([0.0, 3.5, -1.0, math.inf, math.nan, rng.uniform(0, 600)]),
                barge_in=rng.random() < 0.3,
            )
            for _ in range(n)
        ]

    wild: dict[str, Callable[[], Any]] = {
        "utterance": wild_utterance,
        "user_id": lambda: rng.choice(["bob", "", " ", text(8), "u" * 300]),
        "context": wild_context,
        "device_id": lambda: text(rng.choice([0, 8])),
        "arm": lambda: rng.choice(["", *ARMS, text(6), "a" * 5000]),
        "request_id": lambda: rng.choice(["", "r-1", "q" * 257]),
    }
    fields: dict[str, Any] = {
        "utterance": rng.choice(KNOWN),
        "user_id": rng.choice(["bob", "alice", "user3"]),
        "locale": rng.choice(["", "en-US", "hi-IN"]),
        "arm": rng.choice(["", *ARMS]),
        "explain": rng.random() < 0.3,
        "request_id": f"r-{rng.randrange(10**6)}",
    }
    mode = rng.random()
    if mode < 0.25:  # every field wild
        fields.update({name: make() for name, make in wild.items()})
    elif mode < 0.6:  # one wild field
        name = rng.choice(list(wild))
        fields[name] = wild[name]()
    else:  # only the text is odd (no control characters): reaches every stage
        kinds = [k for k in (*pools, "known") if k not in ("control", "whitespace")]
        fields["utterance"] = text(rng.choice([1, 5, 20, 60, MAX_U]), kinds)
    return pb.RewriteRequest(**fields)


def run_fuzz(
    target: str, n: int, threads: int, seed: int, deadline_s: float
) -> tuple[Counter[str], list[str]]:
    """``n`` random requests over ``threads`` client threads (one channel each).

    Returns:
        Status counts, and every contract failure (empty when all calls behaved).
    """
    counts: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with grpc.insecure_channel(target) as channel:
            rewrite = channel.unary_unary(
                REWRITE_METHOD,
                request_serializer=pb.RewriteRequest.SerializeToString,
                response_deserializer=pb.RewriteResponse.FromString,
            )
            for _ in range(k, n, threads):
                if time.monotonic() > stop_at:
                    with lock:
                        failures.append("fuzz run over its time bound")
                    return
                req = random_request(rng)
                code, details, resp = call(rewrite, req)
                try:
                    check_status(req.ByteSize(), violations(req), code, details)
                    if resp is not None:
                        check_response(req, resp)
                except AssertionError as err:
                    with lock:
                        failures.append(f"{code.name}: {err!r} for {str(req)[:300]!r}")
                with lock:
                    counts[code.name] += 1
                    if resp is not None:
                        counts[f"source:{resp.source}"] += 1

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(deadline_s + 30.0)
    assert not any(t.is_alive() for t in pool), "fuzz client threads did not finish"
    return counts, failures


def rss_mb(pid: int) -> float:
    """Resident set size of a process (``VmRSS`` in ``/proc/<pid>/status``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


#: Allowed RSS growth of the server over the measured run (3,000 calls after a 600-call
#: warm-up), MiB. What may grow legitimately: the query encoder's LRU of query vectors (one
#: entry per distinct normalized text, ~1.7 KB each: < 5 MiB for 3,000 calls), the metaphone
#: LRU (tens of bytes per entry) and allocator slack. Measured on the 2-core sandbox: -1.5 to
#: -1.1 MiB over three runs; with the server made to keep every request proto (a leak of
#: ~5 KB per call on average here) it grew +18 MiB, which this bound catches.
RSS_GROWTH_BOUND_MB = 12.0


@pytest.mark.slow
def test_bounded_fuzz_run_against_qrw_serve(fuzz_env: FuzzEnv, tmp_path: Path) -> None:
    """3,000 random requests over 4 threads against ``qrw serve`` in its own process: every
    status is allowed, the server is alive and healthy afterwards, answers a normal request,
    logged no unexpected exception, and its RSS stayed flat."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "QRW_REDIS__URL"}
    env.update(fuzz_env.env, PYTHONPATH=str(root))
    log_path = tmp_path / "serve.log"
    proc = start_qrw_serve(log_path, env, root)
    try:
        target = wait_for_log(SERVING_LINE, log_path, proc, timeout_s=90.0)
        assert target.startswith("127.0.0.1:")
        with RewriteClient(target, timeout_s=CALL_TIMEOUT_S) as rc:
            hit = rc.rewrite(RewriteRequest("what's the weather in wilkerson", "bob"))
            assert (hit.source, hit.model_version) == ("personal", fuzz_env.version)

        _, warm_failures = run_fuzz(target, n=600, threads=4, seed=1, deadline_s=120.0)
        assert not warm_failures, warm_failures[:5]
        time.sleep(0.5)
        before = rss_mb(proc.pid)
        started = time.monotonic()
        counts, failures = run_fuzz(target, n=3000, threads=4, seed=2, deadline_s=240.0)
        took = time.monotonic() - started
        time.sleep(0.5)
        after = rss_mb(proc.pid)

        assert not failures, f"{len(failures)} contract failures, e.g. {failures[:5]}"
        assert sum(v for k, v in counts.items() if not k.startswith("source:")) == 3000
        assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(counts), counts
        assert counts["source:none"] and counts["source:personal"] + counts["source:global"]
        assert proc.poll() is None, "the server process died"
        with RewriteClient(target, timeout_s=CALL_TIMEOUT_S) as rc:
            assert rc.health() == "SERVING"
            ok = rc.rewrite(RewriteRequest("play some dell", "u"))
            assert ok.rewrite == "play songs by adele"
        growth = after - before
        print(f"fuzz run: {counts} in {took:.1f} s; RSS {before:.1f} -> {after:.1f} MiB")
        assert growth < RSS_GROWTH_BOUND_MB, (
            f"RSS grew {growth:.1f} MiB ({before:.1f} -> {after:.1f})"
        )
        proc.terminate()  # SIGTERM: graceful drain, exit status 0
        assert proc.wait(timeout=30) == 0
        logged = log_path.read_text()
        assert "qrw gRPC server stopped" in logged
        assert "Traceback" not in logged and "Rewrite failed" not in logged, logged[-3000:]
    finally:
        stop_process(proc)
