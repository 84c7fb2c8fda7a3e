"""The nightly job: validate → sessionize → rephrase detection → rephrase chains →
absorbing Markov chain → rewrite pairs → catalog + personal histories → (publish).

Writes into ``RUN_DIR``: ``pairs.parquet`` (source, rewrite, absorption_probability,
support, n_users), ``rephrases.parquet`` (detected links), ``defects.parquet`` (every turn's
defect label and reasons), ``catalog.parquet`` (the global
catalog of rewrite targets, :mod:`offline.catalog`), ``personal.parquet`` (per-user
successful utterances, pseudonymous user keys), ``feedback.parquet`` and ``demoted.parquet``
(the service's own rewrites judged by their traffic, :mod:`offline.self_learning`),
``quarantine.jsonl`` and ``report.json`` (counts per stage, timings in seconds, quarantined
rows, guardrail checks, ``self_learning``).

Self-contamination (:mod:`offline.self_learning`; Ponnusamy et al., NAACL 2022): a turn the
service rewrote is evidence about its (source, rewrite) pair only — it is cut out of the
rephrase chains, the catalog and the personal histories, and a served pair whose rewritten
turns in the window are mostly defects is demoted (dropped before guardrails and publish).

Privacy: turns of users on the forget list (:mod:`offline.forget`) are dropped right after
validation (``counts.forgotten_turns``); pairs and catalog entries need at least
``privacy.min_users_global`` distinct users. Before publishing, the guardrails
(:mod:`offline.guardrails`) may refuse the new version, which leaves the active one in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from offline.catalog import build_catalog, write_catalog, write_personal
from offline.chains import build_chains  # noqa: F401  (re-exported: offline.job.build_chains)
from offline.engine import run_engine
from offline.forget import read_forgotten
from offline.guardrails import (
    GuardrailResult,
    PublishRefusedError,
    check_before_publish,
    load_canaries,
)
from offline.markov import RewritePair
from offline.online_build import OnlineBuild, build_online, install_index
from offline.publish import PublishError, connect, content_hash, publish_pairs
from offline.schema import (
    SCHEMA_VERSION,
    QuarantinedRow,
    TurnValidator,
    read_turn_logs,
    write_quarantine,
)
from offline.self_learning import (
    demote_pairs,
    served_pair_feedback,
    summarize,
    write_demoted,
    write_feedback,
)
from offline.sessionize import to_turns
from rewrite.config import Settings
from rewrite.privacy import pseudonymize, user_key_from_settings
from rewrite.redis_server import resolve_redis_url

log = logging.getLogger(__name__)

PAIRS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("rewrite", pa.string()),
        ("absorption_probability", pa.float64()),
        ("support", pa.int64()),
        ("n_users", pa.int64()),
    ]
)


#: ``rephrases.parquet``: detected links (``user`` is the pseudonymous key, ``ts`` the later
#: turn's epoch seconds).
REPHRASES_SCHEMA = pa.schema(
    [
        ("earlier_turn_id", pa.string()),
        ("later_turn_id", pa.string()),
        ("earlier", pa.string()),
        ("later", pa.string()),
        ("score", pa.float64()),
        ("user", pa.string()),
        ("ts", pa.float64()),
        ("device_type", pa.string()),  # of the earlier (failing) turn; "" when not logged
    ]
)


#: ``defects.parquet``: every valid turn's label under the shared defect rule
#: (:func:`offline.defects.label_turns`); ``reasons`` comma-joined, ``''`` for a success.
DEFECTS_SCHEMA = pa.schema(
    [("turn_id", pa.string()), ("defect", pa.bool_()), ("reasons", pa.string())]
)


@dataclass
class NightlyReport:
    """What ``report.json`` holds."""

    schema_version: str
    started_at: str
    logs: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, Any] = field(default_factory=dict)
    markov: dict[str, Any] = field(default_factory=dict)
    pairs_content_hash: str = ""
    publish: dict[str, Any] | None = None
    online: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    guardrails: dict[str, Any] | None = None
    self_learning: dict[str, Any] = field(default_factory=dict)


def _finish(
    report: NightlyReport, timings: dict[str, float], t_all: float, out: Path, n_turns: int
) -> None:
    """Total time and throughput into ``report``, then write ``out/report.json``."""
    timings["total"] = round(time.perf_counter() - t_all, 4)
    report.timings_s = timings
    if timings["total"] > 0:
        report.counts["turns_per_min"] = round(60.0 * n_turns / timings["total"], 1)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 4)


def write_pairs(pairs: Sequence[RewritePair], path: Path) -> None:
    """Write pairs as Parquet with :data:`PAIRS_SCHEMA`."""
    cols = {name: [getattr(p, name) for p in pairs] for name in PAIRS_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(cols, schema=PAIRS_SCHEMA), path)


def read_pairs(path: Path) -> list[RewritePair]:
    """Read ``pairs.parquet`` back into :class:`RewritePair` objects.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"pairs file not found: {path} (run `qrw nightly` first)")
    return [RewritePair(**row) for row in pq.read_table(path).to_pylist()]


