"""Metrics store for A/B outcomes: hive-partitioned Parquet under a root folder, read with DuckDB.

Layout: ``root/experiment=<name>/day=<dd>/part-0.parquet`` (``dd`` zero-padded to two digits,
more when needed). The files hold the :data:`~offline.ab.schema.OUTCOME_SCHEMA` columns except
the partition keys ``experiment`` and ``day``, which DuckDB restores from the path
(``read_parquet(..., hive_partitioning = true)``). Writes are atomic: a temporary file in the
day's folder, flushed and fsynced, then ``os.replace`` — readers see the old day or the new
one, never half a file. Reads open a fresh in-process DuckDB connection per call (connections
are not shared between threads, so a threaded dashboard may call :meth:`OutcomeStore.read`
concurrently); filter values are bound as SQL parameters, never formatted into the query.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from offline.ab.schema import OUTCOME_COLUMNS, OUTCOME_SCHEMA, empty_outcomes, validate_outcomes

log = logging.getLogger(__name__)

PART_FILE = "part-0.parquet"
_PARTITION_KEYS = ("experiment", "day")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_DAY_RE = re.compile(r"^day=(\d+)$")


def _check_experiment(experiment: str) -> None:
    if not _NAME_RE.match(experiment):
        raise ValueError(
            f"invalid experiment name {experiment!r}: use letters, digits, '_', '.', '-' "
            "(it becomes a folder name)"
        )


def _to_arrow(relation: Any) -> pa.Table:
    """Fetch a DuckDB relation as an Arrow table (``to_arrow_table`` in duckdb >= 1.4,
    ``fetch_arrow_table`` before)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table
    result = fetch()
    if result is None:  # pragma: no cover - duckdb returns a table for SELECT queries
        raise RuntimeError("duckdb returned no result for a SELECT")
    return result if isinstance(result, pa.Table) else pa.Table.from_batches(list(result))


class OutcomeStore:
    """Per-turn outcomes as hive-partitioned Parquet under ``root``
    (``root/experiment=<name>/day=<dd>/part-0.parquet``), queried with DuckDB.

    Args:
        root: store folder; created on the first write. Its path should not contain glob
            characters (``*?[``) because DuckDB expands them.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- layout ---------------------------------------------------------------------------
    def _experiment_dir(self, experiment: str) -> Path:
        _check_experiment(experiment)
        return self.root / f"experiment={experiment}"

    def _day_files(self, experiment: str) -> dict[int, Path]:
        exp_dir = self._experiment_dir(experiment)
        if not exp_dir.is_dir():
            return {}
        files: dict[int, Path] = {}
        for child in exp_dir.iterdir():
            m = _DAY_RE.match(child.name)
            if m and (child / PART_FILE).is_file():
                files[int(m.group(1))] = child / PART_FILE
        return dict(sorted(files.items()))

    # -- writing --------------------------------------------------------------------------
    def write_day(self, experiment: str, day: int, table: pa.Table) -> Path:
        """Write (or replace) one day of one experiment.

        Args:
            experiment: experiment name (letters, digits, ``_ . -``).
            day: 1-based day; every row's ``day`` must equal it.
            table: outcome rows (see :func:`~offline.ab.schema.validate_outcomes`; every row's
                ``experiment`` must equal ``experiment``; ``turn_id`` unique within the day).

        Returns:
            Path of the written Parquet file.

        Raises:
            ValueError: invalid name/day, a missing column (named), nulls in a required column,
                rows of another experiment or day, duplicate ``turn_id``.
        """
        _check_experiment(experiment)
        if day < 1:
            raise ValueError(f"day must be >= 1, got {day}")
        valid = validate_outcomes(table)
        if valid.num_rows:
            if not pc.all(pc.equal(valid.column("experiment"), experiment)).as_py():
                raise ValueError(f"rows of another experiment than {experiment!r} in day {day}")
            if not pc.all(pc.equal(valid.column("day"), day)).as_py():
                raise ValueError(f"rows of another day than {day} in the table for day {day}")
            if pc.count_distinct(valid.column("turn_id")).as_py() != valid.num_rows:
                raise ValueError(f"duplicate turn_id in {experiment!r} day {day}")
        data = valid.drop_columns(list(_PARTITION_KEYS))
        day_dir = self._experiment_dir(experiment) / f"day={day:02d}"
        day_dir.mkdir(parents=True, exist_ok=True)
        target = day_dir / PART_FILE
        fd, tmp_name = tempfile.mkstemp(prefix=".part-0.", suffix=".tmp", dir=day_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                pq.write_table(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        log.info("wrote %d outcome rows to %s", data.num_rows, target)
        return target

    # -- reading --------------------------------------------------------------------------
    def read(
        self,
        experiment: str,
        day_range: tuple[int, int] | None = None,
        domains: Sequence[str] | None = None,
    ) -> pa.Table:
        """Outcome rows of ``experiment``, optionally filtered.

        Args:
            experiment: experiment name.
            day_range: inclusive ``(first, last)`` day; None = all days.
            domains: keep rows whose ``domain`` is one of these (rows with a null domain are
                dropped by a domain filter); None or empty = all domains.

        Returns:
            A table with exactly :data:`~offline.ab.schema.OUTCOME_SCHEMA`, ordered by day,
            timestamp, turn_id. An unknown experiment gives an empty table (logged).

        Raises:
            ValueError: invalid experiment name or ``day_range`` with first > last.
        """
        files = self._day_files(experiment)
        if not files:
            log.warning("no outcomes for experiment %r under %s", experiment, self.root)
            return empty_outcomes()
        where: list[str] = []
        params: list[Any] = [[str(p) for p in files.values()]]
        if day_range is not None:
            lo, hi = day_range
            if lo > hi:
                raise ValueError(f"day_range first > last: {day_range}")
            where.append("day BETWEEN ? AND ?")
            params.extend([int(lo), int(hi)])
        if domains:
            where.append("list_contains(?::VARCHAR[], domain)")
            params.append([str(d) for d in domains])
        cols = ", ".join(f'"{c}"' for c in OUTCOME_COLUMNS)
        query = (
            f"SELECT {cols} FROM read_parquet(?::VARCHAR[], hive_partitioning = true, "
            "hive_types = {'experiment': VARCHAR, 'day': INTEGER})"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY day, timestamp NULLS LAST, turn_id"
        )
        with duckdb.connect() as con:
            table = _to_arrow(con.sql(query, params=params))
        return table.cast(OUTCOME_SCHEMA)

    def experiments(self) -> list[str]:
        """Names of the experiments with at least one stored day, sorted."""
        if not self.root.is_dir():
            return []
        names = []
        for child in self.root.iterdir():
            if child.is_dir() and child.name.startswith("experiment="):
                name = child.name.removeprefix("experiment=")
                if _NAME_RE.match(name) and self._day_files(name):
                    names.append(name)
        return sorted(names)

    def days(self, experiment: str) -> list[int]:
        """Stored days of ``experiment``, ascending ([] when unknown)."""
        return list(self._day_files(experiment))

    def domains(self, experiment: str) -> list[str]:
        """Distinct non-null ``domain`` values of ``experiment``, sorted ([] when unknown)."""
        files = self._day_files(experiment)
        if not files:
            return []
        query = (
            "SELECT DISTINCT domain FROM read_parquet(?::VARCHAR[]) "
            "WHERE domain IS NOT NULL ORDER BY domain"
        )
        with duckdb.connect() as con:
            rows = con.execute(query, [[str(p) for p in files.values()]]).fetchall()
        return [str(r[0]) for r in rows]
