"""Throughput of the span rephrase detector: torch fp32 vs ONNX fp32 vs ONNX int8.

Measures **candidate pairs per second** (one pair = one context turn scored for one current
turn; an example with three context turns counts three) over a fixed set of examples, as
:meth:`offline.detector.inference.SpanDetector.predict` runs it in the nightly job: render,
sort by length, batch with dynamic padding, run, decode. For each backend it prints the median
pairs/s over ``--runs`` runs, pairs per CPU-second of the process (a contention-independent
cost: with 2 threads on 2 free cores wall pairs/s approaches it times the parallel speed-up;
when another job holds a core the two are about equal), the p50 per-batch model latency (ms),
the ratio to torch in the same run, and the agreement with torch (decoded label agreement and
mean per-example cosine of the start/end logits). Target: >= 1,000 pairs/s with ONNX int8 on
2 cores.

Usage::

    python bench/bench_detector.py                         # artifacts/detector/LATEST
    python bench/bench_detector.py --artifact artifacts/detector/<hash> --examples test.jsonl
    python bench/bench_detector.py --train-tiny            # throwaway artifact in /tmp
    python bench/bench_detector.py --max-length 96 --response-tokens 2 --batch-size 128

The torch backend runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it, and
ONNX Runtime without thread spinning unless ``--spin``.

Throughput does not depend on the weights' values, so ``--train-tiny`` (a few training steps)
gives representative speed figures when no trained artifact exists; the agreement figures
are only meaningful on a trained model. ``--max-length`` / ``--response-tokens`` re-render
with a shorter input than the artifact was trained with (speed exploration only).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP threads busy-wait by default; on a shared machine that starves the thread doing
# the work (measured: a training step 4x slower with 2 threads and another job on one core).
# Must be set before torch loads; override from the environment to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench._machine import describe  # noqa: E402
from offline.detector.examples import DetectorExample, read_examples  # noqa: E402
from offline.detector.inference import BACKENDS, SpanDetector, compare_runners  # noqa: E402

log = logging.getLogger("bench_detector")

DEFAULT_EXAMPLE_FILES = (
    ROOT / "data" / "detector" / "test_sim.jsonl",
    ROOT / "data" / "detector" / "test_dstc2.jsonl",
)


def load_examples(path: Path | None, n: int) -> tuple[list[DetectorExample], str]:
    """The first ``n`` examples of ``path`` (default: ``data/detector/test_sim.jsonl``), cycled."""
    if path is None:
        path = next((p for p in DEFAULT_EXAMPLE_FILES if p.exists()), None)
    if path is None:
        raise SystemExit("no detector examples; run `qrw train detector` or pass --examples")
    rows, src = read_examples(path), str(path)
    if not rows:
        raise SystemExit(f"no examples in {src}")
    out = [rows[i % len(rows)] for i in range(n)]
    return out, src


def tiny_artifact(examples: list[DetectorExample]) -> Path:
    """Train a throwaway tiny artifact under /tmp (speed figures only)."""
    from offline.detector.train import SpanTrainConfig, train_span_detector

    res = train_span_detector(
        examples[:80], examples[80:120], SpanTrainConfig.tiny(), Path("/tmp/qrw_bench_artifacts")
    )
    return res.artifact


def resolve_artifact(arg: Path | None) -> Path:
    """``--artifact`` or the one ``artifacts/detector/LATEST`` names."""
    if arg is not None:
        return arg
    from offline.rephrase import resolve_detector_artifact
    from rewrite.config import load_settings

    try:
        return resolve_detector_artifact(load_settings().rephrase)
    except FileNotFoundError as err:
        raise SystemExit(f"{err}\n(or pass --train-tiny for a throwaway artifact)") from err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--examples", type=Path, default=None, help="DetectorExample JSONL")
    ap.add_argument("--n", type=int, default=2000, help="examples per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default=",".join(reversed(BACKENDS)), help="torch first")
    ap.add_argument("--max-length", type=int, default=None, help="re-render shorter")
    ap.add_argument("--response-tokens", type=int, default=None, help="re-render with fewer")
    ap.add_argument("--agreement-n", type=int, default=1000, help="examples for agreement")
    ap.add_argument("--spin", action="store_true", help="let idle ORT threads busy-wait")
    ap.add_argument("--train-tiny", action="store_true", help="throwaway artifact in /tmp")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    examples, src = load_examples(args.examples, args.n)
    artifact = tiny_artifact(examples) if args.train_tiny else resolve_artifact(args.artifact)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "torch" not in backends:
        backends.insert(0, "torch")
    detectors = {
        b: SpanDetector.load(artifact, backend=b, threads=args.threads, allow_spinning=args.spin)
        for b in backends
    }
    render = detectors["torch"].renderer.config
    if args.max_length is not None:
        render = replace(render, max_length=args.max_length)
    if args.response_tokens is not None:
        render = replace(render, max_response_tokens=args.response_tokens)
    for det in detectors.values():
        det.renderer.config = render

    pairs = sum(len(ex.context) for ex in examples)
    rendered = detectors["torch"].renderer.render_many(examples)
    mean_tokens = statistics.fmean(len(r.input_ids) for r in rendered)
    print(f"machine      {describe()}")
    print(f"artifact     {artifact}")
    print(f"examples     {len(examples)} from {src}; {pairs} candidate pairs")
    print(
        f"input        mean {mean_tokens:.1f} tokens/example, max_length {render.max_length}, "
        f"response wordpieces {render.max_response_tokens}"
    )
    print(
        f"setup        batch {args.batch_size}, {args.threads} threads, {args.runs} runs, "
        f"ORT spinning {'on' if args.spin else 'off'}"
    )

    runs: dict[str, list[float]] = {name: [] for name in detectors}
    per_cpu: dict[str, list[float]] = {name: [] for name in detectors}
    batch_ms: dict[str, list[float]] = {name: [] for name in detectors}
    for run in range(args.runs + 1):  # run 0 warms up every backend
        for name, det in detectors.items():
            det.predict(examples if run else examples[:256], batch_size=args.batch_size)
            if run:
                runs[name].append(det.last_stats.pairs_per_s)
                per_cpu[name].append(det.last_stats.pairs / max(det.last_stats.cpu_seconds, 1e-9))
                batch_ms[name] += det.last_stats.batch_ms
                log.info("%s run %d: %.0f pairs/s", name, run, det.last_stats.pairs_per_s)

    agree_set = examples[: args.agreement_n]
    runners = {name: det.runner for name, det in detectors.items()}
    agreement = compare_runners(runners, detectors["torch"].renderer, agree_set)

    torch_pps = statistics.median(runs["torch"])
    print()
    header = (
        f"{'backend':<10} {'pairs/s':>9} {'runs (pairs/s)':>20} {'pairs/CPU-s':>12} "
        f"{'p50 batch ms':>13} {'x torch':>8} {'label agr':>10} {'logit cos':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in detectors:
        pps = statistics.median(runs[name])
        a = agreement[name]
        print(
            f"{name:<10} {pps:>9.0f} {' '.join(f'{x:.0f}' for x in runs[name]):>20} "
            f"{statistics.median(per_cpu[name]):>12.0f} "
            f"{statistics.median(batch_ms[name]):>13.1f} {pps / torch_pps:>8.2f} "
            f"{a.get('label_agreement', 1.0):>10.4f} {a.get('cosine_mean', 1.0):>10.5f}"
        )
    print()
    print(f"agreement on {len(agree_set)} examples; accuracy vs gold labels:")
    for name in detectors:
        a = agreement[name]
        print(
            f"  {name:<10} label acc {a['label_accuracy']:.4f}  exact-span acc "
            f"{a['exact_span_accuracy']:.4f}  pair F1 {a['pair_f1']:.4f}"
        )
    if "onnx-int8" in runs:
        got, target = statistics.median(runs["onnx-int8"]), 1000.0
        status = "meets" if got >= target else "MISSES"
        print(f"\nONNX int8: {got:.0f} pairs/s {status} the {target:.0f} pairs/s target")


if __name__ == "__main__":
    main()