def _forget_list(settings: Settings, publish: bool) -> set[str]:
    """Pseudonyms to drop: ``privacy.forget_file`` plus the Redis set ``qrw:forgotten``.

    Raises:
        PublishError: ``publish`` and Redis is unreachable (without publishing an unreachable
            Redis is logged and the file alone is used).
    """
    url = resolve_redis_url(settings.redis.url, settings.redis.data_dir)
    try:
        client = connect(url, timeout_s=5.0 if publish else 1.0)
    except PublishError:
        if publish:
            raise
        log.info("Redis not reachable: forget list read from privacy.forget_file only")
        return read_forgotten(settings.privacy.forget_file, None)
    try:
        return read_forgotten(settings.privacy.forget_file, client)
    finally:
        client.close()


def _redact_forgotten(
    rows: Sequence[QuarantinedRow], forgotten: set[str], user_key: bytes
) -> list[QuarantinedRow]:
    """Quarantined rows with the raw text of forgotten users' rows removed (rows kept, so
    ``rows_in = turns_valid + rows_quarantined`` still holds)."""
    out = []
    for q in rows:
        try:
            row = json.loads(q.raw)
        except ValueError:
            row = None
        uid = row.get("user_id") if isinstance(row, dict) else None
        if isinstance(uid, str) and pseudonymize(uid, user_key) in forgotten:
            q = dataclasses.replace(q, raw="")
        out.append(q)
    return out


