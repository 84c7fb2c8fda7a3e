"""Evaluation of the online layer (issue 4, ``qrw evaluate online``): retrieval quality of DPR
against baselines, the trigger decision of the full online stack, and the replay win/loss
ratio of the whole service.

Per source (:func:`offline.detector.downstream.standard_sources`: the simulation, mining days
1..D-1 and holding out day D; DSTC2, mining train and holding out dev) the nightly job runs on
the mining logs and publishes into a Redis (catalog, personal histories, FAISS index, pairs).

**Retrieval examples** come from the held-out logs only: a held-out turn whose logged utterance
is wrong — its *matching form* (:func:`match_form`: :func:`rewrite.normalize.normalize_utterance`
with apostrophes dropped, as in the WER scoring of :mod:`offline.evaluate`, because DSTC2's
transcriptions have no apostrophes; for DSTC2 spaces are dropped too, :func:`match_form_joined`,
as its transcribers write "good bye" where the recognizer writes "goodbye") differs from the
truth's ``intended_text`` — and whose
intended text is in the run's global catalog (else no retrieval system can return it; those are
counted, ``catalog_coverage`` = kept / wrong turns). Each example keeps the user id (personal
layer) and the user's earlier turns within 300 s (context, as the replay sends it).

**Retrieval metrics** over each system's candidate list truncated to ``k`` (10):
recall@1, recall@5 (share of examples whose target is in the top 1 / 5) and MRR (mean of
1/rank of the target, 0 when it is not in the top ``k``) — Manning, Raghavan & Schütze,
"Introduction to Information Retrieval", ch. 8. Systems: BM25, SymSpell, zero-shot MiniLM +
FAISS (:mod:`offline.baselines_online`), the fine-tuned DPR artifact (``dpr.artifacts_dir/
LATEST`` when it is not the zero-shot one) alone (``dpr_fine_tuned``) and with the global
index's lexical channel (``dpr_lexical``, :mod:`rewrite.lexical`), and the full online
stack — the published index (DPR global layer) + the personal layer + the ranker, run
through the real :class:`~rewrite.rewriter.Rewriter` with ``explain`` (the reranked candidate list).

**Trigger metrics** come from replaying *all* held-out turns (correct ones included) through
the real service pipeline (``normalize → precomputed → encode → global_retrieval →
personal_retrieval → rerank → trigger``) with :func:`offline.evaluate.replay_evaluate`: trigger
rate = turns the *online* layer rewrote (source ``global`` / ``personal``) / all held-out turns;
precision at trigger = those rewrites whose matching form equals the intended text's / online
rewrites (task-level variant with the simulator's NLU for the simulation). The same replay
gives the service's win/loss ratio (precomputed + online; WER-based, and task-level with
``task_success_oracle`` for the simulation).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from offline.baselines_online import (
    BM25Retriever,
    CatalogRetriever,
    DenseRetriever,
    SymSpellRetriever,
)
from offline.detector.downstream import DownstreamSource
from offline.evaluate import (
    CONTEXT_WINDOW_S,
    MAX_CONTEXT_TURNS,
    RewriteFn,
    SuccessFn,
    _context,
    load_truth,
    replay_evaluate,
)
from offline.schema import TurnLog, read_turn_logs
from rewrite.config import FULL_PIPELINE, Settings
from rewrite.normalize import normalize_utterance
from rewrite.types import ContextTurn, InvalidRequestError, RewriteRequest, RewriteResult

log = logging.getLogger(__name__)

ONLINE_LAYERS = ("global", "personal")
SERVICE_PIPELINE = list(FULL_PIPELINE)
RETRIEVAL_PIPELINE = ["normalize", "encode", "global_retrieval", "personal_retrieval", "rerank"]
FULL_STACK = "dpr+personal+ranker"
DEFAULT_K = 10


FormFn = Callable[[str], str]
"""Maps a text to the form in which two texts are compared for equality."""


#: Retrieval rows of ``qrw evaluate online`` besides the full stack: BM25, SymSpell, zero-shot
#: MiniLM, the fine-tuned DPR towers alone, and the fine-tuned towers with the global index's
#: lexical channel (:mod:`rewrite.lexical`; only when ``dpr.lexical.enabled``).
BASELINES = ("bm25", "symspell", "minilm_zero_shot", "dpr_fine_tuned", "dpr_lexical")


def match_form(text: str) -> str:
    """The form two texts are compared in: :func:`normalize_utterance`, apostrophes dropped
    ("I'm here!" → "im here")."""
    return normalize_utterance(text).replace("'", "")


def match_form_joined(text: str) -> str:
    """:func:`match_form` with spaces dropped too ("thank you good bye" = "thank you goodbye").

    For DSTC2, whose transcribers split and join compounds differently from the ASR lexicon
    ("good bye", "sea food"): without it a third of its "wrong" turns are "thank you goodbye"
    heard as itself. Not for the simulation, where a split word ("meet ing") is a simulated
    recognition error the assistant fails on.
    """
    return match_form(text).replace(" ", "")


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class RetrievalExample:
    """One held-out turn with a wrong utterance whose intended text is a catalog entry.

    Attributes:
        turn_id, user_id: from the turn log (raw user id; the personal store pseudonymizes it).
        utterance: the logged utterance (ASR 1-best) as sent to the service.
        query: its normalized form (what retrieval is queried with).
        intended: the truth's ``intended_text``.
        target: the catalog text whose matching form equals the intended text's.
        context: the user's earlier turns within 300 s, oldest first (at most 5).
        device_type: the turn's logged device type ("" when not logged).
    """

    turn_id: str
    user_id: str
    utterance: str
    query: str
    intended: str
    target: str
    context: tuple[ContextTurn, ...] = ()
    device_type: str = ""


@dataclass
class ExampleSet:
    """Retrieval examples of one source and how many held-out turns led to them.

    Attributes:
        source: source name.
        examples: the examples, in replay order.
        heldout_turns: held-out turns with a truth row.
        wrong_turns: of those, turns whose utterance differs from the intended text.
        not_in_catalog: wrong turns dropped because the intended text is not in the catalog.
        catalog_entries: entries of the run's global catalog.
        query_in_catalog: examples whose wrong utterance is itself a catalog entry (a system
            that returns the query first misses these at rank 1).
    """

    source: str
    examples: list[RetrievalExample]
    heldout_turns: int = 0
    wrong_turns: int = 0
    not_in_catalog: int = 0
    catalog_entries: int = 0
    query_in_catalog: int = 0

    @property
    def catalog_coverage(self) -> float:
        """Share of wrong turns whose intended text is in the catalog (0.0 without any)."""
        return len(self.examples) / self.wrong_turns if self.wrong_turns else 0.0


def build_examples(
    source: str,
    logs: Sequence[Path],
    truth: Path,
    catalog: Sequence[str],
    context_window_s: float = CONTEXT_WINDOW_S,
    max_context_turns: int = MAX_CONTEXT_TURNS,
    form: FormFn = match_form,
) -> ExampleSet:
    """Retrieval examples from held-out logs (see the module docstring).

    Args:
        source: name recorded in the result.
        logs: held-out turn logs (JSONL / Parquet; invalid rows are skipped).
        truth: truth JSONL (``turn_id``, ``intended_text``).
        catalog: the run's catalog texts, most frequent first (the first text of a matching
            form is the target).
        context_window_s, max_context_turns: context as :func:`offline.evaluate.replay_evaluate`
            builds it.
        form: the matching form (:func:`match_form` or :func:`match_form_joined`).

    Raises:
        FileNotFoundError: a log or the truth file does not exist.
    """
    intended = load_truth(truth)
    by_form: dict[str, str] = {}
    for text in catalog:
        by_form.setdefault(form(text), text)
    turns = sorted(read_turn_logs(logs).turns, key=lambda t: (t.timestamp, t.turn_id))
    history: dict[str, deque[TurnLog]] = defaultdict(lambda: deque(maxlen=max_context_turns))
    out = ExampleSet(source, [], catalog_entries=len(catalog))
    for turn in turns:
        hist = history[turn.user_id]
        ref = intended.get(turn.turn_id)
        if ref is None:
            hist.append(turn)
            continue
        out.heldout_turns += 1
        ctx = _context(hist, turn, context_window_s, max_context_turns)
        hist.append(turn)
        want = form(ref)
        if form(turn.utterance) == want or not want:
            continue
        out.wrong_turns += 1
        target = by_form.get(want)
        if target is None:
            out.not_in_catalog += 1
            continue
        out.query_in_catalog += form(turn.utterance) in by_form
        out.examples.append(
            RetrievalExample(
                turn.turn_id,
                turn.user_id,
                turn.utterance,
                normalize_utterance(turn.utterance),
                ref,
                target,
                ctx,
                turn.device_type or "",
            )
        )
    log.info(
        "%s: %d held-out turns, %d wrong, %d examples (%d intended texts not in the catalog)",
        source,
        out.heldout_turns,
        out.wrong_turns,
        len(out.examples),
        out.not_in_catalog,
    )
    return out


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class RetrievalMetrics:
    """Retrieval quality of one system on one example set.

    Attributes:
        system: system name.
        n: examples scored.
        k: candidate-list cut-off.
        recall_at_1, recall_at_5: share of examples with the target in the top 1 / 5.
        mrr: mean reciprocal rank of the target within the top ``k`` (0 for a miss).
        found_at_k: share of examples with the target anywhere in the top ``k``.
        seconds: wall time of the system on the whole set (warm-up included), s.
        note: e.g. which artifact was used.
        distinct: distinct ``(query, target)`` pairs among the examples (0 when the queries
            were not given).
        distinct_recall_at_1: recall@1 with each distinct pair counted once (its examples'
            hits averaged first: the personal layer may rank one query differently per user).
            Held-out turns repeat — a user who is misheard says the same thing again — so
            one confusion said nine times moves the per-turn recall@1 by nine examples; this
            figure counts it once (None when the queries were not given).
    """

    system: str
    n: int
    k: int
    recall_at_1: float
    recall_at_5: float
    mrr: float
    found_at_k: float
    seconds: float = 0.0
    note: str = ""
    distinct: int = 0
    distinct_recall_at_1: float | None = None


def rank_of(
    ranked: Sequence[str], target: str, k: int = DEFAULT_K, form: FormFn = match_form
) -> int | None:
    """1-based rank of ``target`` in ``ranked[:k]`` (texts compared by ``form``), None when it
    is not there."""
    want = form(target)
    for i, text in enumerate(ranked[:k]):
        if form(text) == want:
            return i + 1
    return None


def retrieval_metrics(
    system: str,
    ranked_lists: Sequence[Sequence[str]],
    targets: Sequence[str],
    k: int = DEFAULT_K,
    seconds: float = 0.0,
    note: str = "",
    form: FormFn = match_form,
    queries: Sequence[str] | None = None,
) -> RetrievalMetrics:
    """recall@1, recall@5 and MRR@k of ranked candidate lists against targets.

    Args:
        system: name of the system.
        ranked_lists: per example, candidate texts best first.
        targets: per example, the correct text.
        k: cut-off (lists are truncated to ``k``; recall@5 uses ``min(5, k)``).
        seconds, note: recorded as given.
        form: text equality is equality of this form.
        queries: per example, the query sent; given, recall@1 is also reported over distinct
            ``(query, target)`` pairs (``distinct_recall_at_1``).

    Raises:
        ValueError: the sequences differ in length, or ``k < 1``.
    """
    if len(ranked_lists) != len(targets):
        raise ValueError(f"{len(ranked_lists)} ranked lists for {len(targets)} targets")
    if queries is not None and len(queries) != len(targets):
        raise ValueError(f"{len(queries)} queries for {len(targets)} targets")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(targets)
    ranks = [rank_of(r, t, k, form) for r, t in zip(ranked_lists, targets, strict=True)]
    at1 = sum(1 for r in ranks if r is not None and r <= 1)
    at5 = sum(1 for r in ranks if r is not None and r <= min(5, k))
    found = sum(1 for r in ranks if r is not None)
    rr = sum(1.0 / r for r in ranks if r is not None)
    distinct, distinct_at1 = 0, None
    if queries is not None:
        hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for q, t, r in zip(queries, targets, ranks, strict=True):
            hits[(q, form(t))].append(r == 1)
        distinct = len(hits)
        distinct_at1 = sum(sum(h) / len(h) for h in hits.values()) / distinct if hits else 0.0
    return RetrievalMetrics(
        system=system,
        n=n,
        k=k,
        recall_at_1=at1 / n if n else 0.0,
        recall_at_5=at5 / n if n else 0.0,
        mrr=rr / n if n else 0.0,
        found_at_k=found / n if n else 0.0,
        seconds=round(seconds, 2),
        note=note,
        distinct=distinct,
        distinct_recall_at_1=distinct_at1,
    )


@dataclass(frozen=True)
class TriggerMetrics:
    """The online layer's trigger decision over all replayed held-out turns.

    Attributes:
        turns: held-out turns replayed (with truth).
        triggered: turns the online layer rewrote (source global or personal).
        triggered_global, triggered_personal: by layer.
        correct: triggered rewrites equal to the intended text (in the matching form).
        triggered_on_correct_turns: triggers on turns whose utterance was already right.
        trigger_rate: ``triggered / turns``.
        precision_at_trigger: ``correct / triggered`` (0.0 without triggers).
        task_correct, precision_at_trigger_task: with a task-success oracle only: triggered
            rewrites that the assistant would execute as the user meant.
        precomputed: turns rewritten by a precomputed pair (not part of the online figures).
    """

    turns: int
    triggered: int
    triggered_global: int
    triggered_personal: int
    correct: int
    triggered_on_correct_turns: int
    trigger_rate: float
    precision_at_trigger: float
    precomputed: int = 0
    task_correct: int | None = None
    precision_at_trigger_task: float | None = None


class RecordingRewriter:
    """Wraps a rewrite function and keeps every result by ``request_id`` (the turn id).

    Args:
        rewrite_fn: the system under test (e.g. ``Rewriter.rewrite``).
    """

    def __init__(self, rewrite_fn: RewriteFn) -> None:
        self._fn = rewrite_fn
        self.results: dict[str, tuple[RewriteRequest, RewriteResult]] = {}

    def __call__(self, request: RewriteRequest) -> RewriteResult:
        result = self._fn(request)
        self.results[request.request_id] = (request, result)
        return result


def trigger_metrics(
    results: dict[str, tuple[RewriteRequest, RewriteResult]],
    truth: dict[str, str],
    success_fn: SuccessFn | None = None,
    form: FormFn = match_form,
) -> TriggerMetrics:
    """Trigger rate and precision at trigger of the online layer.

    Args:
        results: ``{turn_id: (request, result)}`` of every replayed held-out turn.
        truth: ``{turn_id: intended_text}``; turns without truth are ignored.
        success_fn: optional task oracle ``(text, intended) -> bool``.
        form: a rewrite is correct when its form equals the intended text's.
    """
    turns = trig = trig_g = trig_p = correct = on_correct = pre = 0
    task = 0
    for tid, (req, res) in results.items():
        ref = truth.get(tid)
        if ref is None:
            continue
        turns += 1
        if not res.rewritten:
            continue
        if res.source not in ONLINE_LAYERS:
            pre += res.source == "precomputed"
            continue
        trig += 1
        trig_g += res.source == "global"
        trig_p += res.source == "personal"
        want = form(ref)
        correct += form(res.rewrite) == want
        on_correct += form(req.utterance) == want
        if success_fn is not None:
            task += bool(success_fn(res.rewrite, ref))
    return TriggerMetrics(
        turns=turns,
        triggered=trig,
        triggered_global=trig_g,
        triggered_personal=trig_p,
        correct=correct,
        triggered_on_correct_turns=on_correct,
        trigger_rate=trig / turns if turns else 0.0,
        precision_at_trigger=correct / trig if trig else 0.0,
        precomputed=pre,
        task_correct=task if success_fn is not None else None,
        precision_at_trigger_task=(task / trig if trig else 0.0) if success_fn else None,
    )


# --------------------------------------------------------------------------- systems


def run_retriever(
    system: CatalogRetriever,
    examples: Sequence[RetrievalExample],
    k: int = DEFAULT_K,
    note: str = "",
    form: FormFn = match_form,
) -> RetrievalMetrics:
    """Warm a baseline up, query it with every example's normalized utterance, score it."""
    t0 = time.perf_counter()
    system.warm_up()
    queries = [e.query for e in examples]
    hits = system.search(queries, k) if examples else []
    ranked = [[text for text, _ in row] for row in hits]
    targets = [e.target for e in examples]
    seconds = time.perf_counter() - t0
    return retrieval_metrics(system.name, ranked, targets, k, seconds, note, form, queries)


