"""`make demo`'s orchestration on the real data, smaller: every stage runs and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from offline.demo import run_demo
from rewrite.config import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not (DATA / "dstc2").exists(), reason=f"shared data not found at {DATA}")
def test_demo_end_to_end(tmp_path: Path, settings: Settings, clean_redis: object) -> None:
    console = Console(record=True, width=140)
    code = run_demo(settings, data_root=DATA, out=tmp_path, users=600, seed=7, console=console)
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    dstc2, sim = summary["dstc2"], summary["sim"]
    assert dstc2["train_turns"] == 11522 and dstc2["eval_dev"]["turns"] == 3879
    assert sim["published"]["n_pairs"] == sim["nightly_mined"]["pairs"] > 0
    pre, ev = sim["eval_heldout_precomputed"], sim["eval_heldout_grpc"]
    assert pre["turns"] > 1000 and pre["by_source"].get("precomputed", 0) == pre["rewritten"] > 0
    assert ev["turns"] == pre["turns"] and ev["errors"] == 0
    # the full service answers the precomputed hits the same way and adds online rewrites
    assert ev["by_source"].get("precomputed", 0) == pre["rewritten"]
    assert ev["rewritten"] >= pre["rewritten"] and ev["task_wins"] > ev["task_losses"]
    assert sim["online"]["index_entries"] > 0 and sim["published"]["n_personal_users"] > 0
    assert "Replay evaluation" in console.export_text()


def test_demo_names_missing_data(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(FileNotFoundError, match="demo data missing"):
        run_demo(settings, data_root=tmp_path, out=tmp_path / "o")
