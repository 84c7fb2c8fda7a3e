"""The wilkerson example of issue 4, shared by the online-path tests: its turn logs and the
settings that serve it (zero-shot DPR, heuristic ranker, the full online pipeline)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from logrows import turn_line

from rewrite.config import FULL_PIPELINE, Settings

#: Start of the example's log.
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
QUERY = "what's the weather in wilkerson"
GLOBAL_FIX = "what's the weather in wilmington"
BOBS_FIX = "what's the weather in wilkesboro"


def wilkerson_logs(path: Path) -> Path:
    """Six users succeed with "what's the weather in wilmington"; bob has always succeeded
    with "what's the weather in wilkesboro"; nobody succeeds with "... wilkerson". Writes
    ``path`` (JSONL) and returns it."""
    rows = []
    for k in range(6):
        u = f"user{k}"
        for d in range(2):
            t = k * 5000 + d * 1000
            rows.append(turn_line(f"{u}-w{d}", u, t, GLOBAL_FIX, "Here you go.", t0=T0))
    for d in range(4):
        rows.append(
            turn_line(f"bob-w{d}", "bob", 90000 + d * 1000, BOBS_FIX, "Here you go.", t0=T0)
        )
    rows.append(turn_line("carol-1", "carol", 120000, "play some jazz", "Here you go.", t0=T0))
    rows.append(turn_line("carol-2", "carol", 121000, "play some jazz", "Here you go.", t0=T0))
    path.write_text("\n".join(rows) + "\n")
    return path


def online_test_settings(settings: Settings, dpr_dir: Path, root: Path) -> Settings:
    """A copy of ``settings`` serving the online pipeline from ``root`` (index folders under
    ``root/index``, no trained ranker: the heuristic one) with the zero-shot DPR of
    ``dpr_dir``."""
    s = settings.model_copy(deep=True)
    s.dpr.artifacts_dir = dpr_dir
    s.dpr.index_root = root / "index"
    s.rerank.artifacts_dir = root / "no-ranker"
    # zero-shot MiniLM puts "...wilkerson" at cosine 0.42 to "...wilmington": the heuristic
    # ranker's score is 0.60 there; a trained ranker calibrates its own threshold
    s.rerank.trigger_threshold = 0.55
    s.service.pipeline = list(FULL_PIPELINE)
    return s
