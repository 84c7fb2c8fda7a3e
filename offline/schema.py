"""Turn-log schema v1 (see DESIGN.md) and its readers.

One record per user turn, JSONL or Parquet with the same column names. Rows that break
the schema never stop a job: they are written to a quarantine file with their reason and
position, and counted. Validation uses pydantic v2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rewrite.normalize import normalize_device_type

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
REQUIRED_FIELDS = ("turn_id", "user_id", "timestamp", "utterance")
#: Longest JSONL line read, characters. A longer line (a binary or corrupt file, a runaway
#: writer) is quarantined as ``line_too_long`` and skipped without ever being held in memory
#: whole, so one bad line never costs more than this much memory.
MAX_LINE_CHARS = 1 << 20


class TurnLog(BaseModel):
    """One user turn, as the assistant logged it.

    Required: ``turn_id`` (unique), ``user_id`` (pseudonymous), ``timestamp`` (timezone-aware;
    naive values are rejected), ``utterance`` (the ASR 1-best the system acted on, non-empty).
    Unknown extra fields are kept (``model_extra``) and ignored. ``device_type`` (an optional
    addition to schema v1: the kind of device, e.g. ``speaker``, ``display``, ``tv``) is
    normalized by :func:`rewrite.normalize.normalize_device_type`; a value that is not a short
    ``[a-z0-9_.-]`` token quarantines the row.
    """

    model_config = ConfigDict(extra="allow", frozen=True, str_strip_whitespace=False)

    turn_id: str = Field(min_length=1, max_length=256)
    user_id: str = Field(min_length=1, max_length=256)
    timestamp: datetime
    utterance: str
    device_id: str | None = None
    asr_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    response: str | None = None
    domain: str | None = None
    intent: str | None = None
    nlu_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    barge_in: bool | None = None
    feedback: Literal[-1, 0, 1] | None = None
    arm: str | None = None
    rewrite: str | None = None
    rewrite_source: str | None = None
    locale: str | None = None
    device_type: str | None = None

    @field_validator("device_type")
    @classmethod
    def _device_type(cls, v: str | None) -> str | None:
        # normalized here ("Speaker" -> "speaker") so the catalog counts one spelling; a
        # non-token value is a schema error (quarantined)
        t = normalize_device_type(v)
        return sys.intern(t) if t else None

    @field_validator("timestamp")
    @classmethod
    def _zone_aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("timestamp must carry a time zone (ISO-8601 with offset or Z)")
        try:
            return v.astimezone(UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59-23:00 is past datetime.max in UTC
            raise ValueError("timestamp out of range in UTC") from None

    @field_validator("utterance")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("utterance is empty")
        return v

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict, timestamp as ISO-8601 UTC (``...Z``), ``None`` fields dropped."""
        d = self.model_dump(exclude_none=True)
        d["timestamp"] = self.timestamp.isoformat().replace("+00:00", "Z")
        return d


@dataclass(frozen=True)
class QuarantinedRow:
    """A row that failed validation: where it was, why, and its raw text (truncated)."""

    source: str
    line: int
    reason: str
    raw: str

    @property
    def code(self) -> str:
        """The reason's category (:func:`reason_code`), what ``report.json`` counts."""
        return reason_code(self.reason)


#: Quarantine reason prefixes → category codes (``report.json`` ``quarantined.by_reason``).
_REASON_CODES = (
    ("invalid JSON", "invalid_json"),
    ("line too long", "line_too_long"),
    ("row is not a JSON object", "not_an_object"),
    ("missing required field", "missing_field"),
    ("utterance too long", "utterance_too_long"),
    ("timestamp in the future", "future_timestamp"),
    ("duplicate turn_id", "duplicate_turn_id"),
    ("unreadable file", "unreadable_file"),
)


def reason_code(reason: str) -> str:
    """A bounded category for a quarantine reason, never holding row data.

    ``invalid_json``, ``line_too_long``, ``not_an_object``, ``missing_field``,
    ``utterance_too_long``, ``future_timestamp``, ``duplicate_turn_id``, ``unreadable_file``;
    a schema violation of a field is ``invalid_<field>`` (its first error, e.g.
    ``invalid_timestamp`` for a naive timestamp, ``invalid_utterance`` for a wrong type);
    anything else ``other``.
    """
    for prefix, code in _REASON_CODES:
        if reason.startswith(prefix):
            return code
    field_name = reason.split(":", 1)[0].split(".", 1)[0]
    if ":" in reason and field_name in TurnLog.model_fields:
        return f"invalid_{field_name}"
    return "other"


@dataclass
class ReadResult:
    """Valid turns plus the rows that were quarantined, in input order."""

    turns: list[TurnLog] = field(default_factory=list)
    quarantined: list[QuarantinedRow] = field(default_factory=list)
    rows_in: int = 0


