"""Import DSTC2 calls (real callers, live ASR, human transcriptions) as turn logs + truth.

Source: the Second Dialog State Tracking Challenge corpus — Henderson, Thomson & Williams,
"The Second Dialog State Tracking Challenge", SIGDIAL 2014 — Cambridge restaurant information
calls from 2013, as flattened to one call per JSONL line in ``../shared/data/dstc2/`` (fields:
``../shared/data/README.md``). No license is stated by the original release: development and
evaluation use only.

Mapping, one turn-log row per user turn (schema v1, :mod:`offline.schema`):

* ``turn_id`` = ``f"{call_id}:{turn_index}"``, ``user_id`` = ``caller_id``, ``call_id`` (extra
  field), ``domain`` = ``"restaurant"``;
* ``utterance`` = the live ASR 1-best the system acted on (``asr_1best``), never the human
  transcription (that goes to the truth file, which only evaluation reads);
* ``asr_confidence`` = the probability of the first n-best hypothesis when that hypothesis
  equals the 1-best, else ``None``;
* ``response`` = the system prompt that *followed* the turn (the next turn's ``system``);
  ``None`` for the last turn of a call;
* ``barge_in`` = whether the user interrupted that ``response``. In DSTC2 ``system_aborted``
  sits on the turn whose user speech cut the *preceding* prompt off, so the flag for turn ``i``
  is the next turn's ``system_aborted`` — aligned with ``response`` as the schema defines both.
  ``None`` where unknown (calls without a raw log, and the last turn of a call);
* ``timestamp`` = ``session_start`` (no zone in the data; read as UTC) + ``start_time``
  seconds when every turn of the call has one (raw-log calls), else + ``turn_index *
  fixed_spacing_s`` seconds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from offline.schema import (
    QuarantinedRow,
    TurnLog,
    TurnValidator,
    write_jsonl,
    write_quarantine,
    write_turn_logs,
)
from rewrite.normalize import normalize_utterance

log = logging.getLogger(__name__)

DOMAIN = "restaurant"
EMPTY_ASR_REASON = "empty ASR 1-best (the recognizer heard no words)"
_RAW_CHARS = 2000


class CallFormatError(ValueError):
    """A DSTC2 call line lacks a required field or has a field of the wrong type."""


@dataclass(frozen=True)
class Dstc2ImportSummary:
    """What :func:`import_dstc2` did.

    Attributes:
        calls: call lines imported (quarantined call lines excluded).
        user_turns: user turns in the imported calls (written + empty ASR + quarantined turns).
        turns_written: rows in ``turns.jsonl`` (and in ``truth.jsonl``).
        empty_asr: turns with an empty ASR 1-best, listed in ``skipped.jsonl``.
        quarantined: rows in ``quarantine.jsonl`` (malformed call lines + invalid turn rows).
        quarantined_calls: malformed call lines among ``quarantined``.
        callers: distinct ``caller_id`` values among the written turns.
        calls_with_timing: imported calls timed by their ``start_time`` (raw-log calls); the
            others use the fixed spacing.
        asr_differs_share: share of written turns whose normalized ASR 1-best differs from the
            normalized human transcription (0..1; 0.0 when nothing was written).
        elapsed_s: wall time of the import, seconds.
        paths: output files by name: ``turns``, ``truth``, ``skipped``, ``quarantine``.
    """

    calls: int
    user_turns: int
    turns_written: int
    empty_asr: int
    quarantined: int
    quarantined_calls: int
    callers: int
    calls_with_timing: int
    asr_differs_share: float
    elapsed_s: float
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = asdict(self)
        d["paths"] = {k: str(v) for k, v in self.paths.items()}
        return d


@dataclass(frozen=True)
class _Call:
    call_id: str
    caller_id: str
    session_start: datetime
    turns: list[dict[str, Any]]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _require_str(obj: dict[str, Any], key: str, where: str, non_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise CallFormatError(f"{where}missing field {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise CallFormatError(f"{where}field {key!r} must be a string, got {type(v).__name__}")
    if non_empty and not v.strip():
        raise CallFormatError(f"{where}field {key!r} is empty")
    return v


def _parse_session_start(value: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as e:
        raise CallFormatError(f"session_start is not an ISO-8601 time: {value!r}") from e
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _parse_call(obj: Any) -> _Call:
    """Check the fields the import needs; turns come back sorted by ``turn_index``.

    Raises:
        CallFormatError: a required field is missing or has the wrong type.
    """
    if not isinstance(obj, dict):
        raise CallFormatError(f"call line is not a JSON object (got {type(obj).__name__})")
    call_id = _require_str(obj, "call_id", "", non_empty=True)
    caller_id = _require_str(obj, "caller_id", "", non_empty=True)
    session_start = _parse_session_start(_require_str(obj, "session_start", "", non_empty=True))
    turns = obj.get("turns")
    if not isinstance(turns, list):
        raise CallFormatError("missing field 'turns' (a list of user turns)")
    seen: set[int] = set()
    for n, t in enumerate(turns):
        where = f"turns[{n}]: "
        if not isinstance(t, dict):
            raise CallFormatError(f"{where}not a JSON object")
        idx = t.get("turn_index")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise CallFormatError(f"{where}turn_index must be a non-negative integer")
        if idx in seen:
            raise CallFormatError(f"{where}duplicate turn_index {idx}")
        seen.add(idx)
        for key in ("system", "asr_1best", "transcription"):
            _require_str(t, key, where)
        aborted = t.get("system_aborted")
        if aborted is not None and not isinstance(aborted, bool):
            raise CallFormatError(f"{where}system_aborted must be true, false or null")
        start = t.get("start_time")
        if start is not None and not _is_number(start):
            raise CallFormatError(f"{where}start_time must be a number of seconds or null")
        sem = t.get("semantics")
        if sem is not None and not (isinstance(sem, list) and all(isinstance(s, str) for s in sem)):
            raise CallFormatError(f"{where}semantics must be a list of strings")
    ordered = sorted(turns, key=lambda t: int(t["turn_index"]))
    return _Call(call_id, caller_id, session_start, ordered)


def _asr_confidence(turn: dict[str, Any]) -> float | None:
    """Probability of the first n-best hypothesis when it equals the 1-best, else ``None``."""
    nbest = turn.get("asr_nbest")
    if not isinstance(nbest, list) or not nbest:
        return None
    first = nbest[0]
    if not isinstance(first, list | tuple) or len(first) < 2:
        return None
    hyp, prob = first[0], first[1]
    if hyp != turn["asr_1best"] or not _is_number(prob):
        return None
    return float(prob)


def _offsets_s(call: _Call, fixed_spacing_s: float) -> tuple[list[float], bool]:
    """Seconds from ``session_start`` per turn, and whether ``start_time`` was used."""
    starts = [t.get("start_time") for t in call.turns]
    if starts and all(_is_number(s) for s in starts):
        return [float(s) for s in starts if s is not None], True
    return [int(t["turn_index"]) * fixed_spacing_s for t in call.turns], False


def import_dstc2(path: Path, out_dir: Path, fixed_spacing_s: float = 10.0) -> Dstc2ImportSummary:
    """Convert a DSTC2 JSONL file (one call a line) into turn logs and a truth file.

    Turns whose ASR 1-best is empty are not turn-log rows: the schema forbids an empty
    utterance, and a real assistant does not log a request for silence (nothing reached NLU).
    They are not lost either: they are counted (``empty_asr``) and listed in ``skipped.jsonl``
    with their reason and human transcription. They still count for the alignment of
    ``response``/``barge_in`` of the turn before them (that prompt was really played).

    A malformed call line (bad JSON, a missing or mistyped field) never stops the import: it
    goes to ``quarantine.jsonl`` with its 1-based line number and reason. A turn row that fails
    :class:`offline.schema.TurnValidator` is quarantined the same way (reason prefixed with its
    ``turn_id``). Quarantine rows have the :func:`offline.schema.write_quarantine` layout
    (``source``, ``line``, ``reason``, ``raw``).

    Args:
        path: DSTC2 JSONL file, e.g. ``../shared/data/dstc2/train.jsonl``.
        out_dir: output directory (created); existing output files are overwritten.
        fixed_spacing_s: seconds between consecutive turns of a call without ``start_time``
            (calls without a raw log); ``Settings.session.fixed_spacing_s`` by convention.

    Returns:
        :class:`Dstc2ImportSummary`. Files written in ``out_dir``:
        ``turns.jsonl`` (schema v1 rows), ``truth.jsonl`` (``turn_id``, ``call_id``,
        ``intended_text`` = human transcription, ``semantics`` = list of gold dialogue acts),
        ``skipped.jsonl`` (empty-ASR turns) and ``quarantine.jsonl``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: ``fixed_spacing_s`` is not a positive number of seconds.
    """
    t0 = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"DSTC2 input file not found: {path}")
    if not _is_number(fixed_spacing_s) or fixed_spacing_s <= 0:
        raise ValueError(f"fixed_spacing_s must be > 0 seconds, got {fixed_spacing_s!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = str(path)

    validator = TurnValidator()
    turns_out: list[TurnLog] = []
    truth_out: list[dict[str, Any]] = []
    skipped_out: list[dict[str, Any]] = []
    quarantine: list[QuarantinedRow] = []
    callers: set[str] = set()
    calls = user_turns = quarantined_calls = calls_timed = differs = 0

    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                call = _parse_call(json.loads(line))
            except json.JSONDecodeError as e:
                reason = f"invalid JSON: {e}"
            except CallFormatError as e:
                reason = f"malformed call: {e}"
            else:
                reason = ""
            if reason:
                quarantined_calls += 1
                quarantine.append(QuarantinedRow(source, line_no, reason, line[:_RAW_CHARS]))
                log.warning("%s:%d quarantined: %s", source, line_no, reason)
                continue

            calls += 1
            offsets, timed = _offsets_s(call, fixed_spacing_s)
            calls_timed += timed
            for i, turn in enumerate(call.turns):
                user_turns += 1
                turn_id = f"{call.call_id}:{turn['turn_index']}"
                if not turn["asr_1best"].strip():
                    skipped_out.append(
                        {
                            "source": source,
                            "line": line_no,
                            "turn_id": turn_id,
                            "call_id": call.call_id,
                            "reason": EMPTY_ASR_REASON,
                            "transcription": turn["transcription"],
                        }
                    )
                    continue
                nxt = call.turns[i + 1] if i + 1 < len(call.turns) else None
                row: dict[str, Any] = {
                    "turn_id": turn_id,
                    "user_id": call.caller_id,
                    "timestamp": call.session_start + timedelta(seconds=offsets[i]),
                    "utterance": turn["asr_1best"],
                    "asr_confidence": _asr_confidence(turn),
                    "response": nxt["system"] if nxt is not None else None,
                    "barge_in": nxt.get("system_aborted") if nxt is not None else None,
                    "domain": DOMAIN,
                    "call_id": call.call_id,
                }
                out = validator.validate(row)
                if isinstance(out, str):
                    raw = json.dumps(row, default=str, ensure_ascii=False)[:_RAW_CHARS]
                    quarantine.append(QuarantinedRow(source, line_no, f"{turn_id}: {out}", raw))
                    log.warning("%s:%d turn %s quarantined: %s", source, line_no, turn_id, out)
                    continue
                turns_out.append(out)
                callers.add(call.caller_id)
                truth_out.append(
                    {
                        "turn_id": turn_id,
                        "call_id": call.call_id,
                        "intended_text": turn["transcription"],
                        "semantics": list(turn.get("semantics") or []),
                    }
                )
                differs += normalize_utterance(turn["asr_1best"]) != normalize_utterance(
                    turn["transcription"]
                )

    paths = {
        "turns": out_dir / "turns.jsonl",
        "truth": out_dir / "truth.jsonl",
        "skipped": out_dir / "skipped.jsonl",
        "quarantine": out_dir / "quarantine.jsonl",
    }
    write_turn_logs(turns_out, paths["turns"])
    write_jsonl(truth_out, paths["truth"])
    write_jsonl(skipped_out, paths["skipped"])
    write_quarantine(quarantine, paths["quarantine"])

    summary = Dstc2ImportSummary(
        calls=calls,
        user_turns=user_turns,
        turns_written=len(turns_out),
        empty_asr=len(skipped_out),
        quarantined=len(quarantine),
        quarantined_calls=quarantined_calls,
        callers=len(callers),
        calls_with_timing=calls_timed,
        asr_differs_share=differs / len(turns_out) if turns_out else 0.0,
        elapsed_s=time.perf_counter() - t0,
        paths=paths,
    )
    log.info(
        "DSTC2 import %s: %d calls, %d turns written, %d empty ASR, %d quarantined (%.2f s)",
        source,
        summary.calls,
        summary.turns_written,
        summary.empty_asr,
        summary.quarantined,
        summary.elapsed_s,
    )
    return summary
