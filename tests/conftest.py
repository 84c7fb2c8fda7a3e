"""Shared pytest fixtures: a real Redis and a real gRPC server on 127.0.0.1.

Fixtures (reuse them from any test module):

- ``redis_server`` (session): an :class:`~rewrite.redis_server.EmbeddedRedis` in a temp dir,
  started once and stopped by its handle at the end; ``None`` when ``REDIS_URL`` is set (that
  server is used instead and nothing is started).
- ``redis_url`` (session): URL of that Redis (``unix://...`` or ``$REDIS_URL``).
- ``settings`` (session): :func:`~rewrite.config.load_settings` with ``redis.url`` pointed at
  ``redis_url``. Shared: don't mutate it; take ``settings.model_copy(deep=True)`` to change.
- ``clean_redis`` (function): FLUSHDB, then a ``redis.Redis`` client (``decode_responses``)
  on ``redis_url``.
- ``_isolated_forget_file`` (session, autouse): ``QRW_PRIVACY__FORGET_FILE`` set to a temp
  file for the whole session (the forget list of ``qrw forget-user``).
- ``spark`` (session): a ``local[2]`` SparkSession (skipped without pyspark), stopped at the
  end.
- ``grpc_server`` (session): a running :class:`~rewrite.server.RewriteServer` on
  127.0.0.1 with an ephemeral port (``.port``, ``.target``), stopped at the end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before torch loads: OpenMP threads otherwise busy-wait and starve the other core's work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The default config runs the BERT span detector, which needs a trained artifact. Tests of the
# job's mechanics (and CLI subprocesses) use the deterministic heuristic baseline; the span
# detector's tests set ``rephrase.detector = "bert_span"`` with a tiny trained artifact.
os.environ.setdefault("QRW_REPHRASE__DETECTOR", "heuristic_baseline")

import pytest
import redis

from rewrite.config import Settings, load_settings
from rewrite.redis_server import EmbeddedRedis
from rewrite.server import RewriteServer


@pytest.fixture(scope="session", autouse=True)
def _isolated_forget_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point ``privacy.forget_file`` at a session temp file, so a developer's
    ``var/forgotten_users.txt`` never changes what tests see (and tests never write it)."""
    path = tmp_path_factory.mktemp("privacy") / "forgotten_users.txt"
    old = os.environ.get("QRW_PRIVACY__FORGET_FILE")
    os.environ["QRW_PRIVACY__FORGET_FILE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QRW_PRIVACY__FORGET_FILE", None)
        else:
            os.environ["QRW_PRIVACY__FORGET_FILE"] = old


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis | None]:
    """An embedded redis-server for the session, or None when ``REDIS_URL`` is set."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis | None) -> str:
    """URL of the session's Redis."""
    return redis_server.url if redis_server is not None else os.environ["REDIS_URL"]


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    """Project settings using the session's Redis (shared: copy before changing)."""
    loaded = load_settings()
    loaded.redis.url = redis_url
    return loaded


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[redis.Redis]:
    """An emptied Redis database (FLUSHDB) and a string-decoding client on it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def grpc_server(settings: Settings) -> Iterator[RewriteServer]:
    """A real rewrite server on 127.0.0.1 (ephemeral port) for the session."""
    server = RewriteServer(settings, host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="session")
def dpr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the zero-shot DPR artifact (exported once per session)."""
    from offline.dpr.train import export_zero_shot

    root = tmp_path_factory.mktemp("dpr")
    export_zero_shot(root)
    return root


@pytest.fixture(scope="session")
def static_dpr_dir(dpr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a static query tower distilled from the zero-shot artifact of
    :func:`dpr_dir` (``LATEST`` names the student; same passage tower), trained briefly on
    :func:`commands.distill_texts`."""
    from commands import distill_texts

    from offline.dpr.distill import DistillConfig, distill_query_tower
    from offline.dpr.train import export_zero_shot

    root = tmp_path_factory.mktemp("dpr-static")
    teacher = export_zero_shot(dpr_dir).artifact  # the session's (reused)
    config = DistillConfig.for_static(epochs=8, noisy_copies=1)
    distill_query_tower(teacher, distill_texts(), root, config)
    return root


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One local SparkSession (``local[2]``, no UI, 2 shuffle partitions, Arrow on) for the
    whole test session, stopped at the end; skipped when pyspark is not installed
    (``pip install -e '.[spark]'``). Executors run this interpreter (``PYSPARK_PYTHON``)."""
    pytest.importorskip("pyspark")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("qrw-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
