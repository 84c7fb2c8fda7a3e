"""The closed-loop A/B experiment: simulated users, day by day, through the real gRPC service.

``qrw experiment`` runs, for ``warmup_days`` days, simulated traffic with no rewriting (the
logs the first nightly job learns from), then for each experiment day:

1. start the gRPC service (:class:`rewrite.server.RewriteServer` on 127.0.0.1) with the
   experiment enabled, serving the version the last night published and the ranker trained on
   that night's run; every simulated user's turns go through it, each user in their arm (the
   service assigns arms by a salted hash, :mod:`rewrite.experiment`), and the simulator acts on
   the rewrite it gets back;
2. write the day's turn logs (with ``arm``, ``rewrite``, ``rewrite_source``,
   ``model_version``) and the simulator's truth;
3. run the nightly job over the logs of the learning window (publish → the next day serves
   the new version), retrain the ranker on that run;
4. label every turn of the day with the job's defect rule (``defects.parquet``, the same rule
   as the absorbing states) and write the per-turn outcomes (:data:`offline.ab.schema.
   OUTCOME_SCHEMA`) to the metrics store (:class:`offline.ab.store.OutcomeStore`, DuckDB over
   Parquet).

The win/loss judge of applied rewrites is the simulator's NLU: ``win`` when the original
utterance would have failed and the rewrite succeeds, ``loss`` when the original would have
succeeded and the rewrite fails, ``tie`` otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from offline.ab.analysis import ABReport, analyze
from offline.ab.schema import OUTCOME_SCHEMA
from offline.ab.store import OutcomeStore
from offline.guardrails import PublishRefusedError
from rewrite.config import Settings
from rewrite.experiment import ArmAssigner
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.rerank import RANKER_META_FILE
from rewrite.types import InvalidRequestError, RewriteRequest, RewriteResult

log = logging.getLogger(__name__)

#: Simulator outcome meaning the request did what the user meant.
_SUCCESS = "success"


@dataclass(frozen=True)
class ExperimentPlan:
    """What ``qrw experiment`` simulates.

    Attributes:
        name: experiment name (part of the arm-assignment hash; the store's partition key).
        users: simulated users (split over the arms by the configured shares).
        days: experiment days (the service rewrites; outcomes are recorded).
        warmup_days: days before the experiment with no rewriting (the first night learns
            from them; not analysed).
        seed: simulator seed.
        window_days: the nightly job learns from the last this many days of logs
            (``None`` = every day so far).
        train_ranker: retrain the LightGBM ranker on every night's run (else the heuristic
            ranker serves).
    """

    name: str = "rewrite-ab"
    users: int = 2000
    days: int = 5
    warmup_days: int = 1
    seed: int = 7
    window_days: int | None = None
    train_ranker: bool = True

    def __post_init__(self) -> None:
        if self.users < 4 or self.days < 1 or self.warmup_days < 1:
            raise ValueError("need users >= 4, days >= 1 and warmup_days >= 1")
        if self.window_days is not None and self.window_days < 1:
            raise ValueError("window_days must be >= 1 or None")


@dataclass
class DayRecord:
    """What happened on one experiment day (``experiment.json``)."""

    day: int
    turns: int
    served_version: str
    ranker: str | None
    rpc_errors: int
    simulate_s: float
    nightly_s: float
    published_version: str  # active after the night (the served one when refused)
    publish_refused: str | None
    pairs: int
    catalog_entries: int


@dataclass
class ExperimentResult:
    """Return value of :func:`run_experiment`."""

    out: Path
    plan: ExperimentPlan
    store_root: Path
    report: ABReport
    days: list[DayRecord] = field(default_factory=list)
    seconds: float = 0.0


def outcome_rows(
    experiment: str,
    day: int,
    turns: Sequence[dict[str, Any]],
    truth: Sequence[dict[str, Any]],
    defects: pa.Table,
    user_key: bytes,
) -> pa.Table:
    """Per-turn outcomes of one day (:data:`offline.ab.schema.OUTCOME_SCHEMA`).

    Args:
        experiment: experiment name.
        day: experiment day (1-based).
        turns: the day's turn-log rows (simulator output, with ``arm`` set by the service).
        truth: the simulator's truth rows, same order as ``turns``.
        defects: the nightly job's ``defects.parquet`` (``turn_id``, ``defect``, ``reasons``)
            covering at least these turns.
        user_key: HMAC key; ``user`` holds pseudonymous keys only.

    Raises:
        ValueError: a turn has no defect label, or the truth rows do not match the turns.
    """
    label = {
        tid: (bool(d), str(r))
        for tid, d, r in zip(
            defects.column("turn_id").to_pylist(),
            defects.column("defect").to_pylist(),
            defects.column("reasons").to_pylist(),
            strict=True,
        )
    }
    cols: dict[str, list[Any]] = {name: [] for name in OUTCOME_SCHEMA.names}
    pseudo: dict[str, str] = {}
    for row, t in zip(turns, truth, strict=True):
        tid = row["turn_id"]
        if t["turn_id"] != tid:
            raise ValueError(f"truth row {t['turn_id']} does not match turn {tid}")
        if tid not in label:
            raise ValueError(f"turn {tid} has no defect label (was it in the nightly window?)")
        defect, reasons = label[tid]
        uid = row["user_id"]
        if uid not in pseudo:
            pseudo[uid] = pseudonymize(uid, user_key)
        rewritten = bool(row.get("rewrite"))
        outcome: str | None = None
        if rewritten:
            before_ok = t.get("original_outcome") == _SUCCESS
            after_ok = t.get("outcome") == _SUCCESS
            outcome = (
                "win"
                if after_ok and not before_ok
                else "loss"
                if before_ok and not after_ok
                else "tie"
            )
        cols["experiment"].append(experiment)
        cols["day"].append(day)
        cols["arm"].append(row.get("arm") or "")
        cols["user"].append(pseudo[uid])
        cols["session_id"].append(t.get("session_id") or "")
        cols["turn_id"].append(tid)
        cols["timestamp"].append(datetime.fromisoformat(row["timestamp"]))
        cols["utterance"].append(row.get("utterance"))
        cols["rewrite"].append(row.get("rewrite") if rewritten else None)
        cols["rewrite_source"].append(row.get("rewrite_source") if rewritten else None)
        cols["model_version"].append(row.get("model_version") or None)
        cols["domain"].append(t.get("domain"))
        cols["defect"].append(defect)
        cols["defect_reasons"].append(reasons)
        cols["true_defect"].append(t.get("defective"))
        cols["rewritten"].append(rewritten)
        cols["rewrite_outcome"].append(outcome)
    return pa.Table.from_pydict(cols, schema=OUTCOME_SCHEMA)


def _threshold_met(ranker: Path) -> bool:
    """Whether a trained ranker found a trigger threshold at the target precision on dev."""
    meta = json.loads((ranker / RANKER_META_FILE).read_text())
    return bool(meta.get("threshold_met"))


def _guarded(
    rewrite: Callable[[RewriteRequest], RewriteResult], assigner: ArmAssigner, errors: list[str]
) -> Callable[[RewriteRequest], RewriteResult]:
    """The service call as the simulator sees it: an RPC failure is counted and the turn goes
    on unrewritten in the user's assigned arm (what an assistant does when the rewriter is
    down), so one failure never stops the experiment; the count is reported."""

    def call(req: RewriteRequest) -> RewriteResult:
        try:
            return rewrite(req)
        except (grpc.RpcError, InvalidRequestError) as err:  # counted in DayRecord.rpc_errors
            errors.append(f"{type(err).__name__}: {err}")
            return RewriteResult(
                rewrite=req.utterance,
                rewritten=False,
                source="none",
                confidence=0.0,
                model_version="",
                normalized=req.utterance,
                arm=assigner.assign(req.user_id).name,
                reason="rpc_error",
            )

    return call


def run_experiment(
    settings: Settings,
    corpus: Path,
    out: Path,
    plan: ExperimentPlan,
    console: Console | None = None,
) -> ExperimentResult:
    """Run the closed loop (module docstring) and analyse it.

    Args:
        settings: loaded settings; Redis must be reachable (``redis.url`` or the embedded
            server the caller started); ``experiment.arms`` gives arms and shares.
        corpus: SLURP ``utterances.jsonl``.
        out: experiment folder: ``logs/``, ``truth/``, ``runs/night-XX/``, ``rankers/``,
            ``outcomes/`` (the metrics store), ``report.json``, ``experiment.json``.
        plan: :class:`ExperimentPlan`.
        console: where progress lines go (the CLI's console).

    Returns:
        :class:`ExperimentResult` with the :class:`~offline.ab.analysis.ABReport`.

    Raises:
        FileNotFoundError: ``corpus`` is missing.
        offline.publish.PublishError: Redis is unreachable at publish.
    """
    from offline.demo import train_run_ranker
    from offline.job import run_nightly
    from offline.schema import write_jsonl, write_turn_logs
    from offline.simulate import Simulator, SimulatorConfig
    from rewrite.client import RewriteClient
    from rewrite.server import RewriteServer

    if not corpus.exists():
        raise FileNotFoundError(f"SLURP corpus not found: {corpus}")
    console = console or Console(quiet=True)
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "truth", "runs", "rankers"):
        (out / sub).mkdir(exist_ok=True)
    served = settings.model_copy(deep=True)
    served.experiment.enabled = True
    served.experiment.name = plan.name
    assigner = ArmAssigner(served.experiment)
    shares = {name: arm.share for name, arm in served.experiment.arms.items()}
    store = OutcomeStore(out / "outcomes")
    user_key = user_key_from_settings(settings)
    sim = Simulator(
        corpus, plan.users, plan.seed, config=SimulatorConfig.from_settings(settings.simulator)
    )
    log_files: list[Path] = []

    def simulate(
        sim_day: int, rewrite_fn: Callable[[RewriteRequest], RewriteResult] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        res = sim.simulate_day(sim_day, rewrite_fn=rewrite_fn, progress=False)
        path = out / "logs" / f"day-{sim_day:02d}.jsonl"
        write_turn_logs(res.turns, path)
        write_jsonl(res.truth, out / "truth" / f"day-{sim_day:02d}.jsonl")
        log_files.append(path)
        return res.turns, res.truth

    kept: list[Path | None] = [None]  # the ranker serving now (a usable one is kept)
    active: list[str] = [""]  # the version serving now

    def nightly(tag: str, force: bool = False) -> tuple[Any, Path | None, float, str | None]:
        """Job over the learning window, published unless the guardrails refuse (then the
        active version and ranker keep serving, as in production); then a ranker on that
        run. A new ranker whose dev threshold misses the precision target would silence the
        online layer, so the last ranker that met it keeps serving instead (with none yet, the
        silent one serves: precision before coverage; the heuristic ranker is far less
        precise). Returns
        ``(report, ranker, seconds, refusal reason or None)``."""
        t0 = time.perf_counter()
        window = log_files if plan.window_days is None else log_files[-plan.window_days :]
        run = out / "runs" / tag
        try:
            rep = run_nightly(window, run, settings, publish=True, force=force)
        except PublishRefusedError as err:
            if err.report is None:
                raise
            console.print(f"   publish refused ({err.reason}); {active[0]} keeps serving")
            return err.report, kept[0], time.perf_counter() - t0, err.reason
        assert rep.publish is not None  # publish=True and not refused
        active[0] = str(rep.publish["version"])
        if plan.train_ranker:
            new = train_run_ranker(run, settings, out / "rankers" / tag, console)
            if new is not None and (_threshold_met(new) or kept[0] is None):
                kept[0] = new  # one that missed the target never triggers: online layer silent
            elif kept[0] is not None:
                console.print(f"   keeping the previous ranker {kept[0].name}")
        return rep, kept[0], time.perf_counter() - t0, None

    console.print(
        f"experiment {plan.name!r}: {plan.users} users, arms "
        + ", ".join(f"{a} {s:.0%}" for a, s in shares.items())
        + f"; {plan.warmup_days} warm-up day(s), {plan.days} experiment day(s)"
    )
    for w in range(1, plan.warmup_days + 1):
        turns, _ = simulate(w, None)
        console.print(f"  warm-up day {w}: {len(turns)} turns, no rewriting")
    # night 0 starts the experiment's lineage: forced past the change check against whatever
    # version was active before (logged by the job)
    rep, ranker, secs, _ = nightly(f"night-{plan.warmup_days:02d}", force=True)
    console.print(
        f"  night 0: published {active[0]} ({rep.counts['pairs']} pairs, "
        f"{rep.counts['catalog_entries']} catalog entries) in {secs:.0f} s"
    )
    result_days: list[DayRecord] = []
    for day in range(1, plan.days + 1):
        sim_day = plan.warmup_days + day
        day_settings = served.model_copy(deep=True)
        day_settings.rerank.artifact = ranker
        if ranker is None:  # the heuristic ranker (an empty artifacts dir: no LATEST to load)
            day_settings.rerank.artifacts_dir = out / "rankers" / "heuristic"
        errors: list[str] = []
        t0 = time.perf_counter()
        served_version = active[0]
        with (
            RewriteServer(day_settings, host="127.0.0.1", port=0) as server,
            RewriteClient(server.target) as client,
        ):
            turns, truth = simulate(sim_day, _guarded(client.rewrite, assigner, errors))
        sim_s = time.perf_counter() - t0
        if errors:
            log.warning("day %d: %d RPC errors, first: %s", day, len(errors), errors[0])
        rep, next_ranker, secs, refused = nightly(f"night-{sim_day:02d}")
        defects = pq.read_table(out / "runs" / f"night-{sim_day:02d}" / "defects.parquet")
        table = outcome_rows(plan.name, day, turns, truth, defects, user_key)
        store.write_day(plan.name, day, table)
        rec = DayRecord(
            day=day,
            turns=len(turns),
            served_version=served_version,
            ranker=str(ranker) if ranker else None,
            rpc_errors=len(errors),
            simulate_s=round(sim_s, 1),
            nightly_s=round(secs, 1),
            published_version=active[0],
            publish_refused=refused,
            pairs=int(rep.counts["pairs"]),
            catalog_entries=int(rep.counts["catalog_entries"]),
        )
        result_days.append(rec)
        n_rw = sum(table.column("rewritten").to_pylist())
        console.print(
            f"  day {day}: {len(turns)} turns through gRPC in {sim_s:.0f} s "
            f"({n_rw} rewritten, {len(errors)} RPC errors); night: {rec.pairs} pairs, "
            f"{rec.catalog_entries} catalog entries, {secs:.0f} s"
        )
        ranker = next_ranker
    report = analyze(store.read(plan.name), experiment=plan.name, shares=shares)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    seconds = time.perf_counter() - t_all
    (out / "experiment.json").write_text(
        json.dumps(
            {
                "plan": asdict(plan),
                "shares": shares,
                "days": [asdict(d) for d in result_days],
                "seconds": round(seconds, 1),
            },
            indent=2,
        )
    )
    return ExperimentResult(out, plan, store.root, report, result_days, seconds)
