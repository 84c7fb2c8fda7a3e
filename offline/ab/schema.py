"""Per-turn experiment outcomes: one row per user turn of an A/B experiment.

The closed-loop experiment runner writes these rows (one Parquet partition per experiment and
day, see :mod:`offline.ab.store`); :mod:`offline.ab.analysis` reads them. Columns and types are
:data:`OUTCOME_SCHEMA`; the defect rule that fills ``defect`` is :mod:`offline.defects`.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: Values of ``rewrite_outcome`` for rewritten turns (null for turns not rewritten or unknown).
REWRITE_OUTCOMES = ("win", "loss", "tie")

OUTCOME_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("day", pa.int32(), nullable=False),
        pa.field("arm", pa.string(), nullable=False),
        pa.field("user", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("turn_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC")),
        pa.field("utterance", pa.string()),
        pa.field("rewrite", pa.string()),
        pa.field("rewrite_source", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("defect", pa.bool_(), nullable=False),
        pa.field("defect_reasons", pa.string()),
        pa.field("true_defect", pa.bool_()),
        pa.field("rewritten", pa.bool_(), nullable=False),
        pa.field("rewrite_outcome", pa.string()),
    ]
)
"""Columns of the outcome table (pyarrow types; ``nullable=False`` marks required values):

- ``experiment`` experiment name; ``day`` 1-based day of the closed loop;
- ``arm`` e.g. ``control`` | ``precomputed`` | ``global`` | ``global_personal``;
- ``user`` pseudonymous user key (the unit of randomisation); ``session_id``; ``turn_id``
  (unique within the experiment); ``timestamp`` (UTC, microseconds);
- ``utterance`` what ASR heard; ``rewrite`` (null when not rewritten); ``rewrite_source``
  (null | ``precomputed`` | ``global`` | ``personal``); ``model_version`` (null when none);
- ``domain`` the intended goal's domain (nullable);
- ``defect`` the implicit-feedback defect rule; ``defect_reasons`` comma-joined, '' when none;
- ``true_defect`` simulator truth when known (nullable); ``rewritten``;
- ``rewrite_outcome`` ``win`` | ``loss`` | ``tie`` for rewritten turns, else null.
"""

OUTCOME_COLUMNS: tuple[str, ...] = tuple(OUTCOME_SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(f.name for f in OUTCOME_SCHEMA if not f.nullable)


def empty_outcomes() -> pa.Table:
    """An outcome table with no rows and exactly :data:`OUTCOME_SCHEMA`."""
    return OUTCOME_SCHEMA.empty_table()


def validate_outcomes(table: pa.Table) -> pa.Table:
    """Check and cast ``table`` to :data:`OUTCOME_SCHEMA`.

    Columns are selected in schema order (extra columns are dropped, logged at debug level) and
    cast to the schema's types (e.g. int64 ``day`` -> int32, naive or ns timestamps -> UTC
    microseconds; naive timestamps are taken as UTC).

    Returns:
        A new table with exactly :data:`OUTCOME_SCHEMA`.

    Raises:
        ValueError: a column is missing (the message names it), a required column holds nulls,
            or a column cannot be cast to its schema type.
    """
    missing = [name for name in OUTCOME_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"outcome table is missing column(s): {', '.join(missing)}")
    extra = [name for name in table.column_names if name not in OUTCOME_COLUMNS]
    if extra:
        log.debug("dropping extra outcome column(s): %s", ", ".join(extra))
    columns: list[pa.ChunkedArray] = []
    for fld in OUTCOME_SCHEMA:
        col = table.column(fld.name)
        if not fld.nullable and col.null_count:
            raise ValueError(f"outcome column {fld.name!r} has {col.null_count} null value(s)")
        try:
            columns.append(pc.cast(col, fld.type) if col.type != fld.type else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"outcome column {fld.name!r} of type {col.type} is not castable to {fld.type}: "
                f"{exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=OUTCOME_SCHEMA)
