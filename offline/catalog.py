"""The global catalog of rewrite targets and per-user personal histories (nightly job).

A turn **succeeds** when it is not a defect under the shared :class:`~offline.defects.DefectRule`
— no barge-in, no negative feedback, no failure response — and no later turn of its session
rephrases it (the job's rephrase links). Utterances are the normalized text the user said
(:attr:`offline.sessionize.Turn.normalized`). Turns the service rewrote are left out of both
the catalog and the personal histories: their outcome is the rewrite's, not the utterance's,
and counting it would let the service's own rewrites inflate their targets' frequency and
success rate (:mod:`offline.self_learning`; Ponnusamy et al., NAACL 2022).

- **Global catalog**: per normalized utterance, ``frequency`` (turns), ``n_users`` (distinct
  users), ``success_rate`` (successful turns / turns), the most common logged ``domain`` and
  ``intent`` ("" when never logged; ties broken alphabetically) and ``last_seen`` (latest turn,
  float epoch seconds) and ``device_types``: on which logged device types the utterance was
  said, with turns and successful turns on each (most turns first, at most
  ``max_device_types``; empty when the logs name no device types) — the ranker's
  ``device_share`` / ``device_success_rate`` features. An utterance is a rewrite target when
  ``frequency >= min_frequency``, ``n_users >= max(min_users, privacy.min_users_global)``
  and ``success_rate >= min_success_rate`` (``catalog:`` settings; k-anonymity floor from
  ``privacy:``).
  Rows are ordered by frequency (descending), then text, so row ``i`` is FAISS id ``i`` of the
  index built over ``catalog.parquet``.
- **Personal histories**: per user, keyed by :func:`rewrite.privacy.pseudonymize` of the user
  id (raw ids never leave this module), the utterances with ``count`` (the user's successful
  turns) ``>= personal_min_count`` and the user's own success rate ``>=
  personal_min_success_rate``; most used first (then most recent, then text), at most
  ``personal_max_per_user``; ``last_seen`` is the user's latest *successful* use.

Aggregation is vectorised with pyarrow ``group_by`` (hash aggregation), O(turns). Design
sources: success from implicit feedback (Ponnusamy et al., "Feedback-Based Self-Learning in
Large-Scale Conversational AI Agents", AAAI 2020); users' historically successful
interactions as a personal memory for rewriting (Roshan-Ghias et al., "Personalized Query
Rewriting in Conversational AI Agents", arXiv:2011.04748, 2020).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from offline.defects import DefectLabel
from offline.sessionize import Turn
from rewrite.config import CatalogSettings
from rewrite.privacy import pseudonymize
from rewrite.retrieval import (
    CATALOG_SCHEMA,
    DEVICE_TYPES_COLUMN,
    DEVICE_TYPES_TYPE,
    DeviceTypeStat,
    device_types_from_rows,
)

log = logging.getLogger(__name__)

PERSONAL_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("text", pa.string()),
        ("count", pa.int64()),
        ("last_seen", pa.float64()),
    ]
)
_EPS = 1e-9


@dataclass(frozen=True)
class CatalogEntry:
    """One rewrite target of the global catalog.

    Attributes:
        text: normalized utterance.
        frequency: turns with this utterance (all users, successful or not).
        n_users: distinct users behind those turns.
        success_rate: successful turns / ``frequency``, in [0, 1].
        domain, intent: most common logged NLU domain / intent ("" when never logged).
        last_seen: latest turn with this utterance, epoch seconds (UTC).
        device_types: turns and successes per logged device type, most turns first.
    """

    text: str
    frequency: int
    n_users: int
    success_rate: float
    domain: str
    intent: str
    last_seen: float
    device_types: tuple[DeviceTypeStat, ...] = ()


@dataclass(frozen=True)
class PersonalEntry:
    """One utterance of one user's personal history.

    Attributes:
        user: pseudonymous user key (:func:`rewrite.privacy.pseudonymize`), never the raw id.
        text: normalized utterance.
        count: the user's successful turns with it.
        last_seen: the user's latest successful turn with it, epoch seconds (UTC).
    """

    user: str
    text: str
    count: int
    last_seen: float


@dataclass
class CatalogResult:
    """Output of :func:`build_catalog`.

    Attributes:
        catalog: global rewrite targets, frequency-descending (row i = FAISS id i).
        personal: personal entries grouped by user (ascending pseudonym), most used first.
        n_turns: turns aggregated (rewritten turns excluded).
        n_success_turns: turns that succeeded.
        n_utterances: distinct normalized utterances seen.
        n_personal_users: users with a non-empty personal history.
    """

    catalog: list[CatalogEntry]
    personal: list[PersonalEntry]
    n_turns: int
    n_success_turns: int
    n_utterances: int
    n_personal_users: int
    n_rewritten_excluded: int = 0


def _most_common(tbl: pa.Table, column: str) -> dict[str, str]:
    """``{text: most common non-empty value of column}``; ties go to the smallest value."""
    sub = tbl.filter(pc.not_equal(tbl[column], ""))
    if sub.num_rows == 0:
        return {}
    counts = sub.group_by(["text", column], use_threads=False).aggregate([(column, "count")])
    counts = counts.sort_by(
        [("text", "ascending"), (f"{column}_count", "descending"), (column, "ascending")]
    )
    texts = np.asarray(counts["text"].to_pylist(), dtype=object)
    first = np.ones(len(texts), dtype=bool)
    first[1:] = texts[1:] != texts[:-1]
    values = counts[column].to_pylist()
    return {str(texts[i]): str(values[i]) for i in np.flatnonzero(first)}


def _device_types(kept: pa.Table, max_types: int) -> dict[str, tuple[DeviceTypeStat, ...]]:
    """``{text: per-device-type turns and successes}`` over the turns that name a device
    type; most turns first (ties: device type ascending), at most ``max_types`` per text."""
    sub = kept.filter(pc.not_equal(kept["device_type"], ""))
    if sub.num_rows == 0:
        return {}
    agg = sub.group_by(["text", "device_type"], use_threads=False).aggregate(
        [("ok", "sum"), ("ok", "count")]
    )
    agg = agg.sort_by(
        [("text", "ascending"), ("ok_count", "descending"), ("device_type", "ascending")]
    )
    out: dict[str, list[DeviceTypeStat]] = defaultdict(list)
    for text, dev, n, k in zip(
        agg["text"].to_pylist(),
        agg["device_type"].to_pylist(),
        agg["ok_count"].to_pylist(),
        agg["ok_sum"].to_pylist(),
        strict=True,
    ):
        stats = out[text]
        if len(stats) < max_types:
            stats.append(DeviceTypeStat(dev, int(n), int(k)))
    return {t: tuple(v) for t, v in out.items()}


def _global(tbl: pa.Table, cfg: CatalogSettings, min_users: int) -> tuple[list[CatalogEntry], int]:
    agg = tbl.group_by("text", use_threads=False).aggregate(
        [("ts", "count"), ("user", "count_distinct"), ("ok", "sum"), ("ts", "max")]
    )
    freq = agg["ts_count"].to_numpy()
    users = agg["user_count_distinct"].to_numpy()
    succ = agg["ok_sum"].to_numpy()
    keep = (
        (freq >= cfg.min_frequency)
        & (users >= min_users)
        & (succ >= cfg.min_success_rate * freq - _EPS)
    )
    agg = agg.filter(pa.array(keep)).append_column(
        "success_rate", pa.array(succ[keep] / np.maximum(freq[keep], 1), pa.float64())
    )
    agg = agg.sort_by([("ts_count", "descending"), ("text", "ascending")])
    kept = tbl.filter(pc.is_in(tbl["text"], value_set=agg["text"]))
    domains = _most_common(kept, "domain")
    intents = _most_common(kept, "intent")
    devices = _device_types(kept, cfg.max_device_types)
    entries = [
        CatalogEntry(
            text=text,
            frequency=int(f),
            n_users=int(u),
            success_rate=float(r),
            domain=domains.get(text, ""),
            intent=intents.get(text, ""),
            last_seen=float(ls),
            device_types=devices.get(text, ()),
        )
        for text, f, u, r, ls in zip(
            agg["text"].to_pylist(),
            agg["ts_count"].to_pylist(),
            agg["user_count_distinct"].to_pylist(),
            agg["success_rate"].to_pylist(),
            agg["ts_max"].to_pylist(),
            strict=True,
        )
    ]
    return entries, len(freq)


def _personal(tbl: pa.Table, cfg: CatalogSettings) -> list[PersonalEntry]:
    ts_ok = pc.if_else(pc.equal(tbl["ok"], 1), tbl["ts"], pa.scalar(None, pa.float64()))
    agg = (
        tbl.append_column("ts_ok", ts_ok)
        .group_by(["puser", "text"], use_threads=False)
        .aggregate([("ok", "sum"), ("ts", "count"), ("ts_ok", "max")])
    )
    count = agg["ok_sum"].to_numpy()
    uses = agg["ts_count"].to_numpy()
    keep = (count >= cfg.personal_min_count) & (
        count >= cfg.personal_min_success_rate * uses - _EPS
    )
    agg = agg.filter(pa.array(keep)).sort_by(
        [
            ("puser", "ascending"),
            ("ok_sum", "descending"),
            ("ts_ok_max", "descending"),
            ("text", "ascending"),
        ]
    )
    users = np.asarray(agg["puser"].to_pylist(), dtype=object)
    n = len(users)
    if n == 0:
        return []
    pos = np.arange(n)
    start = np.ones(n, dtype=bool)
    start[1:] = users[1:] != users[:-1]
    rank = pos - np.maximum.accumulate(np.where(start, pos, 0))
    sel = np.flatnonzero(rank < cfg.personal_max_per_user)
    agg = agg.take(pa.array(sel))
    return [
        PersonalEntry(user=u, text=t, count=int(c), last_seen=float(ls))
        for u, t, c, ls in zip(
            agg["puser"].to_pylist(),
            agg["text"].to_pylist(),
            agg["ok_sum"].to_pylist(),
            agg["ts_ok_max"].to_pylist(),
            strict=True,
        )
    ]


def build_catalog(
    turns: Sequence[Turn],
    labels: Sequence[DefectLabel],
    settings: CatalogSettings,
    user_key: bytes,
    min_users_global: int = 1,
) -> CatalogResult:
    """Compute the global catalog and the personal histories of one job run.

    Args:
        turns: the job's turns (``turns[i].idx == i``).
        labels: every turn's label under the job's defect rule
            (:func:`offline.defects.label_turns`, the labels the Markov chain uses); a turn
            succeeds when it is not a defect.
        settings: thresholds (``catalog:`` section).
        user_key: HMAC key for pseudonymous user keys
            (:func:`rewrite.privacy.user_key_from_settings`).
        min_users_global: k-anonymity floor (``privacy.min_users_global``): a global entry
            needs at least ``max(settings.min_users, min_users_global)`` distinct users.
            Personal histories are not affected.

    Returns:
        :class:`CatalogResult`. Turns the service rewrote (:attr:`Turn.rewritten`) are not
        aggregated (counted in ``n_rewritten_excluded``); they still count for the labels of
        the others (a rewritten turn rephrasing an earlier one makes that one a defect).

    Raises:
        ValueError: ``user_key`` is empty, or ``labels`` do not match ``turns``.
    """
    if not user_key:
        raise ValueError("user_key must not be empty")
    if len(labels) != len(turns):
        raise ValueError(f"{len(labels)} labels for {len(turns)} turns")
    ok_all = np.fromiter((not lab.defect for lab in labels), dtype=bool, count=len(labels))
    own = [t for t in turns if not t.rewritten]
    ok = ok_all[np.fromiter((t.idx for t in own), dtype=np.int64, count=len(own))]
    n_rewritten = len(turns) - len(own)
    turns = own
    raw_users = [t.user_id for t in turns]
    pseudo = {u: pseudonymize(u, user_key) for u in set(raw_users)}
    tbl = pa.table(
        {
            "text": pa.array([t.normalized for t in turns], pa.string()),
            "user": pa.array(raw_users, pa.string()),
            "puser": pa.array([pseudo[u] for u in raw_users], pa.string()),
            "ts": pa.array([t.ts for t in turns], pa.float64()),
            "ok": pa.array(ok.astype(np.int64), pa.int64()),
            "domain": pa.array([t.domain for t in turns], pa.string()),
            "intent": pa.array([t.intent for t in turns], pa.string()),
            "device_type": pa.array([t.device_type for t in turns], pa.string()),
        }
    )
    catalog, n_utterances = _global(tbl, settings, max(settings.min_users, min_users_global))
    personal = _personal(tbl, settings)
    result = CatalogResult(
        catalog=catalog,
        personal=personal,
        n_turns=len(turns),
        n_success_turns=int(ok.sum()),
        n_utterances=n_utterances,
        n_personal_users=len({p.user for p in personal}),
        n_rewritten_excluded=n_rewritten,
    )
    log.info(
        "catalog: %d of %d utterances; personal: %d entries for %d users",
        len(catalog),
        n_utterances,
        len(personal),
        result.n_personal_users,
    )
    return result


def write_catalog(entries: Sequence[CatalogEntry], path: Path) -> None:
    """Write ``catalog.parquet`` (:data:`CATALOG_SCHEMA`), rows in the given order."""
    cols = {name: [getattr(e, name) for e in entries] for name in CATALOG_SCHEMA.names}
    cols[DEVICE_TYPES_COLUMN] = [[asdict(d) for d in e.device_types] for e in entries]
    pq.write_table(pa.Table.from_pydict(cols, schema=CATALOG_SCHEMA), path)


def read_catalog(path: Path) -> list[CatalogEntry]:
    """Read ``catalog.parquet`` back, row order kept (row i = FAISS id i).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: its columns are not :data:`CATALOG_SCHEMA`'s.
    """
    rows = _read(path, CATALOG_SCHEMA).to_pylist()
    for row in rows:
        row[DEVICE_TYPES_COLUMN] = device_types_from_rows(row[DEVICE_TYPES_COLUMN])
    return [CatalogEntry(**row) for row in rows]


def write_personal(entries: Sequence[PersonalEntry], path: Path) -> None:
    """Write ``personal.parquet`` (:data:`PERSONAL_SCHEMA`: pseudonymous user, text, count,
    last_seen), rows in the given order."""
    cols = {name: [getattr(e, name) for e in entries] for name in PERSONAL_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(cols, schema=PERSONAL_SCHEMA), path)


def read_personal(path: Path) -> list[PersonalEntry]:
    """Read ``personal.parquet`` back, row order kept.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: its columns are not :data:`PERSONAL_SCHEMA`'s.
    """
    return [PersonalEntry(**row) for row in _read(path, PERSONAL_SCHEMA).to_pylist()]


def _read(path: Path, schema: pa.Schema) -> pa.Table:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found (run `qrw nightly` first)")
    tbl = pq.read_table(path)
    if DEVICE_TYPES_COLUMN in schema.names and DEVICE_TYPES_COLUMN not in tbl.schema.names:
        # written before device types were recorded: no device-type data
        tbl = tbl.append_column(DEVICE_TYPES_COLUMN, pa.nulls(tbl.num_rows, DEVICE_TYPES_TYPE))
    if tbl.schema.names != schema.names:
        raise ValueError(f"{path}: columns {tbl.schema.names}, expected {schema.names}")
    return tbl.cast(schema)
