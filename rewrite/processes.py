"""Several service processes on one port: past the GIL of one process.

One service process is capped by its GIL, not by the cores: at concurrency 64 the GIL is held
in ~98 % of py-spy's samples while the process uses ~1.25 of 2 cores (README, "Where the
service's CPU goes"). The standard way past that in Python is one process per core, each
with its own interpreter, bound to the same port with ``SO_REUSEPORT``, so that the kernel
spreads incoming connections over them — gRPC's own multiprocessing example
(https://github.com/grpc/grpc/tree/master/examples/python/multiprocessing) and gunicorn's
``reuse_port`` do this.

:class:`ServiceProcesses` is the supervisor:

- it reserves the port in this process (a bound, non-listening ``SO_REUSEPORT`` socket,
  held until :meth:`~ServiceProcesses.stop`), so port 0 resolves to one ephemeral port that
  every service process then binds, and no other program takes it meanwhile;
- it starts the processes with ``multiprocessing``'s *spawn* method (a fresh interpreter;
  nothing of this process's threads, gRPC, ONNX Runtime or OpenMP state is inherited, which
  *fork* would make unsafe), each running :func:`rewrite.server.serve_async` with
  ``reuse_port=True``: its own event loop, Rewriter, Redis connections, loaded index
  (``dpr.index_mmap`` maps the index file, whose pages the processes then share through the
  page cache, as do the inverted lists and catalog columns; models and caches are per
  process, the caches' sizes split over the processes: :func:`per_process_settings`);
- it gives the processes one index swap lock (``service.index_swap_lock``, a file in its
  temporary folder, unless set), so that after a publish they load the new version's index one
  at a time: the memory peak is one extra index, not one per process;
- it waits until every process answers (each reports its pid and port over a pipe) and fails
  as a whole when one cannot start (the others are stopped);
- with a metrics port it serves one Prometheus ``/metrics`` for the whole service:
  prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a temporary folder of
  its own, set in the processes' environment; each process writes its counters and histogram
  there, and the supervisor's ``MultiProcessCollector`` sums them, also over processes that
  have exited, so counters never go backwards);
- each process asks the kernel for SIGTERM when the supervisor exits (``PR_SET_PDEATHSIG``),
  so a supervisor killed without a chance to stop them (SIGKILL, the OOM killer) leaves no
  orphaned service processes behind holding the port;
- :meth:`~ServiceProcesses.stop` sends SIGTERM to each process by its handle (each drains as
  a single service does: health NOT_SERVING, queued calls answered, then stop), waits, and
  kills only what is left of its own processes.

:func:`serve_processes` (what ``qrw serve`` runs when ``service.processes`` > 1) supervises
until SIGTERM/SIGINT, and stops everything and raises when a service process exits on its own
(fail fast: the orchestrator — systemd, Kubernetes — restarts the service as a whole, rather
than one process silently serving with half the capacity).

Connections, not calls, are spread: one client channel (one HTTP/2 connection) reaches one
process. Many callers (an assistant's fleet) spread well; a benchmark must open several
channels (``bench/bench_processes.py``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rewrite import libc
from rewrite.config import Settings

log = logging.getLogger(__name__)

#: prometheus_client's switch to its multiprocess mode (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Zero-argument callable (importable by reference: a module-level function) returning extra
#: generic RPC handlers for every service process, e.g. a benchmark's echo method.
HandlerFactory = Callable[[], Sequence[Any]]


@dataclass(frozen=True)
class ProcessInfo:
    """One running service process: OS ``pid`` and gRPC ``port``."""

    pid: int
    port: int


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a TCP socket with ``SO_REUSEPORT`` on ``host:port``.

    Holding it keeps the port for processes that bind it with ``SO_REUSEPORT`` too (a
    non-listening socket receives no connections); port 0 picks an ephemeral port (read it
    with ``getsockname()``).

    Raises:
        OSError: the address cannot be bound (taken without ``SO_REUSEPORT``, bad host).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _restore_env(name: str, value: str | None) -> None:
    """Set ``os.environ[name]`` back to ``value`` (None = unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _serve_metrics(port: int, directory: str) -> Any:
    """Serve ``/metrics`` on ``127.0.0.1:port`` summing the multiprocess files in
    ``directory`` (prometheus_client ``MultiProcessCollector``); returns the HTTP server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    httpd, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return httpd


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so service processes never outlive a supervisor that was
    killed (SIGKILL, OOM) without stopping them; exits at once if the parent
    ``parent_pid`` is already gone. A no-op where ``prctl`` is unavailable (logged by
    :func:`rewrite.libc.set_parent_death_signal`: the process may then outlive its
    supervisor)."""
    if not libc.set_parent_death_signal(sig):
        return
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(1)


def _process_main(
    settings: Settings,
    port: int,
    conn: multiprocessing.connection.Connection,
    extra_handlers: HandlerFactory | None,
    log_level: int,
    parent_pid: int,
) -> None:
    """Entry point of one spawned service process: serve until SIGTERM/SIGINT (also sent when
    the supervisor ``parent_pid`` dies: :func:`die_with_parent`); report ``("ready", pid,
    port)`` or ``("error", message)`` over ``conn``."""
    import asyncio

    die_with_parent(parent_pid)

    from rewrite.server import RewriteServer, serve_async

    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
    )

    def ready(server: RewriteServer) -> None:
        conn.send(("ready", os.getpid(), server.port))

    try:
        handlers = tuple(extra_handlers()) if extra_handlers is not None else ()
        asyncio.run(
            serve_async(
                settings,
                port=port,
                reuse_port=True,
                extra_handlers=handlers,
                on_ready=ready,
            )
        )
    except BaseException as err:  # report why, then exit non-zero
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(err).__name__}: {err}"))
        raise
    finally:
        conn.close()