def _reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "row"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class TurnValidator:
    """Validates raw rows (dicts) against :class:`TurnLog` plus job-level rules.

    Job-level rules beyond the model: utterance length cap, timestamps too far in the future,
    duplicate ``turn_id`` within one run.

    Args:
        max_utterance_chars: longer utterances are quarantined.
        max_future_skew_s: timestamps later than now + this are quarantined (seconds).
        now: reference time (UTC); default: the wall clock at construction.
    """

    def __init__(
        self,
        max_utterance_chars: int = 1000,
        max_future_skew_s: float = 86400.0,
        now: datetime | None = None,
    ) -> None:
        self.max_utterance_chars = max_utterance_chars
        self.latest = (now or datetime.now(UTC)) + timedelta(seconds=max_future_skew_s)
        self._seen: set[str] = set()

    def validate(self, row: Any) -> TurnLog | str:
        """Return the validated turn, or the reason (str) it must be quarantined."""
        if not isinstance(row, dict):
            return f"row is not a JSON object (got {type(row).__name__})"
        missing = [f for f in REQUIRED_FIELDS if row.get(f) in (None, "")]
        if missing:
            return "missing required field(s): " + ", ".join(missing)
        try:
            turn = TurnLog.model_validate(row)
        except ValidationError as e:
            return _reason(e)
        if len(turn.utterance) > self.max_utterance_chars:
            return f"utterance too long ({len(turn.utterance)} > {self.max_utterance_chars} chars)"
        if turn.timestamp > self.latest:
            return f"timestamp in the future ({turn.timestamp.isoformat()})"
        if turn.turn_id in self._seen:
            return f"duplicate turn_id {turn.turn_id!r}"
        self._seen.add(turn.turn_id)
        return turn


class LineTooLongError(ValueError):
    """A JSONL line over :data:`MAX_LINE_CHARS` characters (skipped, quarantined)."""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(line_no, raw_line, parsed_or_exception)`` for a JSONL file (1-based lines).

    Every line yields one item (blank lines none), whatever it holds: a line that is not JSON
    (bad syntax, a truncated last line, an integer over Python's 4,300-digit limit, nesting
    deeper than the recursion limit) yields the exception, and a line over
    :data:`MAX_LINE_CHARS` yields :class:`LineTooLongError` with its first characters and is
    skipped in bounded memory. Undecodable UTF-8 bytes become U+FFFD.
    """
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        i = 0
        while line := fh.readline(MAX_LINE_CHARS + 1):
            i += 1
            if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                while (rest := fh.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                    pass  # skip the rest of the over-long line
                yield i, line[:2000], LineTooLongError(f"line too long (> {MAX_LINE_CHARS} chars)")
                continue
            if not line.strip():
                continue
            try:
                yield i, line, json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                yield i, line, e


def _iter_parquet(path: Path) -> Iterator[tuple[int, str, Any]]:
    pf = pq.ParquetFile(path)
    n = 0
    for batch in pf.iter_batches(batch_size=65536):
        for row in batch.to_pylist():
            n += 1
            yield n, "", row


def iter_log_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories into their ``*.jsonl`` / ``*.parquet`` files (sorted).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"turn-log path not found: {p}")
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix in (".jsonl", ".parquet")))
        else:
            out.append(p)
    return out


def read_turn_logs(
    paths: Iterable[str | Path], validator: TurnValidator | None = None
) -> ReadResult:
    """Read and validate turn logs from JSONL and/or Parquet files.

    Args:
        paths: files or directories (``*.jsonl``, ``*.parquet``; ``.gz`` is not supported).
        validator: validation rules; default :class:`TurnValidator` with default limits.

    Returns:
        :class:`ReadResult` with valid turns and quarantined rows; ``rows_in`` counts every
        non-blank input row, so ``rows_in == len(turns) + len(quarantined)``. A file that
        cannot be read (a truncated Parquet footer, an I/O error) counts as one quarantined
        row (``line`` 0); rows read from it before the failure are kept.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    validator = validator or TurnValidator()
    res = ReadResult()
    for path in iter_log_files(paths):
        reader = _iter_parquet if path.suffix == ".parquet" else _iter_jsonl
        try:
            for line_no, raw, row in reader(path):
                res.rows_in += 1
                if isinstance(row, Exception):
                    reason = (
                        str(row) if isinstance(row, LineTooLongError) else f"invalid JSON: {row}"
                    )
                    res.quarantined.append(QuarantinedRow(str(path), line_no, reason, raw[:2000]))
                    continue
                out = validator.validate(row)
                if isinstance(out, str):
                    raw_text = raw or json.dumps(row, default=str)
                    res.quarantined.append(QuarantinedRow(str(path), line_no, out, raw_text[:2000]))
                else:
                    res.turns.append(out)
        except (OSError, ValueError) as e:  # unreadable / truncated parquet
            res.rows_in += 1
            res.quarantined.append(QuarantinedRow(str(path), 0, f"unreadable file: {e}", ""))
            log.warning("unreadable turn-log file %s: %s", path, e)
    return res


def write_quarantine(rows: Iterable[QuarantinedRow], path: Path) -> int:
    """Write quarantined rows as JSONL (``source``, ``line``, ``reason``, ``raw``); return count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(
                json.dumps(
                    {"source": r.source, "line": r.line, "reason": r.reason, "raw": r.raw},
                    ensure_ascii=False,
                )
                + "\n"
            )
            n += 1
    return n


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Write dicts as JSONL (UTF-8, one object a line, parent folders created); returns the
    row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_turn_logs(turns: Iterable[TurnLog | dict[str, Any]], path: Path) -> int:
    """Write turns as JSONL (``.jsonl``) or Parquet (``.parquet``); returns the row count."""
    rows = [t.to_json_dict() if isinstance(t, TurnLog) else t for t in turns]
    if path.suffix != ".parquet":
        return write_jsonl(rows, path)
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)
