"""Turn-log rows (schema v1) for tests that write small logs by hand."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

#: Default start of a hand-written log (timezone-aware; timestamps are ``T0 + sec``).
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def turn_row(
    tid: str,
    user: str,
    sec: float,
    utt: str,
    response: str = "OK.",
    *,
    t0: datetime = T0,
    **extra: Any,
) -> dict[str, Any]:
    """One turn-log row: ``turn_id``, ``user_id``, ``timestamp`` (``t0 + sec`` seconds, ISO-8601
    with ``Z``), ``utterance``, ``response`` and any ``extra`` fields (``barge_in=True``, ...)."""
    ts = (t0 + timedelta(seconds=sec)).isoformat().replace("+00:00", "Z")
    row = {"turn_id": tid, "user_id": user, "timestamp": ts, "utterance": utt, "response": response}
    return {**row, **extra}


def turn_line(*args: Any, **kwargs: Any) -> str:
    """:func:`turn_row` as one JSONL line (no newline)."""
    return json.dumps(turn_row(*args, **kwargs))