def stack_rankings(
    rewrite_fn: RewriteFn, examples: Sequence[RetrievalExample], k: int = DEFAULT_K
) -> list[list[str]]:
    """The reranked candidate list of the online stack per example (``explain`` responses of a
    Rewriter whose pipeline ends with ``rerank``), cut to ``k``; empty for a refused request."""
    out: list[list[str]] = []
    for e in examples:
        req = RewriteRequest(
            e.utterance,
            e.user_id,
            context=e.context,
            explain=True,
            request_id=e.turn_id,
            device_type=e.device_type,
        )
        try:
            res = rewrite_fn(req)
        except InvalidRequestError:
            out.append([])
            continue
        out.append([c.text for c in res.candidates if c.source in ONLINE_LAYERS][:k])
    return out


# --------------------------------------------------------------------------- per source


@dataclass
class SourceResult:
    """Everything measured on one source.

    Attributes:
        source: name.
        heldout_turns, wrong_turns, examples, not_in_catalog, catalog_coverage,
            catalog_entries, query_in_catalog: see :class:`ExampleSet`.
        matching_form: name of the form texts were compared in.
        retrieval: one row per system.
        trigger: the online layer's trigger metrics (full service replay).
        service: the replay of the whole service (:class:`offline.evaluate.ReplayReport`
            fields, without examples).
        stack: what the full stack ran with (encoder kind and id, ranker name, threshold,
            published version, pairs).
        examples_shown: a few online rewrites of the replay (utterance, rewrite, intended).
        seconds: wall time for the source, s.
    """

    source: str
    heldout_turns: int
    wrong_turns: int
    examples: int
    not_in_catalog: int
    catalog_coverage: float
    catalog_entries: int
    query_in_catalog: int = 0
    matching_form: str = "match_form"
    retrieval: list[RetrievalMetrics] = field(default_factory=list)
    trigger: TriggerMetrics | None = None
    service: dict[str, Any] = field(default_factory=dict)
    stack: dict[str, Any] = field(default_factory=dict)
    examples_shown: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class OnlineEvaluation:
    """Result of :func:`evaluate_online`: one :class:`SourceResult` per source."""

    sources: list[SourceResult]
    k: int = DEFAULT_K
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _fine_tuned_artifact(settings: Settings) -> Path | None:
    """The fine-tuned DPR artifact the settings name (None when absent or zero-shot)."""
    from rewrite.encoder import DprModelMissingError, read_dpr_meta, resolve_dpr_artifact

    try:
        path = resolve_dpr_artifact(Path(settings.dpr.artifacts_dir), settings.dpr.artifact)
    except DprModelMissingError:
        return None
    return None if read_dpr_meta(path).get("zero_shot") else path