def run_nightly(
    logs: Sequence[str | Path],
    out: Path,
    settings: Settings,
    publish: bool = False,
    now: datetime | None = None,
    force: bool = False,
    engine: str | None = None,
) -> NightlyReport:
    """Run the nightly job end to end.

    Args:
        logs: turn-log files or directories (JSONL / Parquet).
        out: run directory (created).
        settings: loaded settings (thresholds in ``session``, ``rephrase``, ``markov``,
            ``catalog``, ``privacy``; checks in ``guardrails``).
        publish: also publish the pairs to Redis and flip the active version, when the
            guardrails pass.
        now: reference time for the future-timestamp check (default: wall clock).
        force: publish even when a guardrail fails (logged at WARNING, recorded in the
            report as ``guardrails.forced``).
        engine: ``"local"`` or ``"spark"`` — where sessionize → rephrases → defects → chains
            → pairs run (:mod:`offline.engine`); default ``settings.engine``. Both give
            identical outputs; everything after the pairs runs here either way.

    Returns:
        The :class:`NightlyReport` also written to ``out/report.json``.

    Raises:
        FileNotFoundError: a log path does not exist, or ``publish`` with guardrails enabled
            and the canary file missing (checked before any work).
        offline.guardrails.PublishRefusedError: a guardrail failed (and not ``force``);
            nothing was published, the previous version stays active, ``report.json`` is
            written with ``guardrails.refused`` and the error carries the report.
        offline.publish.PublishError: ``publish`` and Redis is unreachable (checked before
            any work) or publishing failed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    canaries: list[str] | None = None
    if publish and settings.guardrails.enabled:
        canaries = load_canaries(settings.guardrails.canary_file)
    user_key = user_key_from_settings(settings)
    forgotten = _forget_list(settings, publish)
    timings: dict[str, float] = {}
    report = NightlyReport(
        schema_version=SCHEMA_VERSION,
        started_at=datetime.now(UTC).isoformat(),
        logs=[str(p) for p in logs],
        settings={
            "session": settings.session.model_dump(),
            "rephrase": settings.rephrase.model_dump(),
            "markov": settings.markov.model_dump(),
            "self_learning": settings.self_learning.model_dump(),
            "catalog": settings.catalog.model_dump(),
            "privacy": {"min_users_global": settings.privacy.min_users_global},
            "guardrails": settings.guardrails.model_dump(mode="json"),
            "engine": engine or settings.engine,
        },
    )
    t_all = time.perf_counter()
    with _timed(timings, "validate"):
        validator = TurnValidator(
            settings.schema_.max_utterance_chars, settings.schema_.max_future_skew_s, now=now
        )
        read = read_turn_logs(logs, validator)
        if forgotten:
            read.quarantined = _redact_forgotten(read.quarantined, forgotten, user_key)
        write_quarantine(read.quarantined, out / "quarantine.jsonl")
    # every row counted under its bounded reason code (offline.schema.reason_code), so the
    # counts sum to ``rows`` and no row data (ids, timestamps) becomes a key
    reasons = Counter(q.code for q in read.quarantined)
    report.quarantined = {
        "rows": len(read.quarantined),
        "file": str(out / "quarantine.jsonl"),
        "by_reason": dict(reasons.most_common()),
    }
    with _timed(timings, "forget"):
        pseudo = {u: pseudonymize(u, user_key) for u in {t.user_id for t in read.turns}}
        kept = [t for t in read.turns if pseudo[t.user_id] not in forgotten]
        n_forgotten = len(read.turns) - len(kept)
    if n_forgotten:
        log.info("dropped %d turns of forgotten users", n_forgotten)
    with _timed(timings, "to_turns"):
        turns = to_turns(kept)
    # the validated log objects are not needed past this point; the job holds ``turns`` (with
    # shared strings) to its end, so free the heavier pydantic rows now
    n_valid = len(read.turns)
    read.turns.clear()
    del kept
    with _timed(timings, "engine"):
        core = run_engine(turns, settings, engine)
    timings.update(core.timings_s)
    links = core.links
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "earlier_turn_id": turns[lk.earlier].turn_id,
                    "later_turn_id": turns[lk.later].turn_id,
                    "earlier": turns[lk.earlier].normalized,
                    "later": turns[lk.later].normalized,
                    "score": lk.score,
                    "user": pseudo[turns[lk.later].user_id],
                    "ts": turns[lk.later].ts,
                    "device_type": turns[lk.earlier].device_type,
                }
                for lk in links
            ],
            schema=REPHRASES_SCHEMA,
        ),
        out / "rephrases.parquet",
    )
    labels = core.labels
    with _timed(timings, "defects"):
        pq.write_table(
            pa.Table.from_pydict(
                {
                    "turn_id": [t.turn_id for t in turns],
                    "defect": [lab.defect for lab in labels],
                    "reasons": [",".join(lab.reasons) for lab in labels],
                },
                schema=DEFECTS_SCHEMA,
            ),
            out / "defects.parquet",
        )
    pairs, mstats = core.pairs, core.markov
    with _timed(timings, "self_learning"):
        feedback = served_pair_feedback(turns, labels, settings.self_learning)
        dropped: list[RewritePair] = []
        if settings.self_learning.demote:
            pairs, dropped = demote_pairs(pairs, feedback)
        write_feedback(feedback, out / "feedback.parquet")
        write_demoted(feedback, out / "demoted.parquet")
        report.self_learning = summarize(turns, feedback, dropped, settings.self_learning)
    if dropped:
        log.warning(
            "self-learning: %d mined pair(s) withdrawn, their rewritten traffic shows defects "
            "(demoted.parquet)",
            len(dropped),
        )
    with _timed(timings, "write"):
        write_pairs(pairs, out / "pairs.parquet")
    with _timed(timings, "catalog"):
        cat = build_catalog(
            turns,
            labels,
            settings.catalog,
            user_key,
            min_users_global=settings.privacy.min_users_global,
        )
        write_catalog(cat.catalog, out / "catalog.parquet")
        write_personal(cat.personal, out / "personal.parquet")
    online: OnlineBuild | None = None
    if settings.dpr.build_index:
        with _timed(timings, "index"):
            online = build_online(out, settings, reuse_texts={e.text for e in cat.personal})
        report.online = {
            "encoder_kind": online.encoder_kind,
            "encoder_id": online.info.encoder_id,
            "index_kind": online.info.kind,
            "index_entries": online.info.n,
            "index_dir": str(online.index_dir),
        }
    report.pairs_content_hash = content_hash(pairs)
    report.counts = {
        "rows_in": read.rows_in,
        "turns_valid": n_valid,
        "rows_quarantined": len(read.quarantined),
        "forgotten_turns": n_forgotten,
        "users": len({t.user_id for t in turns}),
        "sessions": core.sessions,
        "rephrase_candidates_scored": core.candidates_scored,
        "rephrase_candidates_gated": core.candidates_gated,
        "rephrase_links": len(links),
        "rephrase_detector": core.detector_name,
        "rephrase_detector_artifact": core.detector_artifact,
        "rephrase_candidate_pairs_per_s": round(
            core.candidates_scored / max(timings["rephrase"], 1e-9), 1
        ),
        "defects": dict(core.defect_reasons),
        "chains": core.chains,
        "pairs": len(pairs),
        "success_turns": cat.n_success_turns,
        "utterances": cat.n_utterances,
        "catalog_entries": len(cat.catalog),
        "personal_users": cat.n_personal_users,
        "personal_entries": len(cat.personal),
    }
    report.markov = asdict(mstats)
    refused: GuardrailResult | None = None
    if publish:
        client = connect(resolve_redis_url(settings.redis.url, settings.redis.data_dir))
        try:
            with _timed(timings, "guardrails"):
                try:
                    guard = check_before_publish(client, pairs, settings.guardrails, canaries)
                except (redis.RedisError, OSError) as e:
                    raise PublishError(f"guardrails could not read the active version: {e}") from e
            if not guard.passed and force:
                guard.forced = True
                log.warning("guardrails overridden (force), publishing anyway: %s", guard.refused)
            report.guardrails = guard.to_dict()
            if guard.passed or force:
                with _timed(timings, "publish"):
                    extra: dict[str, Any] = {}
                    if online is not None:
                        extra = {
                            "encode": online.encode,
                            "encoder_id": online.info.encoder_id,
                            "index_dir": install_index(online, settings),
                            "extra_content": {"online_content_id": online.content_id},
                        }
                    res = publish_pairs(
                        client,
                        pairs,
                        keep_versions=settings.redis.keep_versions,
                        version_ttl_s=settings.redis.version_ttl_s,
                        lock_ttl_s=settings.redis.publish_lock_ttl_s,
                        lock_wait_s=settings.redis.publish_lock_wait_s,
                        run_info={"run_dir": str(out.resolve())},
                        personal=cat.personal,
                        **extra,
                    )
                report.publish = asdict(res)
            else:
                refused = guard
        finally:
            client.close()
    _finish(report, timings, t_all, out, n_valid)
    log.info(
        "nightly: %d rows, %d quarantined, %d forgotten, %d links, %d pairs in %.2f s",
        read.rows_in,
        len(read.quarantined),
        n_forgotten,
        len(links),
        len(pairs),
        timings["total"],
    )
    if refused is not None:
        log.warning("publish refused, the active version stays: %s", refused.refused)
        raise PublishRefusedError(str(refused.refused), refused, report)
    return report
