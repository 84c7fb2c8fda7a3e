"""Synthetic A/B outcome tables for the offline.ab tests (known truth, fast to build)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from offline.ab.schema import OUTCOME_SCHEMA

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DOMAINS = ("weather", "iot", "music")


def make_table(rows: Sequence[Mapping[str, Any]], experiment: str = "exp") -> pa.Table:
    """Outcome table from partial rows; defaults fill every other column.

    Defaults: day 1, arm control, user u0, session s-<user>, turn_id t<i>, timestamp T0 + i s,
    utterance "play jazz", domain weather, defect False, rewritten = rewrite is not None.
    """
    full: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        user = r.get("user", "u0")
        rewrite = r.get("rewrite")
        row: dict[str, Any] = {
            "experiment": experiment,
            "day": 1,
            "arm": "control",
            "user": user,
            "session_id": f"s-{user}",
            "turn_id": f"t{i:05d}",
            "timestamp": T0 + timedelta(seconds=i),
            "utterance": "play jazz",
            "rewrite": rewrite,
            "rewrite_source": "global" if rewrite is not None else None,
            "model_version": "v1" if rewrite is not None else None,
            "domain": "weather",
            "defect": False,
            "defect_reasons": "",
            "true_defect": None,
            "rewritten": rewrite is not None,
            "rewrite_outcome": None,
        }
        row.update(r)
        full.append(row)
    return pa.Table.from_pylist(full, schema=OUTCOME_SCHEMA)


def user_turns(arm: str, user: str, turns: int, defects: int, **extra: Any) -> list[dict[str, Any]]:
    """``turns`` rows of one user, the first ``defects`` of them defects."""
    return [{"arm": arm, "user": user, "defect": i < defects, **extra} for i in range(turns)]


def synthetic(
    seed: int,
    means: Mapping[str, float],
    users: Mapping[str, int] | int = 400,
    kappa: float = 4.0,
    mean_turns: float = 9.0,
    days: int = 1,
    experiment: str = "exp",
) -> pa.Table:
    """Synthetic experiment with known truth.

    Per user: defect propensity p_u ~ Beta(mean·kappa, (1 − mean)·kappa), turns N_u ~ 1 +
    Poisson(mean_turns), each turn a defect with probability p_u. The population defect rate of
    an arm is therefore ``means[arm]`` (N_u independent of p_u). Turns spread uniformly over
    ``days`` and over :data:`DOMAINS`; 20% of turns in non-control arms are rewritten with a
    random win/loss/tie outcome.
    """
    rng = np.random.default_rng(seed)
    parts: list[pa.Table] = []
    offset = 0
    for arm, mean in means.items():
        n_users = users if isinstance(users, int) else users[arm]
        p = rng.beta(mean * kappa, (1.0 - mean) * kappa, size=n_users)
        n_turns = 1 + rng.poisson(mean_turns, size=n_users)
        user_idx = np.repeat(np.arange(n_users), n_turns)
        n = len(user_idx)
        k = np.arange(n) - np.repeat(np.cumsum(n_turns) - n_turns, n_turns)  # turn no. of user
        defect = rng.random(n) < p[user_idx]
        day = rng.integers(1, days + 1, size=n)
        dom = np.asarray(DOMAINS)[rng.integers(0, len(DOMAINS), size=n)]
        rewritten = (rng.random(n) < 0.2) if arm != "control" else np.zeros(n, dtype=bool)
        outcome = np.asarray(["win", "loss", "tie"])[rng.integers(0, 3, size=n)]
        user = np.char.add(f"{arm}-u", np.char.zfill(user_idx.astype(str), 4))
        turn_no = offset + np.arange(n)
        offset += n
        rw_text = np.char.add("rw ", (k % 5).astype(str))
        parts.append(
            pa.table(
                {
                    "experiment": pa.array([experiment] * n),
                    "day": pa.array(day, pa.int32()),
                    "arm": pa.array([arm] * n),
                    "user": pa.array(user),
                    "session_id": pa.array(np.char.add(np.char.add(user, "-s"), day.astype(str))),
                    "turn_id": pa.array(np.char.add("t", np.char.zfill(turn_no.astype(str), 7))),
                    "timestamp": pa.array(
                        np.datetime64("2025-01-01T00:00:00", "us")
                        + turn_no.astype("timedelta64[s]"),
                        pa.timestamp("us", tz="UTC"),
                    ),
                    "utterance": pa.array(np.char.add("utt ", (k % 5).astype(str))),
                    "rewrite": pa.array(np.where(rewritten, rw_text, None)),
                    "rewrite_source": pa.array(np.where(rewritten, "global", None)),
                    "model_version": pa.array(np.where(rewritten, "v1", None)),
                    "domain": pa.array(dom),
                    "defect": pa.array(defect),
                    "defect_reasons": pa.array(np.where(defect, "barge_in", "")),
                    "true_defect": pa.array(defect),
                    "rewritten": pa.array(rewritten),
                    "rewrite_outcome": pa.array(np.where(rewritten, outcome, None)),
                },
                schema=OUTCOME_SCHEMA,
            )
        )
    return pa.concat_tables(parts)
