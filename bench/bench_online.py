"""Speed of the online rewrite path (issue 4): the real gRPC service against a synthetic
``--n``-entry global index (default 1,000,000), with the echo RPC of the same server as floor.

What is real and what is synthetic:

- **Real:** the service (:class:`rewrite.server.RewriteServer`, grpc.aio, in its own process,
  127.0.0.1, ``service.pipeline`` = normalize → precomputed → catalog_gate → encode →
  global_retrieval → personal_retrieval → rerank → trigger; the online requests are no catalog
  entries, so none ends at the gate), the zero-shot DPR query tower on ONNX Runtime
  (``offline.dpr.train.export_zero_shot``; its int8 graph when the artifact kept it), the FAISS
  index written by :func:`offline.index.write_index_dir` (the job's kind for ``--n``: HNSW
  above ``dpr.flat_max_entries``, the ``dpr.ivf_kind`` inverted file above ``dpr.ivf_min_entries``),
  an embedded Redis holding a version published by :func:`offline.publish.publish_pairs` with
  precomputed pairs and personal histories whose vectors come from the real passage tower.
- **Synthetic:** the catalog: distinct texts ``"<verb> <object> in <place>"`` from word lists,
  seeded metadata (frequency, n_users, success_rate, last_seen, domain, intent), and **random
  L2-normalised 384-d float32 vectors** (seeded) instead of passage-tower vectors -- encoding
  1M texts takes hours on 2 cores and the speed of a search does not depend on where the vectors
  came from (uniform random vectors are, if anything, the hard case for HNSW). ``index.json``
  names the zero-shot ``encoder_id`` so the service accepts the index; a cached index is
  re-stamped with the current ``encoder_id`` when the artifact's hash moved (the vectors do not
  depend on it). The index carries the lexical channel when ``dpr.lexical.enabled`` (the
  default; :mod:`rewrite.lexical`: the catalog texts' hashed n-grams and frequency prior
  appended, 512 dimensions; ``QRW_DPR__LEXICAL__ENABLED=false`` builds and serves a
  dense-only index of 384), cached under a key of its own. The ranker: ``--ranker
  synthetic`` (default) trains a LightGBM lambdarank model on random feature groups with
  the production parameters and a fixed ``--ranker-trees`` (500 =
  ``RankerTrainConfig.num_boost_round``, an upper bound: early stopping keeps fewer), so the
  cost of a real booster is measured before one is trained; ``--ranker trained`` serves
  what ``qrw train ranker`` makes of a simulated night (:func:`trained_ranker`: the
  one-standard-error round count and the trigger model, as in production; cached);
  ``heuristic`` uses the fallback ranker; a path uses that ranker artifact.
- **Requests:** online-path utterances are catalog texts with one ASR-like character edit, all
  distinct across the whole run (so the query encoder's LRU cache never hits: worst case), none
  a precomputed pair; 3 of 4 come from users with a personal history (1..200 entries, the
  ``catalog.personal_max_per_user`` cap). Precomputed-hit requests use the pairs' sources with
  other casing and punctuation. With ``--head``, a fourth row of head queries: distinct
  catalog texts as they are (an assistant's commonest requests, which already succeed), from
  the same users, which the service answers at its catalog gate (``succeeds_globally``)
  without encoding, FAISS or the ranker.

Measured per round (``--rounds``, medians printed): for each concurrency in ``--concurrency``
(default 1 2 4 8; ``make bench`` sweeps 1 2 4 8 16 32 64) ``--requests`` calls each of the echo
RPC (same bytes as an online request), the online path and the precomputed-hit path, from one
grpc.aio channel in this process (a closed loop: ``concurrency`` coroutines, each sending its
next call when the last one returned, so the load is bounded by the concurrency). The three
rows of a level are interleaved (since 2026-12-06): after 200 warm-up calls of each, they run
in ``--blocks`` (5) alternating blocks, the order rotating, so the ratios to echo compare calls
made in the same seconds — on this shared VM the echo RPC's own QPS moved 4,600-7,800 between
runs of one day, which made a ratio of rows measured a minute apart noisy.
Client-side p50/p99 (ms) and QPS; ratios to echo; CPU ms per call of the service and of this
client (``/proc``; the machine is shared, so CPU time is the steadier figure), the service's
split by thread group (event loop, online workers, gRPC threads, other: :func:`thread_cpu_s`);
wall and thread-CPU time per stage and a few inner calls (wrappers installed in the server
process: about 12 per request, each 2 clock reads of ~0.1 + ~2 us; off while py-spy samples),
encoder cache hits, service RSS (``/proc/<pid>/status`` VmRSS, VmHWM) after load and at the
end, index build time and size; then PASS/MISS against the issues' targets (precomputed-hit QPS
>= 60 % of the echo QPS at every level; online p99 <= 6 ms and QPS >= 1,000; RSS <= 1 GB) and,
with ``--json FILE``, the medians, ratios and checks as JSON. ``--profile S`` also samples the
server with py-spy (``.venv/bin/pip install py-spy``; not a project dependency) for S
seconds of online load (``--profile-concurrency``, default 1) and prints where the samples
fall (``--native`` adds C frames but pauses the process per sample, which inflates I/O waits;
``--gil`` samples only the thread holding the GIL: what caps one process's throughput). Online
rows also print the mean size of the online stages' micro-batches
(``qrw_online_batch_size``, :mod:`rewrite.batching`).

The index (and the synthetic ranker) are cached under git-ignored ``var/bench/``, keyed by n and
seed (and the HNSW parameters): the first 1M run builds HNSW (minutes), later runs load it.
Settings come from ``configs/default.yaml`` and ``QRW_*`` environment variables in both
processes (e.g. ``QRW_DPR__HNSW_EF_SEARCH=32``). Bounded: rounds x levels x 3 x (requests +
warm-up) calls (~80k by default; a few minutes on 2 cores after the first build).

Run from the repository root::

    .venv/bin/python bench/bench_online.py                   # 1M entries
    .venv/bin/python bench/bench_online.py --n 100000 --requests 500 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # allow `python bench/bench_online.py` without install
    sys.path.insert(0, str(ROOT))

from bench._artifacts import zero_shot_artifact  # noqa: E402
from bench._machine import describe  # noqa: E402
from bench.bench_server_mode import ECHO_METHOD, echo_handler, summary  # noqa: E402
from rewrite._pb.queryrewrite.v1 import rewrite_pb2  # noqa: E402
from rewrite.client import rewrite_stub  # noqa: E402
from rewrite.config import FULL_PIPELINE as CONFIG_FULL_PIPELINE  # noqa: E402
from rewrite.config import Settings, load_settings  # noqa: E402
from rewrite.normalize import normalize_utterance  # noqa: E402
from rewrite.redis_server import EmbeddedRedis  # noqa: E402
from rewrite.retrieval import IVF_KINDS  # noqa: E402
from rewrite.server import RewriteServer  # noqa: E402

FULL_PIPELINE = list(CONFIG_FULL_PIPELINE)
STATS_SERVICE = "qrw.bench.Stats"
STATS_METHOD = f"/{STATS_SERVICE}/Stats"
CACHE = ROOT / "var" / "bench"
BASE_EPOCH = 1_790_000_000.0  # fixed "now" of the synthetic metadata (deterministic cache)
DEVICE_TYPES = ("speaker", "display", "phone", "tv", "car")  # of the synthetic catalog
DAY_S = 86_400.0
N_PAIRS = 200
WARMUP = 200
BAD_REASONS = ("online_unavailable", "store_unavailable", "internal_error")

VERBS = (
    "play", "stop", "pause", "resume", "turn on", "turn off", "set", "check", "find", "book",
    "order", "show", "open", "close", "start", "cancel", "remind me about", "add", "remove",
    "search for", "dim", "brighten", "lock", "unlock", "call", "text", "record", "schedule",
    "rate", "share", "repeat", "skip", "shuffle", "save", "buy", "rent", "watch", "read",
    "describe", "explain",
)  # fmt: skip
DETERMINERS = (
    "the", "my", "some", "the next", "the new", "the old", "the morning", "the evening",
    "the weekend", "the loud", "the quiet", "the cheap", "the best", "the local", "the daily",
    "the family",
)  # fmt: skip
NOUNS = (
    "music", "lights", "alarm", "weather", "news", "podcast", "playlist", "restaurant", "taxi",
    "meeting",
)  # fmt: skip
PLACE_HEADS = (
    "wilker", "ash", "brook", "clay", "dun", "elm", "fair", "glen", "hart", "iver", "kings",
    "lang", "mar", "north", "oak", "pem", "red",
)  # fmt: skip
PLACE_TAILS = ("son", "ton", "field", "ford", "wood", "by", "ley", "ham", "well", "bury")
N_OBJECTS = len(DETERMINERS) * len(NOUNS)
N_PLACES = len(PLACE_HEADS) * len(PLACE_TAILS)
MAX_N = len(VERBS) * N_OBJECTS * N_PLACES  # 1,088,000 distinct texts


def log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[bench_online {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- synthetic data


def catalog_texts(n: int, seed: int) -> list[str]:
    """``n`` distinct texts ``"<verb> <determiner> <noun> in <place>"`` in a seeded order.

    Raises:
        ValueError: ``n`` exceeds the :data:`MAX_N` combinations of the word lists.
    """
    if not 0 < n <= MAX_N:
        raise ValueError(f"--n must be in 1..{MAX_N}")
    ids = np.random.default_rng(seed).permutation(MAX_N)[:n]
    v, rest = np.divmod(ids, N_OBJECTS * N_PLACES)
    o, p = np.divmod(rest, N_PLACES)
    objects = [f"{d} {w}" for d in DETERMINERS for w in NOUNS]
    places = [h + t for h in PLACE_HEADS for t in PLACE_TAILS]
    return [
        f"{VERBS[a]} {objects[b]} in {places[c]}"
        for a, b, c in zip(v.tolist(), o.tolist(), p.tolist(), strict=True)
    ]


def catalog_table(texts: list[str], seed: int) -> Any:
    """The catalog sidecar (``offline.index.CATALOG_SCHEMA``) with seeded metadata:
    frequency >= 3, 2 <= n_users <= frequency, success_rate in [0.7, 1), last_seen within 90
    days before :data:`BASE_EPOCH`, intent = verb, domain = noun, and 1-3 device types per
    entry (of :data:`DEVICE_TYPES`; 2 on average) splitting its turns."""
    import pyarrow as pa

    from offline.index import CATALOG_SCHEMA

    rng = np.random.default_rng(seed + 1)
    n = len(texts)
    freq = 3 + rng.geometric(0.05, size=n)
    users = 2 + (rng.random(n) * (freq - 1)).astype(np.int64)
    intent = [t.split(" in ", 1)[0].split(" ")[0] for t in texts]
    domain = [t.split(" in ", 1)[0].rsplit(" ", 1)[-1] for t in texts]
    rate = rng.uniform(0.7, 1.0, size=n)
    # device types: k in {1, 2, 3} distinct types per entry, turns split at random
    k = rng.integers(1, 4, size=n)
    off = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(k, out=off[1:])
    row = np.repeat(np.arange(n), k)
    first = rng.integers(0, len(DEVICE_TYPES), size=n)
    codes = (first[row] + (np.arange(len(row)) - off[row])) % len(DEVICE_TYPES)
    share = rng.random(len(row)) + 0.05
    share /= np.bincount(row, weights=share, minlength=n)[row]
    turns = np.maximum((share * freq[row]).round().astype(np.int64), 1)
    ok = (turns * rate[row]).round().astype(np.int64)
    stats = pa.StructArray.from_arrays(
        [pa.array(np.array(DEVICE_TYPES)[codes]), pa.array(turns), pa.array(ok)],
        names=["device_type", "turns", "successes"],
    )
    device_types = pa.ListArray.from_arrays(pa.array(off), stats)
    return pa.table(
        {
            "text": texts,
            "frequency": freq.astype(np.int64),
            "n_users": users,
            "success_rate": rate,
            "domain": domain,
            "intent": intent,
            "last_seen": BASE_EPOCH - rng.uniform(0, 90 * DAY_S, size=n),
            "device_types": device_types,
        },
        schema=CATALOG_SCHEMA,
    )


def unit_vectors(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """``(n, dim)`` float32, rows i.i.d. Gaussian then L2-normalised (uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def asr_edit(text: str, rng: np.random.Generator) -> str:
    """One character-level, ASR-like edit (vowel swap, drop, double, adjacent swap) in one
    word (the place or noun twice as often as another word)."""
    words = text.split(" ")
    weights = np.ones(len(words))
    weights[-1] = weights[-3] = 2.0
    w = int(rng.choice(len(words), p=weights / weights.sum()))
    word = words[w]
    i = int(rng.integers(len(word)))
    op = int(rng.integers(4))
    if op == 0 and word[i] in "aeiou":
        other = "aeiou".replace(word[i], "")[int(rng.integers(4))]
        word = word[:i] + other + word[i + 1 :]
    elif op == 1 and len(word) > 3:
        word = word[:i] + word[i + 1 :]
    elif op == 2:
        word = word[:i] + word[i] + word[i:]
    elif i + 1 < len(word):
        word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    else:
        word = word + "e"
    words[w] = word
    return " ".join(words)


def edited_utterances(texts: list[str], count: int, exclude: set[str], seed: int) -> list[str]:
    """``count`` distinct edited catalog texts, none in ``exclude`` (the catalog)."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        for i in rng.integers(len(texts), size=count).tolist():
            u = asr_edit(texts[i], rng)
            if u not in exclude and u not in out:
                out[u] = None
                if len(out) == count:
                    break
    return list(out)


# --------------------------------------------------------------------------- index + artifacts


@dataclass
class IndexBuild:
    """The cached synthetic index folder and what building it cost."""

    directory: Path
    info: Any  # rewrite.retrieval.IndexInfo
    cached: bool
    total_s: float  # texts + metadata + vectors + FAISS + files, wall seconds (first build)
    faiss_s: float  # FAISS build only (index.json params.build_seconds)
    files_mb: float


def build_index(n: int, seed: int, encoder_id: str, settings: Settings, threads: int) -> IndexBuild:
    """Build (or reuse) the synthetic index folder ``var/bench/online-index/n<N>-s<seed>-<p>/``
    (``p`` = hash of kind and HNSW parameters)."""
    from offline.index import EF_CONSTRUCTION, choose_kind, write_index_dir
    from rewrite.retrieval import INDEX_META, IndexInfo

    dpr = settings.dpr
    kind = choose_kind(n, dpr.flat_max_entries, dpr.ivf_min_entries, dpr.ivf_kind)
    params = f"{kind}-{dpr.hnsw_m}-{EF_CONSTRUCTION}" if kind == "hnsw" else kind
    lexical = dpr.lexical.channel()
    params += f"-lexical-{json.dumps(lexical.to_params(), sort_keys=True)}" if lexical else ""
    # "-columns": folders since catalog.arrow (the service maps it; older ones it decodes);
    # "-ivfdata": since the fast-scan lists have a file of their own (format 2, mapped)
    tag = f"{params}-device_types-rg64k-nlist-sqrt-columns-ivfdata"
    key = hashlib.sha256(tag.encode()).hexdigest()[:8]
    out = CACHE / "online-index" / f"n{n}-s{seed}-{key}"
    sidecar = out / "bench.json"
    if (out / INDEX_META).exists() and sidecar.exists():
        info = IndexInfo.read(out)
        if info.encoder_id != encoder_id:  # random vectors: valid for any encoder id
            info = replace(info, encoder_id=encoder_id)
            (out / INDEX_META).write_text(info.to_json())
        total_s = float(json.loads(sidecar.read_text())["total_s"])
        cached = True
    else:
        log(f"building the synthetic {kind} index of {n:,} entries in {out} (once)")
        t0 = time.perf_counter()
        texts = catalog_texts(n, seed)
        table = catalog_table(texts, seed)
        vectors = unit_vectors(n, 384, seed)
        info = write_index_dir(vectors, table, out, encoder_id, dpr, threads=threads)
        total_s = time.perf_counter() - t0
        sidecar.write_text(json.dumps({"total_s": round(total_s, 1), "n": n, "seed": seed}))
        cached = False
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    faiss_s = float(info.params.get("build_seconds", float("nan")))
    return IndexBuild(out, info, cached, total_s, faiss_s, size / 2**20)


def synthetic_ranker(trees: int, seed: int) -> Path:
    """A LightGBM lambdarank artifact (``ranker.txt``, its ONNX export, ``ranker.json``)
    trained for exactly ``trees`` rounds (production parameters, no early stopping) on 1,000
    random groups of 20 candidates; trigger threshold = 90th percentile of the groups' best
    scores. Cached."""
    import lightgbm as lgb

    from offline.rerank_train import RankerTrainConfig, export_trees_onnx
    from rewrite.rerank import FEATURE_NAMES, RANKER_META_FILE, RANKER_MODEL_FILE, RANKER_ONNX_FILE

    out = CACHE / "ranker" / f"t{trees}-s{seed}-f{len(FEATURE_NAMES)}-onnx"
    if (out / RANKER_META_FILE).exists():
        return out
    rng = np.random.default_rng(seed)
    log(f"training the synthetic ranker ({trees} trees; once)")
    n_groups, size, nf = 1000, 20, len(FEATURE_NAMES)
    x = rng.random((n_groups * size, nf)).astype(np.float32)
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    utility = (
        0.6 * x[:, col["dense_cosine"]]
        + 0.4 * x[:, col["ratio"]]
        + 0.2 * x[:, col["phonetic_ratio"]]
        + 0.1 * x[:, col["success_rate"]]
        + 0.1 * rng.standard_normal(len(x))
    ).reshape(n_groups, size)
    y = np.zeros_like(utility)
    y[np.arange(n_groups), utility.argmax(axis=1)] = 1.0
    params = RankerTrainConfig().params()
    ds = lgb.Dataset(x, label=y.reshape(-1), group=[size] * n_groups, params={"verbosity": -1})
    booster = lgb.train(params, ds, num_boost_round=trees)
    model = booster.model_to_string()
    best = booster.predict(x).reshape(n_groups, size).max(axis=1)
    sha = hashlib.sha256(model.encode()).hexdigest()
    meta = {
        "name": "lightgbm_lambdarank",
        "content_hash": f"bench-{sha[:12]}",
        "model_sha256": sha,
        "feature_names": list(FEATURE_NAMES),
        "trigger_threshold": float(np.quantile(best, 0.9)),
        "synthetic": True,
        "num_trees": booster.num_trees(),
    }
    onnx_model, diff = export_trees_onnx(model, x)
    meta["onnx"] = {
        "ranker_sha256": hashlib.sha256(onnx_model).hexdigest(),
        "ranker_max_abs_diff": diff,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RANKER_ONNX_FILE).write_bytes(onnx_model)
    (out / RANKER_MODEL_FILE).write_text(model)
    (out / RANKER_META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def trained_ranker(seed: int, users: int = 1500, days: int = 2) -> Path:
    """A ranker artifact as production trains it: ``qrw simulate`` (``users`` simulated
    users on SLURP commands, ``days`` days), ``qrw nightly`` over those logs (heuristic
    rephrase detector: the ranker's shape, not the detector, is what this measures) and
    ``qrw train ranker --run`` — the real CLI in subprocesses, ~1 minute. Its tree count is
    the one-standard-error round count of the cross-fit (17-36 trees for seeds 0-2 on
    2026-12-08) and it has a trigger model (150 trees, scored on one row per request). The
    service serves it on the synthetic index like any artifact (same feature names).
    Cached under ``var/bench/ranker/trained-s<seed>``.

    Raises:
        FileNotFoundError: no SLURP corpus at ``../shared/data/slurp/utterances.jsonl``.
        RuntimeError: a CLI step failed (the end of its stderr in the message), or training
            left no artifact.
    """
    from rewrite.rerank import RANKER_META_FILE

    out = CACHE / "ranker" / f"trained-s{seed}-u{users}-d{days}"

    def trained() -> Path | None:
        metas = sorted(out.glob(f"ranker/*/{RANKER_META_FILE}"))
        return metas[0].parent if metas else None

    cached = trained()
    if cached is not None:
        return cached
    corpus = ROOT.parent / "shared" / "data" / "slurp" / "utterances.jsonl"
    if not corpus.exists():
        raise FileNotFoundError(f"--ranker trained needs the SLURP corpus at {corpus}")
    qrw = [sys.executable, "-m", "offline.cli"]
    env = {**os.environ, "QRW_REPHRASE__DETECTOR": "heuristic_baseline"}
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    log(f"training a ranker on a simulated night ({users} users; once)")

    def run(*argv: str) -> None:
        proc = subprocess.run([*qrw, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"qrw {argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    run(
        "simulate",
        "--corpus",
        str(corpus),
        "--users",
        str(users),
        "--days",
        str(days),
        "--seed",
        str(seed),
        "--out",
        str(work / "sim"),
    )
    logs = [a for day in sorted((work / "sim").glob("day-*.jsonl")) for a in ("--logs", str(day))]
    run("nightly", *logs, "--out", str(work / "run"))
    run(
        "train",
        "ranker",
        "--run",
        str(work / "run"),
        "--seed",
        str(seed),
        "--out",
        str(out / "ranker"),
    )
    shutil.rmtree(work, ignore_errors=True)
    path = trained()
    if path is None:
        raise RuntimeError(f"qrw train ranker wrote no {RANKER_META_FILE} under {out / 'ranker'}")
    return path


def ranker_trees(artifact: Path) -> str:
    """``"N trees + trigger model of M"`` of a ranker artifact (LightGBM text models)."""
    from rewrite.rerank import RANKER_MODEL_FILE, TRIGGER_MODEL_FILE

    def trees(path: Path) -> int:
        return sum(line.startswith("Tree=") for line in path.read_text().splitlines())

    desc = f"{trees(artifact / RANKER_MODEL_FILE)} trees"
    if (artifact / TRIGGER_MODEL_FILE).exists():
        desc += f" + trigger model of {trees(artifact / TRIGGER_MODEL_FILE)}"
    return desc


def resolve_ranker(name: str, trees: int, seed: int) -> tuple[str, str]:
    """``(ranker, description)`` of a ``--ranker`` value: ``synthetic`` (``trees`` trees,
    :func:`synthetic_ranker`), ``trained`` (:func:`trained_ranker`), ``heuristic`` or an
    artifact folder (as given)."""
    if name == "synthetic":
        return str(synthetic_ranker(trees, seed)), f"synthetic LightGBM lambdarank ({trees} trees)"
    if name == "trained":
        path = trained_ranker(seed)
        return str(path), f"trained on a simulated night ({ranker_trees(path)})"
    return name, name


# --------------------------------------------------------------------------- publish


@dataclass
class Workload:
    """What the client sends (all distinct utterances; see the module docstring)."""

    online: list[rewrite_pb2.RewriteRequest]
    precomputed: list[rewrite_pb2.RewriteRequest]
    version: str
    n_users: int
    n_personal: int
    personal_s: float
    #: head queries (``--head``): catalog texts as they are, from the same users as ``online``
    catalog: list[rewrite_pb2.RewriteRequest] = field(default_factory=list)


def publish_workload(
    url: str,
    index: IndexBuild,
    artifact: Path,
    settings: Settings,
    n_online: int,
    users: int,
    seed: int,
    n_catalog: int = 0,
) -> Workload:
    """Publish pairs + personal histories (passage-tower vectors) + index into Redis and build
    the request lists (``n_catalog`` head queries: distinct catalog texts, which no pair
    covers, so that the service answers them at its catalog gate)."""
    import pyarrow.parquet as pq

    from offline.catalog import PersonalEntry
    from offline.markov import RewritePair
    from offline.publish import connect, publish_pairs
    from rewrite.encoder import PassageEncoder
    from rewrite.privacy import pseudonymize, user_key_from_settings

    texts: list[str] = pq.read_table(index.directory / "catalog.parquet", columns=["text"])[
        "text"
    ].to_pylist()
    catalog = set(texts)
    edited = edited_utterances(texts, n_online + N_PAIRS, catalog, seed + 11)
    pair_sources, online = edited[:N_PAIRS], edited[N_PAIRS:]
    del catalog
    rng = np.random.default_rng(seed + 12)
    pairs = [RewritePair(s, texts[int(rng.integers(len(texts)))], 0.9, 5, 3) for s in pair_sources]
    key = user_key_from_settings(settings)
    cap = settings.catalog.personal_max_per_user
    entries: list[PersonalEntry] = []
    for u in range(users):
        size = int(rng.integers(1, cap + 1))
        pick = rng.choice(len(texts), size=size, replace=False)
        pseudo = pseudonymize(f"bench-user-{u}", key)
        for i in pick.tolist():
            entries.append(
                PersonalEntry(
                    pseudo,
                    texts[i],
                    1 + int(rng.geometric(0.3)),
                    BASE_EPOCH - float(rng.uniform(0, 60 * DAY_S)),
                )
            )
    t0 = time.perf_counter()
    passage = PassageEncoder.load(artifact, threads=2)
    client = connect(url)
    res = publish_pairs(
        client,
        pairs,
        personal=entries,
        encode=passage.encode,
        encoder_id=index.info.encoder_id,
        index_dir=index.directory.resolve(),
        extra_content={"index_sha256": index.info.sha256["index.faiss"]},
    )
    client.close()
    personal_s = time.perf_counter() - t0
    del passage

    def user_of(i: int) -> str:
        return f"bench-user-{i % users}" if i % 4 else f"bench-anon-{i}"

    online_reqs = [
        rewrite_pb2.RewriteRequest(
            utterance=u, user_id=user_of(i), request_id=f"o{i}", device_type=DEVICE_TYPES[i % 5]
        )
        for i, u in enumerate(online)
    ]
    pre_reqs = []
    for i, p in enumerate(pairs):
        shown = p.source.capitalize() + ("?" if i % 2 else "!")
        assert normalize_utterance(shown) == p.source
        pre_reqs.append(rewrite_pb2.RewriteRequest(utterance=shown, user_id=user_of(i)))
    head_rows = np.random.default_rng(seed + 13).choice(len(texts), n_catalog, replace=False)
    catalog_reqs = [
        rewrite_pb2.RewriteRequest(
            utterance=texts[j],
            user_id=user_of(i),
            request_id=f"c{i}",
            device_type=DEVICE_TYPES[i % 5],
        )
        for i, j in enumerate(head_rows.tolist())
    ]
    return Workload(
        online_reqs, pre_reqs, res.version, users, len(entries), personal_s, catalog_reqs
    )


# --------------------------------------------------------------------------- server side


class StageClock:
    """Wall and thread-CPU time of wrapped callables (seconds), by name; read and reset over the
    Stats RPC. Thread CPU time leaves out waiting for the GIL or a core: ONNX Runtime (1
    intra-op thread) and FAISS (1 OpenMP thread) run on the calling thread. It still moves
    with the host's state (up to ~1.6x on the benchmark's VM: see the README), so compare it
    within a run."""

    def __init__(self) -> None:
        self.samples: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
        self.enabled = True  # off while py-spy samples (thread_time() is a ~1-3 us syscall)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        samples = self.samples
        wall, cpu = time.perf_counter, time.thread_time

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            t0, c0 = wall(), cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                samples[name].append((wall() - t0, cpu() - c0))

        return timed

    def report(self) -> dict[str, list[float]]:
        """``{name: [calls, wall mean us, wall p50 us, wall p99 us, wall total s, CPU mean
        us]}``."""
        out = {}
        for name, xs in self.samples.items():
            a = np.asarray(xs) * 1e6
            w = a[:, 0]
            out[name] = [
                float(len(a)),
                float(w.mean()),
                *np.percentile(w, [50, 99]).tolist(),
                float(w.sum() / 1e6),
                float(a[:, 1].mean()),
            ]
        return out


def instrument(srv: RewriteServer, clock: StageClock) -> None:
    """Wrap the pipeline stages and the inner calls named in the report with ``clock``."""
    import rewrite.online as online

    rewriter = srv.rewriter
    assert rewriter is not None
    # the servicer runs prepare (event loop) → complete (an online worker) → finish, so the
    # Rewriter's wall time is taken at finish from the request's start; its CPU is not known
    # in one thread (the stages' CPU column has it)
    finish = rewriter.finish

    def timed_finish(state: Any) -> Any:
        res = finish(state)
        if clock.enabled:
            clock.samples["rewriter"].append((time.perf_counter() - state.started_s, math.nan))
        return res

    rewriter.finish = timed_finish  # type: ignore[method-assign]
    for stage in rewriter.stages:
        stage.run = clock.wrap(f"stage.{stage.name}", stage.run)  # type: ignore[method-assign]
    layer = rewriter.resources.online
    snap = layer.snapshot() if layer is not None else None
    if layer is None or snap is None:
        return
    snap.encoder.session.run = clock.wrap("encode.onnx_run", snap.encoder.session.run)
    snap.index.index.search = clock.wrap("global.faiss_search", snap.index.index.search)
    personal = layer.personal._client
    personal.hgetall = clock.wrap("personal.redis_hgetall", personal.hgetall)
    online.feature_matrices = clock.wrap("rerank.features", online.feature_matrices)  # type: ignore[attr-defined]
    layer.ranker.score_matrix = clock.wrap("rerank.score", layer.ranker.score_matrix)


def stats_handler(get_server: Callable[[], RewriteServer], clock: StageClock) -> Any:
    """``qrw.bench.Stats/Stats``: ``b"reset"`` clears the timers, ``b"on"``/``b"off"`` switch
    them; anything else returns JSON (timers, encoder cache info, snapshot)."""

    async def stats(request: bytes, context: Any) -> bytes:
        if request in (b"reset", b"on", b"off"):
            if request == b"reset":
                clock.samples.clear()
            else:
                clock.enabled = request == b"on"
            return b"{}"
        out: dict[str, Any] = {"timers": clock.report()}
        rewriter = get_server().rewriter
        layer = rewriter.resources.online if rewriter is not None else None
        snap = layer.snapshot() if layer is not None else None
        if snap is not None:
            out["version"] = snap.version
            out["encoder_onnx"] = snap.encoder.onnx_path.name
            out["encoder_cache"] = snap.encoder.cache_info()._asdict()
            out["ef_search"] = getattr(getattr(snap.index.index, "hnsw", None), "efSearch", None)
            out["nprobe"] = snap.index.nprobe
        if layer is not None and layer.ranker is not None:
            out["ranker"] = layer.ranker.name
        out["batches"] = [
            REGISTRY.get_sample_value(f"qrw_online_batch_size_{part}") or 0.0
            for part in ("count", "sum")
        ]
        # the service's Python threads (OS thread id -> name), for thread_cpu_s
        out["threads"] = {str(t.native_id): t.name for t in threading.enumerate()}
        out["personal_cache"] = {
            result: REGISTRY.get_sample_value("qrw_personal_cache_total", {"result": result})
            for result in ("hit", "miss")
        }
        return json.dumps(out).encode()

    return grpc.method_handlers_generic_handler(
        STATS_SERVICE, {"Stats": grpc.unary_unary_rpc_method_handler(stats)}
    )


async def serve(settings: Settings) -> None:
    """The real RewriteServer plus the echo and stats RPCs; prints ``PORT <n>`` when ready."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    clock = StageClock()
    holder: dict[str, RewriteServer] = {}
    extra = [echo_handler(asynchronous=True), stats_handler(lambda: holder["srv"], clock)]
    srv = holder["srv"] = RewriteServer(settings, port=0, extra_handlers=extra)
    await srv.astart()  # warm_up() loads the active version's index before serving
    instrument(srv, clock)
    print(f"PORT {srv.port}", flush=True)
    await stop.wait()
    await srv.astop(0)


def server_settings(redis_url: str, ranker: str) -> Settings:
    """What the benchmarked service runs: the config's settings with ``redis_url``, the full
    online pipeline and ``ranker`` (``heuristic`` or a ranker artifact folder)."""
    settings = load_settings()
    settings.redis.url = redis_url
    settings.service.pipeline = list(FULL_PIPELINE)
    if ranker == "heuristic":
        settings.rerank.artifact = None
        settings.rerank.artifacts_dir = CACHE / "no-ranker"  # no LATEST: heuristic ranker
    else:
        settings.rerank.artifact = Path(ranker)
    return settings


def run_server(redis_url: str, ranker: str) -> None:
    """Server process entry point (``--serve``)."""
    asyncio.run(serve(server_settings(redis_url, ranker)))


def start_server(
    redis_url: str, ranker: str, timeout_s: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start the service process; returns (process, port) once it printed ``PORT`` (it loads the
    active version's index before that), within ``timeout_s`` seconds. ``env``: settings
    overrides (``QRW_...``) for the service."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--redis-url", redis_url, "--ranker", ranker],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=ROOT,
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout_s)
    sel.close()
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"service did not start within {timeout_s:.0f} s: {line!r}")
    return proc, int(line.split()[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: Thread groups of the service process whose CPU the benchmark reports apart
#: (:func:`thread_cpu_s`): the asyncio event loop (main thread: gRPC handlers, protobuf,
#: validate / normalize / precomputed, finishing the response), the online worker threads
#: (``qrw-online_*``: encode → trigger), gRPC's C-core threads (``event_engine``, ``grpc*``),
#: grpc.aio's Python poller thread (``..._poll_wrapper``: hands completion-queue events to
#: the loop) and the rest (threads that ended between readings, Redis, the metrics server).
THREAD_GROUPS = ("loop", "workers", "grpc", "poller", "other")


def thread_cpu_s(pid: int, names: dict[str, str]) -> dict[str, float]:
    """User + system CPU seconds of a process by :data:`THREAD_GROUPS`, from
    ``/proc/<pid>/task/<tid>/{comm,stat}`` (clock ticks); ``names``: the process's Python
    thread names by OS thread id (its Stats RPC; Python does not name OS threads, so the
    workers show as ``python`` in ``comm``); ``other`` = the process total
    (:func:`proc_cpu_s`, which keeps ended threads' time) less the named groups."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(THREAD_GROUPS, 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        if task.name == str(pid):
            group = "loop"
        elif names.get(task.name, "").startswith("qrw-online"):
            group = "workers"
        elif comm == "event_engine" or comm.startswith("grpc"):
            group = "grpc"
        elif "_poll_wrapper" in names.get(task.name, ""):
            group = "poller"
        else:
            continue
        out[group] += (int(fields[11]) + int(fields[12])) / tick
    out["other"] = proc_cpu_s(pid) - sum(out[g] for g in THREAD_GROUPS if g != "other")
    return out


def own_cpu_s() -> float:
    """User + system CPU seconds of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def proc_fields_mb(path: Path, names: Sequence[str]) -> dict[str, float]:
    """The ``names`` fields of a ``/proc`` file of ``Name: <n> kB`` lines (``status``,
    ``smaps_rollup``), MB."""
    out = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name in names:
            out[name] = int(value.split()[0]) / 1024.0
    return out


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, MB."""
    return proc_fields_mb(Path(f"/proc/{pid}/status"), ("VmRSS", "VmHWM"))


# --------------------------------------------------------------------------- client side


@dataclass
class Row:
    """One measured row: latencies (s), wall seconds, response reasons and server ms."""

    rpc: str
    conc: int
    latencies: list[float]
    wall_s: float
    server_cpu_s: float  # service process CPU (user + system) over the timed calls
    client_cpu_s: float  # this process's CPU over the timed calls
    reasons: Counter[str] = field(default_factory=Counter)
    server_ms: list[float] = field(default_factory=list)
    batches: tuple[float, float] = (0.0, 0.0)  # online micro-batches run, requests in them
    # service CPU seconds over the timed calls by thread group (THREAD_GROUPS)
    server_threads_s: dict[str, float] = field(default_factory=dict)


async def drive(
    call: Callable[[Any], Any], payloads: Sequence[Any], concurrency: int
) -> tuple[list[float], float, list[Any]]:
    """One call per payload from ``concurrency`` coroutines; (latencies s, wall s, responses)."""
    latencies: list[float] = []
    responses: list[Any] = []
    it = iter(payloads)

    async def worker() -> None:
        for p in it:
            t0 = time.perf_counter()
            r = await call(p)
            latencies.append(time.perf_counter() - t0)
            responses.append(r)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0, responses


class Client:
    """grpc.aio stubs on one channel, and a cursor over the distinct online requests."""

    def __init__(self, channel: grpc.aio.Channel, work: Workload, pid: int) -> None:
        self._rewrite = rewrite_stub(channel)
        self._echo = channel.unary_unary(ECHO_METHOD)
        self._stats = channel.unary_unary(STATS_METHOD)
        self.work = work
        self.pid = pid
        self._next = 0
        self._next_pre = 0
        self._next_head = 0

    async def rewrite(self, req: rewrite_pb2.RewriteRequest) -> rewrite_pb2.RewriteResponse:
        return await self._rewrite(req, timeout=5)

    async def echo(self, payload: bytes) -> bytes:
        return await self._echo(payload, timeout=5)

    async def stats(self, command: str = "get") -> dict[str, Any]:
        """Server timers (``get``), or ``reset`` / ``on`` / ``off`` them."""
        raw = await self._stats(command.encode(), timeout=5)
        return dict(json.loads(raw))

    def take_online(self, n: int) -> list[rewrite_pb2.RewriteRequest]:
        """The next ``n`` never-sent online requests (wraps only past the pool)."""
        pool = self.work.online
        out = [pool[(self._next + i) % len(pool)] for i in range(n)]
        self._next += n
        return out

    async def wait_online(self, timeout_s: float) -> rewrite_pb2.RewriteResponse:
        """Poll until an online request is answered by the online layer (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = await self.rewrite(self.take_online(1)[0])
            if r.source != "none" or r.reason != "online_unavailable":
                return r
            if time.monotonic() > deadline:
                raise RuntimeError(f"online layer not loaded after {timeout_s:.0f} s: {r}")
            await asyncio.sleep(0.5)

    def payloads(self, rpc: str, n: int) -> tuple[Callable[[Any], Any], list[Any]]:
        """The call and ``n`` payloads of ``rpc`` (echo | online | precomputed | head): online
        and head requests never sent before (head: wraps only past its pool), precomputed hits
        cycling through the pairs, echo payloads the bytes of online requests."""
        if rpc == "precomputed":
            pre = self.work.precomputed
            reqs = [pre[(self._next_pre + i) % len(pre)] for i in range(n)]
            self._next_pre += n
        elif rpc == "head":
            head = self.work.catalog
            reqs = [head[(self._next_head + i) % len(head)] for i in range(n)]
            self._next_head += n
        else:
            reqs = self.take_online(n)
        if rpc == "echo":
            return self.echo, [r.SerializeToString() for r in reqs]
        return self.rewrite, list(reqs)

    async def warm(self, rpc: str, conc: int) -> None:
        """:data:`WARMUP` untimed calls of ``rpc`` at ``conc``."""
        call, payloads = self.payloads(rpc, WARMUP)
        await drive(call, payloads, conc)

    async def row(self, rpc: str, conc: int, n: int) -> Row:
        """``n`` timed calls of ``rpc`` (echo | online | precomputed), no warm-up."""
        call, payloads = self.payloads(rpc, n)
        before = await self.stats()
        b0, names = before.get("batches", [0.0, 0.0]), before.get("threads", {})
        t0, c0 = thread_cpu_s(self.pid, names), own_cpu_s()
        lat, wall, resp = await drive(call, payloads, conc)
        t1, c1 = thread_cpu_s(self.pid, names), own_cpu_s()
        threads = {g: t1[g] - t0[g] for g in THREAD_GROUPS}
        # the groups add up to the process total (``other`` is the remainder)
        cpu = (sum(threads.values()), c1 - c0)
        b1 = (await self.stats()).get("batches", [0.0, 0.0])
        if rpc == "echo":
            return Row(rpc, conc, lat, wall, *cpu, server_threads_s=threads)
        reasons = Counter(r.source if r.rewritten else r.reason for r in resp)
        batches = (b1[0] - b0[0], b1[1] - b0[1])
        server_ms = [r.latency_ms for r in resp]
        return Row(rpc, conc, lat, wall, *cpu, reasons, server_ms, batches, threads)


def merge_rows(parts: Sequence[Row]) -> Row:
    """One row from the blocks of one rpc at one concurrency: latencies and server times
    pooled, wall and CPU times and outcome counts summed (QPS = calls / summed wall)."""
    first = parts[0]
    reasons: Counter[str] = Counter()
    for p in parts:
        reasons.update(p.reasons)
    return Row(
        first.rpc,
        first.conc,
        [x for p in parts for x in p.latencies],
        sum(p.wall_s for p in parts),
        sum(p.server_cpu_s for p in parts),
        sum(p.client_cpu_s for p in parts),
        reasons,
        [x for p in parts for x in p.server_ms],
        (sum(p.batches[0] for p in parts), sum(p.batches[1] for p in parts)),
        {g: sum(p.server_threads_s.get(g, 0.0) for p in parts) for g in THREAD_GROUPS},
    )


RPCS = ("echo", "online", "precomputed")
#: The rows with ``--head``: also head queries (catalog texts), which end at the catalog gate.
RPCS_HEAD = (*RPCS, "head")


async def level(
    client: Client, conc: int, n: int, blocks: int, timed_online: bool, rpcs: Sequence[str] = RPCS
) -> list[Row]:
    """The rows of one concurrency level (``rpcs``), interleaved: after a warm-up of each rpc,
    ``blocks`` rounds of ``n / blocks`` calls of each, the order rotating every block, so a
    drift of the machine's speed (a shared VM's neighbours, clock changes) falls on echo,
    online and precomputed alike and the ratios to echo compare calls made in the same
    seconds. ``timed_online``: the server's stage timers run during the online blocks only
    (the concurrency-1 stage table)."""
    rpcs = tuple(rpcs)
    for rpc in rpcs:
        await client.warm(rpc, conc)
    sizes = [n // blocks + (1 if b < n % blocks else 0) for b in range(blocks)]
    parts: dict[str, list[Row]] = {rpc: [] for rpc in rpcs}
    if timed_online:
        await client.stats("reset")
        await client.stats("off")
    for b, size in enumerate(sizes):  # every size >= 1: --blocks <= --requests
        turn = b % len(rpcs)
        for rpc in rpcs[turn:] + rpcs[:turn]:
            if timed_online and rpc == "online":
                await client.stats("on")
            parts[rpc].append(await client.row(rpc, conc, size))
            if timed_online and rpc == "online":
                await client.stats("off")
    if timed_online:
        await client.stats("on")
    return [merge_rows(parts[rpc]) for rpc in rpcs]


async def measure(
    port: int, work: Workload, args: argparse.Namespace, pid: int, spawned: float
) -> tuple[list[Row], dict[str, Any], dict[str, Any]]:
    """All rounds; returns (rows, server stats of the concurrency-1 online rows, memory)."""
    rows: list[Row] = []
    stats: dict[str, Any] = {}
    mem: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = Client(channel, work, pid)
        first = await client.wait_online(args.load_timeout)
        hit = await client.rewrite(work.precomputed[0])
        if hit.source != "precomputed" or hit.model_version != work.version:
            raise RuntimeError(f"the service did not answer a precomputed pair: {hit}")
        mem["ready_s"] = time.perf_counter() - spawned
        mem["after_load"] = proc_memory_mb(pid)
        log(f"online layer answering ({first.reason or first.source}); RSS {mem['after_load']}")
        for rnd in range(args.rounds):
            for conc in args.concurrency:
                rows += await level(
                    client, conc, args.requests, args.blocks, conc == 1, rpcs_of(args)
                )
                if conc == 1 and rnd == args.rounds - 1:
                    stats = await client.stats()
            log(f"round {rnd + 1}/{args.rounds} done")
        if args.profile > 0:
            stats["profile"] = await profile(
                client, pid, args.profile, args.native, args.profile_concurrency, args.gil
            )
        mem["end"] = proc_memory_mb(pid)
    return rows, stats, mem


async def profile(
    client: Client, pid: int, seconds: float, native: bool, concurrency: int = 1, gil: bool = False
) -> dict[str, Any]:
    """Sample the service with py-spy (raw stacks) during ``seconds`` of online load at
    ``concurrency`` (``gil``: only the thread holding the GIL); returns ``{category: share}``
    and the raw file's path."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        return {"error": f"py-spy not installed ({exe}); .venv/bin/pip install py-spy"}
    out = CACHE / f"online-profile-{pid}.txt"
    spy = subprocess.Popen(
        [str(exe), "record", "--pid", str(pid), "--rate", "200" if native else "500",
         "--format", "raw",
         "--output", str(out), "--duration", str(int(seconds) + 30),
         *(["--native"] if native else ["--nonblocking"]),
         *(["--gil"] if gil else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await client.stats("off")
    try:
        await asyncio.sleep(1.0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await drive(client.rewrite, client.take_online(200 * concurrency), concurrency)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)
        await client.stats("on")
    if not out.exists():
        return {"error": "py-spy wrote no profile"}
    return {"file": str(out), "shares": classify_profile(out)}


PROFILE_RULES = (
    ("encode: ONNX Runtime run", ("onnxruntime",)),
    ("global: FAISS search", ("faiss",)),
    ("rerank: LightGBM predict", ("lightgbm",)),
    ("personal: Redis HGETALL (redis-py + socket)", ("rewrite/personal.py", "redis/")),
    ("precomputed: Redis lookup (redis-py + socket)", ("rewrite/store.py",)),
    ("rerank: features (rapidfuzz, metaphone)", ("rewrite/rerank.py",)),
    ("personal: decode", ("rewrite/personal.py",)),
    ("global: candidate objects", ("rewrite/retrieval.py",)),
    ("encode: tokenizer, LRU cache, normalise", ("rewrite/encoder.py",)),
    ("online stages: merge, argsort, glue", ("rewrite/online.py",)),
    ("rewriter: validate, normalize, metrics", ("rewrite/rewriter.py",)),
    ("servicer: proto <-> dataclass, deadline", ("rewrite/server.py",)),
    ("benchmark timers", ("timed (bench_online.py",)),
    ("gRPC, asyncio, protobuf (outside the Rewriter)", ()),
)
IDLE_LEAVES = ("(threading.py", "epoll_wait", "pthread_cond_wait", "futex")


def classify_profile(path: Path) -> dict[str, float]:
    """Share of non-idle py-spy samples per :data:`PROFILE_RULES` category (the first rule
    whose strings all occur in the stack wins; "benchmark timers" when the stack ends in the
    timer wrapper). Stacks ending in the event loop's ``select`` or a parked thread are idle
    (their share of all samples is reported as ``idle``)."""
    counts: Counter[str] = Counter()
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if any(s in leaf for s in IDLE_LEAVES) or "(selectors.py" in stack:
            idle += int(n)
            continue
        if "bench_online.py:" in leaf:  # in the timer wrapper itself
            counts["benchmark timers"] += int(n)
            continue
        for name, needles in PROFILE_RULES:
            if all(s in stack for s in needles):
                counts[name] += int(n)
                break
    busy = sum(counts.values()) or 1
    out = {name: counts[name] / busy for name, _ in PROFILE_RULES if counts[name]}
    out["idle (share of all samples)"] = idle / (busy + idle)
    return out


# --------------------------------------------------------------------------- report


def rpcs_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The rows this run measures: :data:`RPCS`, plus ``head`` with ``--head``."""
    return RPCS_HEAD if args.head else RPCS


def degraded(rows: list[Row], rpc: str, conc: int) -> int:
    """Answers of (rpc, conc) that passed through because a dependency failed
    (:data:`BAD_REASONS`, e.g. a Redis read over ``redis.socket_timeout_s`` on a loaded
    machine): such a row measures the fallback, not the path, and is left out of the targets."""
    return sum(r.reasons[k] for r in rows if r.rpc == rpc and r.conc == conc for k in BAD_REASONS)


def thread_ms_per_call(rows: list[Row], rpc: str, conc: int) -> dict[str, float]:
    """Service CPU ms per call of the rows of ``rpc`` at ``conc``, by :data:`THREAD_GROUPS`
    (all rounds pooled)."""
    sel = [r for r in rows if r.rpc == rpc and r.conc == conc]
    calls = max(sum(len(r.latencies) for r in sel), 1)
    return {
        g: 1e3 * sum(r.server_threads_s.get(g, 0.0) for r in sel) / calls for g in THREAD_GROUPS
    }


def med(rows: list[Row], rpc: str, conc: int) -> tuple[float, float, float, float, float]:
    """Medians over rounds of (p50 ms, p99 ms, QPS) plus the QPS range."""
    figs = [summary(r.latencies, r.wall_s) for r in rows if r.rpc == rpc and r.conc == conc]
    qps = [f[2] for f in figs]
    return (
        statistics.median(f[0] for f in figs),
        statistics.median(f[1] for f in figs),
        statistics.median(qps),
        min(qps),
        max(qps),
    )


def report(
    args: argparse.Namespace,
    build: IndexBuild,
    work: Workload,
    ranker_desc: str,
    rows: list[Row],
    stats: dict[str, Any],
    mem: dict[str, Any],
    start_s: float,
) -> None:
    """Print the tables and the PASS/MISS lines."""
    info = build.info
    params = info.params
    kind = info.kind
    if kind == "hnsw":
        kind += f" M={params.get('hnsw_m')} efC={params.get('ef_construction')} "
        kind += f"efSearch={stats.get('ef_search')}"
    elif kind in IVF_KINDS:
        kind += f" nlist={params.get('nlist')} nprobe={stats.get('nprobe')}"
        if "refine_k_factor" in params:
            kind += f" refine k_factor={params['refine_k_factor']}"
    cache = stats.get("encoder_cache", {})
    pcache = stats.get("personal_cache", {})
    print(
        f"\nqrw online benchmark: {info.n:,} catalog entries ({kind}); query tower "
        f"{stats.get('encoder_onnx')} of {info.encoder_id}; ranker {ranker_desc}; "
        f"{args.requests} calls per row + {WARMUP} warm-up, median of {args.rounds} round(s); "
        f"{describe()}; 1-min load average {mem['load_start']:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; grpcio {grpc.__version__}; pair cache "
        f"{args.pair_cache_size if args.pair_cache_size is not None else 'config default'} "
        "entries (precomputed rows repeat their utterances: after the warm-up they are cache "
        "hits unless it is 0)"
    )
    built = "cached; first build took" if build.cached else "built in"
    print(
        f"index: {built} {build.total_s:.0f} s (FAISS {build.faiss_s:.0f} s); files "
        f"{build.files_mb:,.0f} MB; published {work.version}: {N_PAIRS} pairs, {work.n_users} "
        f"users / {work.n_personal:,} personal entries (passage-encoded + published in "
        f"{work.personal_s:.0f} s)"
    )
    a, e = mem["after_load"], mem["end"]
    print(
        f"service: ready {mem['ready_s']:.1f} s after process start; RSS after load "
        f"{a['VmRSS']:,.0f} MB (VmHWM {a['VmHWM']:,.0f}); at end {e['VmRSS']:,.0f} MB (VmHWM "
        f"{e['VmHWM']:,.0f}); query-encoder cache hits {cache.get('hits')} / misses "
        f"{cache.get('misses')} (last online conc-1 row); personal-history cache "
        f"({args.personal_cache_mb if args.personal_cache_mb is not None else 'config default'}"
        f" MiB) hits {pcache.get('hit')} / misses {pcache.get('miss')} (whole run; "
        f"{work.n_users} users, so after the first minute of load nearly every read is a hit)"
    )
    print(
        f"\n{'rpc':<12}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'QPS':>8}{'QPS range':>13}"
        f"{'p50/echo':>10}{'QPS/echo':>10}{'srv p50':>9}{'rest p50':>9}{'srv CPU':>9}"
        f"{'cli CPU':>9}  outcomes"
    )
    for conc in args.concurrency:
        e50, _, eqps, _, _ = med(rows, "echo", conc)
        for rpc in rpcs_of(args):
            p50, p99, qps, lo, hi = med(rows, rpc, conc)
            sel = [r for r in rows if r.rpc == rpc and r.conc == conc]
            srv = [x for r in sel for x in r.server_ms]
            reasons: Counter[str] = sum((r.reasons for r in sel), Counter())
            top = ", ".join(f"{k} {v}" for k, v in reasons.most_common(3))
            n_batches = sum(r.batches[0] for r in sel)
            if rpc == "online" and n_batches:
                top += f"; mean batch {sum(r.batches[1] for r in sel) / n_batches:.1f}"
            sp50 = f"{statistics.median(srv):.3f}" if srv else "-"
            rest = [
                1e3 * t - m for r in sel for t, m in zip(r.latencies, r.server_ms, strict=False)
            ]
            rp50 = f"{statistics.median(rest):.3f}" if rest else "-"
            calls = sum(len(r.latencies) for r in sel)
            scpu = 1e3 * sum(r.server_cpu_s for r in sel) / calls
            ccpu = 1e3 * sum(r.client_cpu_s for r in sel) / calls
            print(
                f"{rpc:<12}{conc:>5}{p50:>9.3f}{p99:>9.3f}{qps:>8.0f}{f'{lo:.0f}-{hi:.0f}':>13}"
                f"{p50 / e50:>10.2f}{qps / eqps:>10.2f}{sp50:>9}{rp50:>9}{scpu:>9.3f}{ccpu:>9.3f}"
                f"  {top}"
            )
    print(
        "(ms; srv p50 = the Rewriter's own time (response latency_ms); rest p50 = per call, "
        "client latency - Rewriter time = gRPC both ways + event loops; srv/cli CPU = CPU ms "
        "per call of the service / this client process, all threads)"
    )
    print(f"\nservice CPU ms per call by thread ({', '.join(THREAD_GROUPS)}; see THREAD_GROUPS)")
    print(f"{'rpc':<12}{'conc':>5}" + "".join(f"{g:>9}" for g in THREAD_GROUPS))
    for conc in args.concurrency:
        for rpc in rpcs_of(args):
            per = thread_ms_per_call(rows, rpc, conc)
            print(f"{rpc:<12}{conc:>5}" + "".join(f"{per[g]:>9.3f}" for g in THREAD_GROUPS))
    timers = stats.get("timers", {})
    if timers:
        total = timers.get("rewriter", [1, 1, 0, 0, 1])
        print(
            "\nserver time, online path, concurrency 1 (last round; wall us, share of the "
            "Rewriter's wall time, mean thread-CPU us; inner calls indented)"
        )
        print(f"{'':<34}{'calls':>7}{'mean':>9}{'p50':>9}{'p99':>9}{'share':>8}{'CPU':>9}")
        order = ["rewriter"] + [f"stage.{s}" for s in FULL_PIPELINE]
        inner = {
            "stage.encode": ["encode.onnx_run"],
            "stage.global_retrieval": ["global.faiss_search"],
            "stage.personal_retrieval": ["personal.redis_hgetall"],
            "stage.rerank": ["rerank.features", "rerank.score"],
        }
        for name in order:
            for sub, t in [(name, timers.get(name))] + [
                (f"  {s}", timers.get(s)) for s in inner.get(name, [])
            ]:
                if t:
                    share = t[4] / total[4] if total[4] else 0.0
                    print(
                        f"{sub:<34}{t[0]:>7.0f}{t[1]:>9.1f}{t[2]:>9.1f}{t[3]:>9.1f}"
                        f"{share:>8.1%}{t[5]:>9.1f}"
                    )
    prof = stats.get("profile")
    if prof:
        what = "GIL holder" if args.gil else "service"
        print(
            f"\npy-spy samples of the {what}, online conc {args.profile_concurrency} "
            f"({prof.get('file', '')}):"
        )
        if "error" in prof:
            print(f"  {prof['error']}")
        for name, share in sorted(prof.get("shares", {}).items(), key=lambda t: -t[1]):
            print(f"  {name:<46}{share:>7.1%}")

    # levels whose rows hold degraded (pass-through) answers measure the fallback: left out
    clean = {
        rpc: [c for c in args.concurrency if degraded(rows, rpc, c) == 0]
        for rpc in ("online", "precomputed")
    }
    dropped = {rpc: sorted(set(args.concurrency) - set(cs)) for rpc, cs in clean.items()}
    if any(dropped.values()):
        print(
            f"\nleft out of the targets (degraded answers in the row): online at concurrency "
            f"{dropped['online'] or '-'}, precomputed at {dropped['precomputed'] or '-'}"
        )
    p50, p99, qps1, _, _ = med(rows, "online", 1)
    checks: list[tuple[str, bool]] = []
    pre_ratio = {
        c: med(rows, "precomputed", c)[2] / med(rows, "echo", c)[2] for c in clean["precomputed"]
    }
    if pre_ratio:
        worst = min(pre_ratio, key=lambda c: pre_ratio[c])
        at1 = f"{pre_ratio[1]:.0%}" if 1 in pre_ratio else "degraded"
        checks.append(
            (
                f"precomputed-hit QPS >= 60 % of echo QPS at every clean concurrency level: "
                f"worst {pre_ratio[worst]:.0%} at {worst} (concurrency 1: {at1})",
                pre_ratio[worst] >= 0.6,
            )
        )
    if 1 in clean["online"]:
        checks += [
            (f"online p50 <= 2 ms at concurrency 1: {p50:.2f} ms", p50 <= 2.0),
            (f"online p99 <= 6 ms at concurrency 1: {p99:.2f} ms", p99 <= 6.0),
            (f"online QPS >= 1,000 at concurrency 1: {qps1:,.0f}", qps1 >= 1e3),
        ]
    if clean["online"]:
        best_conc = max(clean["online"], key=lambda c: med(rows, "online", c)[2])
        best_qps = med(rows, "online", best_conc)[2]
        checks.append(
            (
                f"online QPS >= 1,000 on {os.cpu_count()} cores (best clean level, concurrency "
                f"{best_conc}): {best_qps:,.0f}",
                best_qps >= 1e3,
            )
        )
    rss = mem["end"]["VmHWM"]
    checks.append(
        (f"service RSS <= 1 GB with {info.n:,} entries (VmHWM): {rss:,.0f} MB", rss <= 1024)
    )
    print("\ntargets (issue 4 Speed, issue 6 benchmarks; QPS ratios to echo are same-run):")
    for label, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {label}")
    print(f"(whole run {time.perf_counter() - start_s:.0f} s)")
    if args.json is not None:
        write_json(args, build, ranker_desc, rows, stats, mem, checks)


def write_json(
    args: argparse.Namespace,
    build: IndexBuild,
    ranker_desc: str,
    rows: list[Row],
    stats: dict[str, Any],
    mem: dict[str, Any],
    checks: Sequence[tuple[str, bool]],
) -> None:
    """Medians per (rpc, concurrency), ratios to echo, memory and the PASS/MISS lines as
    JSON (``--json``)."""
    from bench.bench_nightly import machine

    table = []
    for conc in args.concurrency:
        e50, _, eqps, _, _ = med(rows, "echo", conc)
        for rpc in rpcs_of(args):
            p50, p99, qps, lo, hi = med(rows, rpc, conc)
            table.append(
                {
                    "rpc": rpc,
                    "concurrency": conc,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "qps": qps,
                    "qps_range": [lo, hi],
                    "p50_over_echo": p50 / e50,
                    "qps_over_echo": qps / eqps,
                    "degraded_answers": degraded(rows, rpc, conc) if rpc != "echo" else 0,
                    "server_cpu_ms_per_call_by_thread": thread_ms_per_call(rows, rpc, conc),
                }
            )
    out = {
        "machine": {**machine(), "load_avg_1m_start": mem["load_start"]},
        "n": build.info.n,
        "index_kind": build.info.kind,
        "index_params": build.info.params,
        "ranker": ranker_desc,
        "requests": args.requests,
        "rounds": args.rounds,
        "rows": table,
        "memory_mb": {"after_load": mem["after_load"], "end": mem["end"]},
        "timers": stats.get("timers", {}),
        "targets": [{"check": label, "pass": ok} for label, ok in checks],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"results: {args.json}")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="catalog entries (<= 1,088,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=2000, help="timed calls per row")
    ap.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8],
        help="in-flight calls per level (`make bench`: 1 2 4 8 16 32 64)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="repeat all rows, report medians")
    ap.add_argument(
        "--blocks",
        type=int,
        default=5,
        help="interleaved blocks per level: echo, online and precomputed calls alternate in "
        "this many blocks (order rotating), so the ratios compare calls of the same seconds",
    )
    ap.add_argument("--users", type=int, default=100, help="users with a personal history")
    ap.add_argument(
        "--ranker", default="synthetic", help="synthetic | trained | heuristic | ARTIFACT_DIR"
    )
    ap.add_argument("--ranker-trees", type=int, default=500, help="trees of --ranker synthetic")
    ap.add_argument("--build-threads", type=int, default=2, help="FAISS threads for the build")
    ap.add_argument("--load-timeout", type=float, default=300.0, help="service start bound (s)")
    ap.add_argument("--profile", type=float, default=0.0, help="py-spy seconds (0 = off)")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C/C++ frames)")
    ap.add_argument(
        "--profile-concurrency", type=int, default=1, help="in-flight calls while py-spy samples"
    )
    ap.add_argument(
        "--gil",
        action="store_true",
        help="py-spy --gil: sample only the thread holding the GIL (what caps one process)",
    )
    ap.add_argument("--build-only", action="store_true", help="build the caches and exit")
    ap.add_argument(
        "--dpr",
        type=Path,
        help="DPR artifact dir whose query tower serves (default: zero-shot MiniLM); it must "
        "share the zero-shot passage tower, e.g. `qrw train dpr --zero-shot --query-layers 3`",
    )
    ap.add_argument("--ef-search", type=int, help="HNSW efSearch of the service (dpr setting)")
    ap.add_argument(
        "--pair-cache-size",
        type=int,
        help="service.pair_cache_size of the service (default: the config's; 0 = every "
        "precomputed lookup asks Redis)",
    )
    ap.add_argument(
        "--personal-cache-mb",
        type=float,
        help="service.personal_cache_mb of the service (default: the config's; 0 = every "
        "personal-layer read asks Redis and decodes the history)",
    )
    ap.add_argument(
        "--head",
        action="store_true",
        help="also a row of head queries (distinct catalog texts: they end at the catalog gate)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args.redis_url, args.ranker)
        return
    if 1 not in args.concurrency:
        ap.error("--concurrency must include 1 (the latency targets)")
    if not 1 <= args.blocks <= args.requests:
        ap.error("--blocks must be in 1..--requests")

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    settings = load_settings()
    log("zero-shot DPR artifact")
    artifact = zero_shot_artifact(Path(settings.dpr.artifacts_dir))
    server_env: dict[str, str] = {}
    if args.dpr is not None:
        meta = json.loads((args.dpr / "dpr.json").read_text())
        if meta.get("distilled_from") != artifact.name:
            ap.error(f"--dpr {args.dpr} is not distilled from the zero-shot {artifact.name}")
        artifact = args.dpr.resolve()
        server_env["QRW_DPR__ARTIFACTS_DIR"] = str(artifact.parent)
    if args.ef_search is not None:
        server_env["QRW_DPR__HNSW_EF_SEARCH"] = str(args.ef_search)
    if args.pair_cache_size is not None:
        server_env["QRW_SERVICE__PAIR_CACHE_SIZE"] = str(args.pair_cache_size)
    if args.personal_cache_mb is not None:
        server_env["QRW_SERVICE__PERSONAL_CACHE_MB"] = str(args.personal_cache_mb)
    build = build_index(args.n, args.seed, artifact.name, settings, args.build_threads)
    log(f"index {build.directory} ({'cached' if build.cached else 'built'})")
    ranker, ranker_desc = resolve_ranker(args.ranker, args.ranker_trees, args.seed)
    if args.build_only:
        return
    n_online = args.rounds * len(args.concurrency) * 2 * (args.requests + WARMUP)
    n_online += 50 + int(args.profile * 2000)
    per_row = args.rounds * len(args.concurrency) * (args.requests + WARMUP)
    n_head = min(per_row + 50, args.n) if args.head else 0
    with tempfile.TemporaryDirectory(prefix="qrw-bench-online-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis")
        redis_server.start()
        try:
            log("publishing pairs, personal histories (passage tower) and the index")
            work = publish_workload(
                redis_server.url,
                build,
                artifact,
                settings,
                n_online,
                args.users,
                args.seed,
                n_catalog=n_head,
            )
            log(f"starting the service ({len(work.online):,} distinct online utterances)")
            spawned = time.perf_counter()
            proc, port = start_server(redis_server.url, ranker, args.load_timeout, server_env)
            try:
                rows, stats, mem = asyncio.run(measure(port, work, args, proc.pid, spawned))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        finally:
            redis_server.stop()
    mem["load_start"] = load_start
    bad = {k: v for r in rows for k, v in r.reasons.items() if k in BAD_REASONS}
    if bad:
        print(f"WARNING: degraded answers during the run: {bad}", file=sys.stderr)
    report(args, build, work, ranker_desc, rows, stats, mem, start)


if __name__ == "__main__":
    main()
