"""The machine a benchmark ran on (printed with every figure: the same code runs several times
faster on a CPU with AVX-512 VNNI int8 instructions than on one with AVX2 only)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: CPU flags (``/proc/cpuinfo``) that decide how fast ONNX Runtime's fp32 and int8 kernels run.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> dict[str, Any]:
    """CPU model, SIMD flags, logical CPUs, RAM, Python, the date and the 1-min load average."""
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cpus": os.cpu_count(),
        "ram_gb": round(ram_gb, 1),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }


def describe(m: dict[str, Any] | None = None) -> str:
    """One line for a report: ``AMD EPYC (avx2 fma; no AVX-512), 2 CPUs, 23.5 GB, ...``."""
    m = m or machine()
    simd = " ".join(m["simd"]) or "no AVX2"
    if not any(f.startswith("avx512") for f in m["simd"]):
        simd += "; no AVX-512"
    return (
        f"{m['cpu']} ({simd}), {m['cpus']} CPUs, {m['ram_gb']} GB RAM, Python {m['python']}, "
        f"{m['date']}"
    )
