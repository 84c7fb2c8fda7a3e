"""How well the implicit-feedback defect rule agrees with true defects.

The A/B defect rate is only as good as its labels. The rule (:mod:`offline.defects`: barge-in,
rephrase by the detector, abandonment, negative feedback, failure prompt) is measured against:

* **simulated truth** — the simulator knows whether the request did what the user meant
  (``defective`` in its truth file);
* **DSTC2 dev** — no defect annotation exists, so the reference is the system-failure test of
  the documented DSTC2 weak-labelling rule (:func:`offline.detector.labels.failure_reasons`):
  the prompt the system played after the turn shows that it misunderstood, re-asked, confirmed
  something else, left a request unanswered, or acted on a value the caller did not say (read
  against the human transcription and its gold dialogue acts, which the rule under test never
  sees). A user's last turn has no following prompt and counts as not failed.

``qrw evaluate defects`` runs the nightly job (no publish) over held-out logs of both sources
and prints precision, recall, F1 and Cohen's kappa, and which signals fire how precisely.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefectAgreement:
    """Agreement of predicted defects with reference defects over ``turns`` turns.

    ``precision`` = TP / predicted defects, ``recall`` = TP / true defects, ``kappa`` is Cohen's
    kappa (agreement beyond chance; Cohen 1960). ``by_reason[name]`` = ``{"fired": n,
    "precision": share of those turns that are true defects}``.
    """

    source: str
    turns: int
    true_defects: int
    predicted_defects: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    kappa: float
    true_rate: float
    predicted_rate: float
    by_reason: dict[str, dict[str, float]] = field(default_factory=dict)


def defect_agreement(
    source: str,
    predicted: Sequence[bool],
    truth: Sequence[bool],
    reasons: Sequence[str] | None = None,
) -> DefectAgreement:
    """Confusion counts, precision/recall/F1, accuracy and Cohen's kappa.

    Args:
        source: a name for the report.
        predicted: the rule's defect label per turn.
        truth: the reference label per turn (same order and length).
        reasons: optional comma-joined reasons per turn (``defects.parquet``'s column).

    Raises:
        ValueError: lengths differ or there are no turns.
    """
    n = len(predicted)
    if n == 0 or len(truth) != n or (reasons is not None and len(reasons) != n):
        raise ValueError(f"need equally long, non-empty label lists (got {n} and {len(truth)})")
    tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, truth, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, truth, strict=True))
    tn = n - tp - fp - fn
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    acc = (tp + tn) / n
    p_pred, p_true = (tp + fp) / n, (tp + fn) / n
    chance = p_pred * p_true + (1 - p_pred) * (1 - p_true)
    kappa = (acc - chance) / (1 - chance) if chance < 1 else 1.0
    by_reason: dict[str, dict[str, float]] = {}
    if reasons is not None:
        fired: Counter[str] = Counter()
        right: Counter[str] = Counter()
        for r, t in zip(reasons, truth, strict=True):
            for name in filter(None, r.split(",")):
                fired[name] += 1
                right[name] += bool(t)
        by_reason = {
            k: {"fired": fired[k], "precision": round(right[k] / fired[k], 4)}
            for k in sorted(fired, key=lambda k: -fired[k])
        }
    return DefectAgreement(
        source=source,
        turns=n,
        true_defects=tp + fn,
        predicted_defects=tp + fp,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        precision=round(prec, 4),
        recall=round(rec, 4),
        f1=round(f1, 4),
        accuracy=round(acc, 4),
        kappa=round(kappa, 4),
        true_rate=round(p_true, 4),
        predicted_rate=round(p_pred, 4),
        by_reason=by_reason,
    )


def dstc2_reference_defects(calls_path: Path) -> dict[str, bool]:
    """Reference defect per DSTC2 user turn (``f"{call_id}:{turn_index}"``): the system
    turn after it failed under the weak-labelling rule's failure test (module docstring).

    Raises:
        FileNotFoundError: ``calls_path`` is missing.
    """
    from offline.detector.labels import failure_reasons, informative_acts, iter_calls

    out: dict[str, bool] = {}
    for call in iter_calls(calls_path):
        turns = sorted(call["turns"], key=lambda t: int(t["turn_index"]))
        for i, t in enumerate(turns):
            nxt = turns[i + 1]["system"] if i + 1 < len(turns) else ""
            acts = informative_acts(t.get("semantics") or [], t["system"])
            why = failure_reasons(acts, t["system"], nxt, t["asr_1best"], t["transcription"])
            out[f"{call['call_id']}:{t['turn_index']}"] = bool(why) and bool(nxt)
    return out


def _labels(run: Path) -> tuple[list[str], list[bool], list[str]]:
    tbl = pq.read_table(run / "defects.parquet")
    return (
        [str(x) for x in tbl.column("turn_id").to_pylist()],
        [bool(x) for x in tbl.column("defect").to_pylist()],
        [str(x) for x in tbl.column("reasons").to_pylist()],
    )


def agreement_for_run(source: str, run: Path, reference: Mapping[str, bool]) -> DefectAgreement:
    """Agreement of a job run's ``defects.parquet`` with ``reference`` (turns present in
    both; turns missing from the reference are counted in the log)."""
    ids, pred, reasons = _labels(run)
    keep = [i for i, tid in enumerate(ids) if tid in reference]
    if len(keep) < len(ids):
        log.warning("%s: %d of %d turns have no reference label", source, len(ids) - len(keep),
                    len(ids))  # fmt: skip
    return defect_agreement(
        source,
        [pred[i] for i in keep],
        [reference[ids[i]] for i in keep],
        [reasons[i] for i in keep],
    )


def sim_reference_defects(truth_path: Path) -> dict[str, bool]:
    """``turn_id -> defective`` from a simulator truth file."""
    with truth_path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["turn_id"]: bool(r["defective"]) for r in rows}


def run_defect_evaluation(
    settings: Any, data_root: Path, work_dir: Path, users: int = 1000
) -> list[DefectAgreement]:
    """``qrw evaluate defects``: the nightly job's defect labels (its configured rephrase
    detector) on a held-out simulated day and on DSTC2 dev, against the references.

    Raises:
        FileNotFoundError: data files are missing.
    """
    from offline.detector.downstream import standard_sources
    from offline.job import run_nightly

    job_settings = settings.model_copy(deep=True)
    job_settings.dpr.build_index = False
    results = []
    for src in standard_sources(settings, data_root, work_dir, sim_users=users):
        run = work_dir / "defects" / src.name
        run_nightly(list(src.heldout_logs), run, job_settings, publish=False)
        if src.name == "dstc2":
            ref = dstc2_reference_defects(data_root / "dstc2" / "dev.jsonl")
        else:
            ref = sim_reference_defects(src.truth)
        results.append(agreement_for_run(f"{src.name} (held out)", run, ref))
    return results


def agreement_to_json(rows: Sequence[DefectAgreement]) -> list[dict[str, Any]]:
    """JSON-ready dicts."""
    return [asdict(r) for r in rows]
