"""Several service processes on one port (:mod:`rewrite.processes`): real spawned processes,
real gRPC on 127.0.0.1, a real Redis; every process is stopped by its handle or pid."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from examples import BOBS_FIX, GLOBAL_FIX, QUERY, online_test_settings, wilkerson_logs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector

from offline.job import run_nightly
from rewrite.client import RewriteClient
from rewrite.config import Settings
from rewrite.processes import ServiceProcesses, per_process_settings, reserve_port
from rewrite.types import RewriteRequest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PROCESSES_2 = ("--processes", "2")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture(scope="module")
def published(
    settings: Settings, dpr_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """The wilkerson example run through the nightly job and published; settings that
    serve it."""
    tmp = tmp_path_factory.mktemp("processes")
    redis.Redis.from_url(settings.redis.url).flushdb()
    s = online_test_settings(settings, dpr_dir, tmp)
    report = run_nightly([wilkerson_logs(tmp / "day-01.jsonl")], tmp / "run", s, publish=True)
    assert report.publish is not None
    yield s


def _requests_served(metrics_port: int) -> float:
    """Sum of ``qrw_requests_total`` on a Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(r"^qrw_requests_total\{[^}]*\} (\S+)$", text, re.M))


def _requests_of(metrics_dir: str, pid: int) -> float:
    """``qrw_requests_total`` of one process, from its prometheus_client multiprocess file."""
    files = glob.glob(os.path.join(metrics_dir, f"counter_{pid}.db"))
    metrics = MultiProcessCollector.merge(files, accumulate=True)
    return sum(
        s.value
        for m in metrics
        if m.name == "qrw_requests"
        for s in m.samples
        if s.name == "qrw_requests_total"
    )


