"""Stopping child processes a test started — by their handle, never by name."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> None:
    """SIGTERM the child (graceful stop), SIGKILL it when it has not exited after
    ``timeout_s`` seconds; a child that already exited is left alone."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def start_qrw_serve(log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """``qrw serve --port 0`` (``python -m offline.cli -v``) in its own process on 127.0.0.1,
    stdout and stderr to ``log_path``; keep the handle and stop it with :func:`stop_process`."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "offline.cli", "-v", "serve", "--port", "0"],
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def wait_for_log(
    pattern: str, log_path: Path, proc: subprocess.Popen[Any], timeout_s: float
) -> str:
    """The first match of ``pattern`` in a child's log (its group 1, else the whole match),
    polled every 50 ms for at most ``timeout_s`` seconds.

    Raises:
        AssertionError: the child exited first, or nothing matched in time (log tail shown).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = re.search(pattern, text)
        if m:
            return m.group(1) if m.groups() else m.group(0)
        assert proc.poll() is None, f"child exited {proc.returncode}:\n{text[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(
        f"{pattern!r} not logged in {timeout_s} s:\n{log_path.read_text()[-3000:]}"
    )


#: What ``qrw serve`` logs once it serves (group 1: ``host:port``).
SERVING_LINE = r"qrw gRPC server on (127\.0\.0\.1:\d+) "