def _rewriter(settings: Settings, pipeline: list[str]) -> Any:
    from rewrite.rewriter import Rewriter

    s = settings.model_copy(deep=True)
    s.service.pipeline = list(pipeline)
    rewriter = Rewriter(s)
    rewriter.warm_up()
    return rewriter


def evaluate_source(
    name: str,
    mine_logs: Sequence[Path],
    heldout_logs: Sequence[Path],
    truth: Path,
    settings: Settings,
    run_dir: Path,
    success_fn: SuccessFn | None = None,
    k: int = DEFAULT_K,
    baselines: Sequence[str] = BASELINES,
    form: FormFn = match_form,
) -> SourceResult:
    """Run the job on ``mine_logs`` (published to ``settings.redis.url``), then measure
    retrieval, trigger and service replay on ``heldout_logs``.

    Args:
        name: source name.
        mine_logs: logs the nightly job learns from.
        heldout_logs: held-out logs (examples and replay).
        truth: truth JSONL covering the held-out turns.
        settings: settings with ``redis.url`` pointing at a running Redis.
        run_dir: the job's run directory.
        success_fn: task oracle (simulation) or None.
        k: candidate-list cut-off.
        baselines: which retrieval baselines to run (the full stack always runs).
        form: the matching form of texts (examples, ranks, precision at trigger).

    Raises:
        FileNotFoundError: a log or truth file is missing.
        offline.publish.PublishError: Redis is unreachable.
    """
    from offline.catalog import read_catalog
    from offline.job import run_nightly

    t_src = time.perf_counter()
    # published only to serve this evaluation (sources one after another): guardrails forced
    report = run_nightly(list(mine_logs), run_dir, settings, publish=True, force=True)
    catalog = read_catalog(run_dir / "catalog.parquet")
    texts = [c.text for c in catalog]
    exset = build_examples(name, heldout_logs, truth, texts, form=form)
    exs = exset.examples
    res = SourceResult(
        source=name,
        heldout_turns=exset.heldout_turns,
        wrong_turns=exset.wrong_turns,
        examples=len(exs),
        not_in_catalog=exset.not_in_catalog,
        catalog_coverage=exset.catalog_coverage,
        catalog_entries=len(texts),
        query_in_catalog=exset.query_in_catalog,
        matching_form=getattr(form, "__name__", str(form)),
    )
    threads = max(1, settings.dpr.threads)
    systems: list[tuple[CatalogRetriever, str]] = []
    if "bm25" in baselines:
        systems.append((BM25Retriever(texts), "bm25s, lucene k1=1.5 b=0.75"))
    if "symspell" in baselines:
        systems.append(
            (SymSpellRetriever(texts, [c.frequency for c in catalog]), "symspellpy compound")
        )
    if "minilm_zero_shot" in baselines:
        from offline.dpr.train import export_zero_shot

        zs = export_zero_shot(Path(settings.dpr.artifacts_dir)).artifact
        systems.append((DenseRetriever(texts, zs, "minilm_zero_shot", threads), zs.name))
    want_ft = {"dpr_fine_tuned", "dpr_lexical"} & set(baselines)
    ft = _fine_tuned_artifact(settings) if want_ft else None
    lexical = settings.dpr.lexical.channel()
    if ft is not None and "dpr_fine_tuned" in baselines:
        systems.append((DenseRetriever(texts, ft, "dpr_fine_tuned", threads), ft.name))
    if ft is not None and "dpr_lexical" in baselines and lexical is not None:
        freqs = [c.frequency for c in catalog]
        lex = DenseRetriever(texts, ft, "dpr_lexical", threads, lexical, freqs)
        note = f"{ft.name} + char {lexical.ngram_min}-{lexical.ngram_max}-grams + prior"
        systems.append((lex, note))
    if ft is None and want_ft:
        log.warning(
            "no fine-tuned DPR artifact under %s: rows %s skipped (`qrw train dpr --run`)",
            settings.dpr.artifacts_dir,
            sorted(want_ft),
        )
    for system, note in systems:
        res.retrieval.append(run_retriever(system, exs, k, note, form))
        log.info("%s / %s: %s", name, system.name, res.retrieval[-1])

    online = report.online or {}
    t0 = time.perf_counter()
    stack = _rewriter(settings, RETRIEVAL_PIPELINE)
    try:
        ranker = stack.resources.online.ranker
        ranked = stack_rankings(stack.rewrite, exs, k)
    finally:
        stack.close()
    res.retrieval.append(
        retrieval_metrics(
            FULL_STACK,
            ranked,
            [e.target for e in exs],
            k,
            time.perf_counter() - t0,
            f"{online.get('encoder_kind', '?')} index + personal + {ranker.name}",
            form,
            [e.query for e in exs],
        )
    )
    res.stack = {
        "encoder_kind": online.get("encoder_kind"),
        "encoder_id": online.get("encoder_id"),
        "ranker": ranker.name,
        "ranker_version": ranker.model_version,
        "trigger_threshold": ranker.trigger_threshold,
        "version": (report.publish or {}).get("version"),
        "pairs": report.counts.get("pairs"),
        "personal_users": report.counts.get("personal_users"),
        "rephrase_detector": report.counts.get("rephrase_detector"),
    }

    service = _rewriter(settings, SERVICE_PIPELINE)
    recorder = RecordingRewriter(service.rewrite)
    try:
        replay = replay_evaluate(list(heldout_logs), truth, recorder, success_fn=success_fn)
    finally:
        service.close()
    intended = load_truth(truth)
    res.trigger = trigger_metrics(recorder.results, intended, success_fn, form)
    res.service = {k_: v for k_, v in replay.to_dict().items() if k_ != "examples"}
    res.examples_shown = [
        {
            "utterance": rq.utterance,
            "rewrite": rs.rewrite,
            "source": rs.source,
            "intended": intended.get(tid, ""),
            "correct": form(rs.rewrite) == form(intended.get(tid, "")),
        }
        for tid, (rq, rs) in recorder.results.items()
        if rs.rewritten and rs.source in ONLINE_LAYERS
    ][:12]
    res.seconds = round(time.perf_counter() - t_src, 1)
    return res