def test_two_processes_share_one_port_and_both_answer(published: Settings) -> None:
    with ServiceProcesses(published, 2, port=0, metrics_port=0, start_timeout_s=180) as procs:
        info = procs.info
        assert len({i.pid for i in info}) == 2 and all(_alive(i.pid) for i in info)
        assert {i.port for i in info} == {procs.port} and procs.port > 0
        assert procs.metrics_port and procs.metrics_dir
        # the processes took the supervisor's index swap lock for their first load
        assert os.path.exists(os.path.join(os.path.dirname(procs.metrics_dir), "index-swap.lock"))
        # each process runs with its share of the service's cache budgets
        run = procs.process_settings
        assert run is not None and run.service.split_caches
        assert run.service.personal_cache_mb == published.service.personal_cache_mb / 2
        assert run.service.pair_cache_size == published.service.pair_cache_size // 2
        assert run.dpr.query_cache_size == published.dpr.query_cache_size // 2
        # connections, not calls, are spread: one channel per caller, each its own connection
        answers = []
        for _ in range(24):
            with RewriteClient(procs.target, options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                answers.append(
                    (
                        c.rewrite(RewriteRequest(QUERY, user_id="alice")).rewrite,
                        c.rewrite(RewriteRequest(QUERY, user_id="bob")).rewrite,
                    )
                )
        assert set(answers) == {(GLOBAL_FIX, BOBS_FIX)}
        # one endpoint for the service: every process's counters summed
        assert _requests_served(procs.metrics_port) == 48
        served = [_requests_of(procs.metrics_dir, i.pid) for i in info]
        assert sum(served) == 48
        # 24 connections fall on one process with probability 2 * 2**-24
        assert min(served) > 0, served
        metrics_dir = procs.metrics_dir
    assert not any(_alive(i.pid) for i in info)
    assert not os.path.exists(metrics_dir)  # the supervisor's temporary folder is gone


def test_cache_budgets_are_split_over_the_processes(settings: Settings) -> None:
    """``service.split_caches``: the pair, personal-history and query-vector caches' sizes are
    the whole service's, divided over its processes (entries rounded down, at least one while
    on; off stays off); one process, or the flag off, keeps the settings as they are."""
    s = settings.model_copy(deep=True)
    s.service.pair_cache_size, s.service.personal_cache_mb, s.dpr.query_cache_size = 65536, 64, 5
    assert per_process_settings(s, 1) is s
    two = per_process_settings(s, 2)
    assert (two.service.pair_cache_size, two.service.personal_cache_mb) == (32768, 32.0)
    assert two.dpr.query_cache_size == 2 and s.dpr.query_cache_size == 5  # a copy
    many = per_process_settings(s, 8)
    assert (many.service.pair_cache_size, many.dpr.query_cache_size) == (8192, 1)
    s.service.pair_cache_size = 0
    assert per_process_settings(s, 2).service.pair_cache_size == 0
    s.service.split_caches = False
    assert per_process_settings(s, 2) is s
    with pytest.raises(ValueError, match="processes"):
        per_process_settings(s, 0)


def test_a_process_that_dies_is_noticed_and_the_rest_stopped(published: Settings) -> None:
    procs = ServiceProcesses(published, 2, port=0, start_timeout_s=180).start()
    try:
        victim, other = procs.pids
        assert procs.wait(0.2) is None  # both running
        os.kill(victim, signal.SIGKILL)  # a process this test started (through procs)
        assert procs.wait(30) == victim
        assert procs.exit_codes()[victim] == -signal.SIGKILL
        assert procs.exit_codes()[other] is None
    finally:
        procs.stop(grace_s=1.0)
    assert not _alive(victim) and not _alive(other)
    assert procs.pids == [] and procs.port == procs.port  # stop is idempotent
    procs.stop()


SUPERVISOR = """
import json, sys, time
from rewrite.config import Settings
from rewrite.processes import ServiceProcesses
procs = ServiceProcesses(Settings.model_validate_json(sys.argv[1]), 2, start_timeout_s=180)
print(json.dumps(procs.start().pids), flush=True)
time.sleep(300)
"""


def test_service_processes_stop_when_their_supervisor_is_killed(published: Settings) -> None:
    """A supervisor killed without a chance to stop its processes (SIGKILL) leaves none
    behind: each asked the kernel for SIGTERM when its parent exits."""
    sup = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, published.model_dump_json()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        assert sup.stdout is not None
        line = sup.stdout.readline()  # the supervisor's start is bounded (start_timeout_s)
        pids = json.loads(line)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        sup.kill()  # the supervisor this test started, by its handle
        sup.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(10)
        for p in pids:  # only if the test failed: its own grandchildren, by pid
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_process_that_cannot_start_fails_the_start_with_its_reason(
    published: Settings,
) -> None:
    bad = published.model_copy(deep=True)
    bad.service.pipeline = ["normalize", "no_such_stage"]
    procs = ServiceProcesses(bad, 2, port=0, start_timeout_s=180)
    with pytest.raises(RuntimeError, match="no_such_stage"):
        procs.start()
    assert procs.pids == []


def test_the_reserved_port_refuses_a_server_without_reuse_port(published: Settings) -> None:
    sock = reserve_port("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        plain.close()
        again = reserve_port("127.0.0.1", port)  # a service process binds like this
        again.close()
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_qrw_serve_processes_2_serves_and_stops_on_sigterm(
    published: Settings, tmp_path: Path
) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "QRW_REDIS__URL": published.redis.url,
        "QRW_SERVICE__PIPELINE": json.dumps(published.service.pipeline),
        "QRW_DPR__ARTIFACTS_DIR": str(published.dpr.artifacts_dir),
        "QRW_DPR__INDEX_ROOT": str(published.dpr.index_root),
        "QRW_RERANK__ARTIFACTS_DIR": str(published.rerank.artifacts_dir),
        "QRW_RERANK__TRIGGER_THRESHOLD": "0.55",
    }
    err = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "offline.cli", "-v", "serve", "--port", str(port), *PROCESSES_2],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    log = (tmp_path / "serve.log").read_text()
                    if status == health_pb2.HealthCheckResponse.SERVING and re.search(
                        r"2 service processes on", log
                    ):
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "qrw serve did not become ready"
                time.sleep(0.5)
        with RewriteClient(f"127.0.0.1:{port}") as c:
            assert c.rewrite(RewriteRequest(QUERY, user_id="alice")).source == "global"
        log = (tmp_path / "serve.log").read_text()
        pids = [int(p) for p in re.search(r"pids \[(\d+), (\d+)\]", log).groups()]  # type: ignore[union-attr]
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.close()