def per_process_settings(settings: Settings, processes: int) -> Settings:
    """The settings each of ``processes`` service processes runs with.

    With ``service.split_caches`` (default) the in-process caches' sizes are budgets of the
    whole service: ``service.pair_cache_size``, ``service.personal_cache_mb`` and
    ``dpr.query_cache_size`` are divided by ``processes`` (entries rounded down, at least 1
    when the cache is on; a cache set to 0 stays off). Otherwise, or with one process,
    ``settings`` is returned as it is.

    Raises:
        ValueError: ``processes`` below 1.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, not {processes}")
    if processes == 1 or not settings.service.split_caches:
        return settings
    out = settings.model_copy(deep=True)
    svc = out.service

    def share(entries: int) -> int:
        return max(1, entries // processes) if entries > 0 else 0

    svc.pair_cache_size = share(svc.pair_cache_size)
    svc.personal_cache_mb = svc.personal_cache_mb / processes
    out.dpr.query_cache_size = share(out.dpr.query_cache_size)
    log.info(
        "caches split over %d processes: each %d pair answers, %.1f MiB of personal "
        "histories, %d query vectors",
        processes,
        svc.pair_cache_size,
        svc.personal_cache_mb,
        out.dpr.query_cache_size,
    )
    return out


class ServiceProcesses:
    """Supervise ``processes`` service processes on one port (see the module docstring).

    Args:
        settings: loaded settings; each process serves them (``service.host``).
        processes: how many service processes (>= 1).
        port: TCP port; 0 = an ephemeral port, the same for all (read :attr:`port`).
        metrics_port: Prometheus ``/metrics`` of the whole service (every process's counters
            summed; see the module docstring) on ``127.0.0.1:metrics_port``, served by the
            supervisor (0 = an ephemeral port, read :attr:`metrics_port`; None = off).
        extra_handlers: see :data:`HandlerFactory` (called in each process).
        start_timeout_s: bound on each process's start (load + warm-up + bind), seconds.

    Use ``with ServiceProcesses(...) as procs:`` or :meth:`start` … :meth:`stop`.
    """

    def __init__(
        self,
        settings: Settings,
        processes: int,
        *,
        port: int = 0,
        metrics_port: int | None = None,
        extra_handlers: HandlerFactory | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, not {processes}")
        self.settings = settings
        self.processes = processes
        self._requested_port = port
        self._metrics_port = metrics_port
        self._extra_handlers = extra_handlers
        self._start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []  # multiprocessing.Process handles (spawn context)
        self._info: list[ProcessInfo] = []
        self._reserved: socket.socket | None = None
        self._port = 0
        self._workdir: str | None = None  # the supervisor's temporary folder
        self._metrics_dir: str | None = None
        self._metrics_httpd: Any = None
        #: the settings the processes were started with (:func:`per_process_settings`, plus
        #: the swap lock); None before :meth:`start`
        self.process_settings: Settings | None = None

    @property
    def port(self) -> int:
        """The shared TCP port (0 before :meth:`start`)."""
        return self._port

    @property
    def target(self) -> str:
        """``host:port`` to dial."""
        return f"{self.settings.service.host}:{self._port}"

    @property
    def metrics_port(self) -> int | None:
        """Port of the service's Prometheus endpoint (None when off or not started)."""
        return None if self._metrics_httpd is None else int(self._metrics_httpd.server_port)

    @property
    def metrics_dir(self) -> str | None:
        """The ``PROMETHEUS_MULTIPROC_DIR`` of the processes (None when metrics are off)."""
        return self._metrics_dir

    @property
    def info(self) -> list[ProcessInfo]:
        """The started processes, in start order."""
        return list(self._info)

    @property
    def pids(self) -> list[int]:
        """OS pids of the started processes."""
        return [i.pid for i in self._info]

    def start(self) -> ServiceProcesses:
        """Reserve the port, spawn the processes, wait until each answers.

        Raises:
            RuntimeError: already started, or a process failed to start or did not report
                ready within ``start_timeout_s`` (every process is stopped first).
            OSError: the port cannot be reserved.
        """
        if self._procs:
            raise RuntimeError("service processes already started")
        svc = self.settings.service
        self._reserved = reserve_port(svc.host, self._requested_port)
        self._port = int(self._reserved.getsockname()[1])
        pipes = []
        env_before = os.environ.get(MULTIPROC_ENV)
        settings = self.settings
        try:
            self._workdir = tempfile.mkdtemp(prefix="qrw-service-")
            settings = per_process_settings(settings, self.processes)
            if settings.service.index_swap_lock is None and self.processes > 1:
                settings = settings.model_copy(deep=True)
                settings.service.index_swap_lock = Path(self._workdir) / "index-swap.lock"
            self.process_settings = settings
            if self._metrics_port is not None:
                self._metrics_dir = os.path.join(self._workdir, "metrics")
                os.mkdir(self._metrics_dir)
                os.environ[MULTIPROC_ENV] = self._metrics_dir  # inherited by spawn, then undone
            for i in range(self.processes):
                parent_end, child_end = self._ctx.Pipe(duplex=False)
                proc = self._ctx.Process(
                    target=_process_main,
                    args=(
                        settings,
                        self._port,
                        child_end,
                        self._extra_handlers,
                        logging.getLogger().getEffectiveLevel(),
                        os.getpid(),
                    ),
                    name=f"qrw-service-{i}",
                    daemon=False,
                )
                proc.start()
                child_end.close()
                self._procs.append(proc)
                pipes.append(parent_end)
            _restore_env(MULTIPROC_ENV, env_before)
            deadline = time.monotonic() + self._start_timeout_s
            for i, (proc, pipe) in enumerate(zip(self._procs, pipes, strict=True)):
                self._info.append(self._await_ready(i, proc, pipe, deadline))
            if self._metrics_dir is not None and self._metrics_port is not None:
                self._metrics_httpd = _serve_metrics(self._metrics_port, self._metrics_dir)
        except BaseException:
            _restore_env(MULTIPROC_ENV, env_before)
            self.stop(grace_s=0.0)
            raise
        finally:
            for pipe in pipes:
                pipe.close()
        log.info(
            "qrw: %d service processes on %s (pids %s; metrics port %s)",
            self.processes,
            self.target,
            self.pids,
            self.metrics_port,
        )
        return self

    @staticmethod
    def _await_ready(
        i: int, proc: Any, pipe: multiprocessing.connection.Connection, deadline: float
    ) -> ProcessInfo:
        """Read process ``i``'s ready (or error) report before ``deadline`` (monotonic s)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"service process {i} (pid {proc.pid}) did not start in time")
            if pipe.poll(min(left, 0.5)):
                try:
                    msg = pipe.recv()
                except EOFError:
                    msg = ("error", f"exited with code {proc.exitcode}")
                if msg[0] == "ready":
                    return ProcessInfo(int(msg[1]), int(msg[2]))
                raise RuntimeError(f"service process {i} (pid {proc.pid}) failed: {msg[1]}")
            if not proc.is_alive():
                raise RuntimeError(
                    f"service process {i} (pid {proc.pid}) exited with code {proc.exitcode} "
                    "before it was ready"
                )

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until one of the processes exits or ``timeout_s`` seconds pass.

        Returns:
            The pid of a process that has exited, or None (timeout; all running).
        """
        sentinels = {p.sentinel: p for p in self._procs}
        done = multiprocessing.connection.wait(list(sentinels), timeout_s)
        for s in done:
            proc = sentinels[s]
            proc.join(5.0)  # its sentinel closes just before it can be reaped
            return int(proc.pid)
        return None

    def exit_codes(self) -> dict[int, int | None]:
        """Exit code of each process by pid (None while it runs; -N = killed by signal N)."""
        return {int(p.pid): p.exitcode for p in self._procs}

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every process (idempotent): SIGTERM (each drains within ``service.grace_s``,
        or ``grace_s`` when given, plus 10 s to exit), then SIGKILL what is still running.
        Only this supervisor's own processes are signalled, by their handles."""
        grace = self.settings.service.grace_s if grace_s is None else grace_s
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 10.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("service process %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(10.0)
        for proc in procs:
            proc.close()
        self._info = []
        if self._metrics_httpd is not None:
            httpd, self._metrics_httpd = self._metrics_httpd, None
            httpd.shutdown()
            httpd.server_close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = self._metrics_dir = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def __enter__(self) -> ServiceProcesses:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_processes(
    settings: Settings,
    port: int | None = None,
    metrics_port: int | None = None,
    processes: int | None = None,
) -> None:
    """Run ``processes`` (default ``service.processes``) service processes until SIGTERM or
    SIGINT, then stop them gracefully (blocking; call from the main thread).

    Args: ``port`` (default ``service.port``) and ``metrics_port``: see
    :class:`ServiceProcesses`.

    Raises:
        RuntimeError: a process failed to start, or exited while serving (the others are
            stopped first).
    """
    count = settings.service.processes if processes is None else processes
    procs = ServiceProcesses(
        settings,
        count,
        port=settings.service.port if port is None else port,
        metrics_port=metrics_port,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping the service processes", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        procs.start()
        while not stop.is_set():
            pid = procs.wait(0.5)
            if pid is not None and not stop.is_set():
                code = procs.exit_codes().get(pid)
                raise RuntimeError(f"service process {pid} exited with code {code} while serving")
    finally:
        procs.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