def evaluate_online(
    sources: Sequence[DownstreamSource],
    settings: Settings,
    work_dir: Path,
    k: int = DEFAULT_K,
    baselines: Sequence[str] = BASELINES,
    progress: Callable[[str], None] | None = None,
    joined_spacing: Sequence[str] = ("dstc2",),
) -> OnlineEvaluation:
    """Evaluate every source (:class:`offline.detector.downstream.DownstreamSource`).

    Uses ``settings.redis.url`` when set, else starts an
    :class:`~rewrite.redis_server.EmbeddedRedis` under ``work_dir/redis`` and stops it by its
    handle at the end. Published index folders go to ``work_dir/index``. Redis socket timeouts
    are raised to 1 s for the evaluation (the service's 50 ms budget would turn CPU contention
    on a shared machine into pass-throughs and make the figures noisy).

    Args:
        sources: objects with ``name``, ``mine_logs``, ``heldout_logs``, ``truth``,
            ``success_fn``.
        settings: base settings (copied).
        work_dir: run dirs (``work_dir/<source>``), index folders, embedded Redis.
        k: candidate-list cut-off.
        baselines: retrieval baselines to run.
        progress: optional callback with a line per step (the CLI prints it).
        joined_spacing: sources compared with :func:`match_form_joined` (spaces ignored);
            the others with :func:`match_form`.
    """
    from rewrite.redis_server import EmbeddedRedis

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    s = settings.model_copy(deep=True)
    s.dpr.index_root = (work_dir / "index").resolve()
    s.redis.socket_timeout_s = max(s.redis.socket_timeout_s, 1.0)
    s.redis.connect_timeout_s = max(s.redis.connect_timeout_s, 1.0)
    embedded: EmbeddedRedis | None = None
    if not s.redis.url:
        embedded = EmbeddedRedis(work_dir / "redis")
        embedded.start()
        s.redis.url = embedded.url
    out = OnlineEvaluation(
        [],
        k=k,
        settings={
            "rephrase_detector": s.rephrase.detector,
            "catalog": s.catalog.model_dump(),
            "dpr_artifacts_dir": str(s.dpr.artifacts_dir),
            "rerank_artifacts_dir": str(s.rerank.artifacts_dir),
        },
    )
    try:
        for src in sources:
            if progress is not None:
                progress(
                    f"{src.name}: nightly job on {len(src.mine_logs)} log file(s), publish, "
                    "retrieval systems, service replay"
                )
            out.sources.append(
                evaluate_source(
                    src.name,
                    src.mine_logs,
                    src.heldout_logs,
                    src.truth,
                    s,
                    work_dir / src.name,
                    src.success_fn,
                    k,
                    baselines,
                    match_form_joined if src.name in joined_spacing else match_form,
                )
            )
    finally:
        if embedded is not None:
            embedded.stop()
    return out


