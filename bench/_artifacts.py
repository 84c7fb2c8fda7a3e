"""Artifacts a benchmark prepares before it measures (not timed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def zero_shot_artifact(artifacts_dir: Path, timeout_s: float = 900.0) -> Path:
    """The zero-shot DPR artifact (exported once; in a child process so this one stays
    torch-free)."""
    code = (
        "import sys; from pathlib import Path; from offline.dpr.train import export_zero_shot; "
        "print(export_zero_shot(Path(sys.argv[1])).artifact)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(artifacts_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"export_zero_shot failed:\n{res.stderr[-2000:]}")
    return Path(res.stdout.strip().splitlines()[-1]).resolve()