def run_online_evaluation(
    settings: Settings,
    data_root: Path,
    work_dir: Path = Path("runs/evaluate_online"),
    users: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> OnlineEvaluation:
    """``qrw evaluate online``: the standard sources (simulation seed 7, mine days 1-2, hold
    out day 3; DSTC2 train → dev), imported/simulated under ``work_dir/data`` (reused).

    Raises:
        FileNotFoundError: data files are missing under ``data_root``.
    """
    from offline.detector.downstream import standard_sources

    sources = standard_sources(settings, Path(data_root), Path(work_dir), sim_users=users)
    order = {"sim": 0, "dstc2": 1}
    sources = sorted(sources, key=lambda s: order.get(s.name, 2))
    return evaluate_online(sources, settings, Path(work_dir), progress=progress)


# --------------------------------------------------------------------------- tables


def retrieval_table(res: SourceResult) -> Table:
    """Rich table: system × recall@1 (per turn and per distinct query), recall@5, MRR (k = 10)."""
    table = Table(
        title=f"{res.source}: retrieval on {res.examples} wrong held-out turns "
        f"(catalog {res.catalog_entries} entries; coverage {res.catalog_coverage:.1%} of "
        f"{res.wrong_turns} wrong turns; {res.query_in_catalog} wrong queries are catalog "
        f"entries themselves)"
    )
    cols = ("system", "recall@1", "r@1 distinct", "recall@5", "MRR", "in top-k", "s", "note")
    for col in cols:
        table.add_column(col, justify="left" if col in ("system", "note") else "right")
    for m in res.retrieval:
        distinct = (
            "—"
            if m.distinct_recall_at_1 is None
            else f"{m.distinct_recall_at_1:.3f} of {m.distinct}"
        )
        table.add_row(
            m.system,
            f"{m.recall_at_1:.3f}",
            distinct,
            f"{m.recall_at_5:.3f}",
            f"{m.mrr:.3f}",
            f"{m.found_at_k:.3f}",
            f"{m.seconds:.1f}",
            m.note,
        )
    return table


def service_table(results: Sequence[SourceResult]) -> Table:
    """Rich table: per source, the online layer's triggers (count, how many on turns that were
    already right, trigger rate, precision at trigger exact and task-level) and the service's
    replay (precomputed rewrites, win/loss by WER and task, corpus WER before → after)."""
    table = Table(
        title="Service replay of all held-out turns (precomputed + online layer)",
        box=box.SIMPLE_HEAD,
        caption="online: rewrites by the online layer (on ok: of them on turns that were already "
        "right); rate: online / turns; P: precision at trigger, exact and task-level; pre: "
        "precomputed rewrites; W/L: the whole service, ratio wins/losses",
    )
    cols = (
        "source",
        "turns",
        "online",
        "on ok",
        "rate",
        "P",
        "P task",
        "pre",
        "W/L (WER)",
        "W/L (task)",
        "WER before→after",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "source" else "right", no_wrap=True)
    for r in results:
        t, sv = r.trigger, r.service
        if t is None:
            continue
        task_p = (
            "—" if t.precision_at_trigger_task is None else f"{t.precision_at_trigger_task:.3f}"
        )
        task_wl = "—"
        if sv.get("task_win_loss_ratio_str"):
            task_wl = (
                f"{sv['task_win_loss_ratio_str']} {sv.get('task_wins')}/{sv.get('task_losses')}"
            )
        table.add_row(
            r.source,
            str(t.turns),
            str(t.triggered),
            str(t.triggered_on_correct_turns),
            f"{t.trigger_rate:.2%}",
            f"{t.precision_at_trigger:.3f}",
            task_p,
            str(t.precomputed),
            f"{sv.get('win_loss_ratio_str')} {sv.get('wins')}/{sv.get('losses')}",
            task_wl,
            f"{sv.get('wer_before', 0.0):.3f}→{sv.get('wer_after', 0.0):.3f}",
        )
    return table


def write_json(evaluation: OnlineEvaluation, path: Path) -> None:
    """Write :meth:`OnlineEvaluation.to_dict` as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.to_dict(), indent=2, default=str))
