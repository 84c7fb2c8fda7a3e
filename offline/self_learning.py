"""Self-aware self-learning: the service's own rewrites in the next night's logs.

Once pairs are published, part of the traffic the nightly job learns from was already
rewritten by the service: the log row carries what the user said (``utterance``), what NLU
received instead (``rewrite``) and which layer changed it (``rewrite_source``). That turn's
success or failure is the *rewrite's*, not the utterance's. Learning from it as if the user
had said it feeds the service's decisions back into its own evidence (Ponnusamy et al.,
"Self-Aware Feedback-Based Self-Learning in Large-Scale Conversational AI", NAACL 2022
Industry, arXiv:2205.00029): a rewrite's successes would raise its own confidence, and its
failures would be blamed on an utterance that was never tried on its own.

One rule, applied everywhere in the job: **a rewritten turn is evidence about its
(source, rewrite) pair only.**

- *Not positive evidence for mining* (always on). The job's turns keep what the user said
  (:attr:`offline.sessionize.Turn.normalized`) and the served rewrite apart
  (:attr:`~offline.sessionize.Turn.rewrite`). In the rephrase chains
  (:func:`offline.job.build_chains`) a rewritten turn is a cut: it is no chain state and no
  absorbing outcome, so its success is credited neither to ``success(rewrite)`` from its
  source (the pair's support and absorption probability) nor to ``success(source)``; the
  user's own turns before it end their chain with their own label (a turn the user then
  rephrased is a defect, absorbed in ``FAIL``), and the turns after it start a new chain.
  The global catalog and the personal histories (:func:`offline.catalog.build_catalog`) skip
  rewritten turns, so the rewrite target's frequency and success rate are not inflated by
  the service's own rewrites either. The cost: an un-rewritten turn's rephrase link across a
  rewritten turn is lost (conservative), and a pair whose traffic is all rewritten is only
  supported by the un-rewritten evidence still in the log window.
- *Feedback on the pair* (:func:`served_pair_feedback`). For every (source, rewrite) the
  service applied with a ``rewrite_source`` in ``self_learning.sources`` (default
  ``precomputed``), the job counts its rewritten turns in the window, their distinct users and
  the defects among them under the shared defect rule (:func:`offline.defects.label_turns`,
  the labels of ``defects.parquet``). A pair is **demoted** when it has at least
  ``min_rewritten_turns`` such turns from at least ``min_users`` users and a defect rate
  (defects / rewritten turns) strictly above ``max_defect_rate``; with ``demote`` on, a
  mined pair equal to a demoted (source, rewrite) is dropped before guardrails and publish
  (:func:`demote_pairs`), and the job writes ``feedback.parquet`` (every served pair),
  ``demoted.parquet`` and a ``self_learning`` section of ``report.json``. A different rewrite
  for the same source is not affected.

**Persistence.** Demotion needs no state outside the logs: the evidence is the rewritten
turns themselves, which stay in the job's log window. A withdrawn pair is no longer served,
so no new rewritten turns are added and its defect rate stays frozen until those turns age
out of the window. The turns that mined the pair are always older than the turns that judged
it (a pair is served only after it was mined), so a sliding window drops the mining
evidence no later than the feedback: the pair cannot come straight back from the old
chains. It can come back only when fresh un-rewritten traffic mines it again. Compared with
the paper's per-rewrite beta posterior this is a plain threshold on a count and a rate.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from offline.defects import DefectLabel
from offline.markov import RewritePair
from offline.sessionize import Turn
from rewrite.config import SelfLearningSettings

log = logging.getLogger(__name__)

#: ``feedback.parquet``: every (source, rewrite) the service applied with a judged
#: ``rewrite_source`` in the window. ``rewrite_source`` is the most common one of its turns.
FEEDBACK_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("rewrite", pa.string()),
        ("rewrite_source", pa.string()),
        ("rewritten_turns", pa.int64()),
        ("n_users", pa.int64()),
        ("defects", pa.int64()),
        ("defect_rate", pa.float64()),
        ("demoted", pa.bool_()),
    ]
)

#: ``demoted.parquet``: the demoted pairs (a subset of ``feedback.parquet``'s rows).
DEMOTED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("rewrite", pa.string()),
        ("rewritten_turns", pa.int64()),
        ("defects", pa.int64()),
        ("defect_rate", pa.float64()),
    ]
)


@dataclass(frozen=True)
class PairFeedback:
    """What the window's logs say about one (source, rewrite) the service applied.

    Attributes:
        source: normalized utterance as the users said it.
        rewrite: normalized rewrite NLU received.
        rewrite_source: the service layer that applied it most often (``precomputed``, ...).
        rewritten_turns: turns rewritten this way (>= 1).
        n_users: distinct users behind those turns.
        defects: those turns that are defects under the shared defect rule.
        defect_rate: ``defects / rewritten_turns``, in [0, 1].
        demoted: the thresholds of ``self_learning`` say withdraw it.
    """

    source: str
    rewrite: str
    rewrite_source: str
    rewritten_turns: int
    n_users: int
    defects: int
    defect_rate: float
    demoted: bool


def served_pair_feedback(
    turns: Sequence[Turn], labels: Sequence[DefectLabel], settings: SelfLearningSettings
) -> list[PairFeedback]:
    """Count the rewritten turns and their defects per served (source, rewrite).

    Args:
        turns: the job's turns (``turns[i].idx == i``).
        labels: their defect labels (:func:`offline.defects.label_turns`), same order.
        settings: ``self_learning`` (judged ``sources`` and the demotion thresholds).

    Returns:
        One entry per served pair whose ``rewrite_source`` is in ``settings.sources``,
        sorted by defects (descending), then source and rewrite.

    Raises:
        ValueError: ``labels`` and ``turns`` differ in length.
    """
    if len(labels) != len(turns):
        raise ValueError(f"{len(labels)} labels for {len(turns)} turns")
    judged = set(settings.sources)
    n: Counter[tuple[str, str]] = Counter()
    bad: Counter[tuple[str, str]] = Counter()
    users: dict[tuple[str, str], set[str]] = defaultdict(set)
    layers: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for t, lab in zip(turns, labels, strict=True):
        if not t.rewritten or t.rewrite_source not in judged:
            continue
        key = (t.normalized, t.rewrite)
        n[key] += 1
        bad[key] += lab.defect
        users[key].add(t.user_id)
        layers[key][t.rewrite_source] += 1
    out = []
    for key, count in n.items():
        rate = bad[key] / count
        demoted = (
            count >= settings.min_rewritten_turns
            and len(users[key]) >= settings.min_users
            and rate > settings.max_defect_rate
        )
        out.append(
            PairFeedback(
                source=key[0],
                rewrite=key[1],
                rewrite_source=min(layers[key].items(), key=lambda kv: (-kv[1], kv[0]))[0],
                rewritten_turns=count,
                n_users=len(users[key]),
                defects=bad[key],
                defect_rate=round(rate, 6),
                demoted=demoted,
            )
        )
    out.sort(key=lambda f: (-f.defects, f.source, f.rewrite))
    return out


def demote_pairs(
    pairs: Sequence[RewritePair], feedback: Sequence[PairFeedback]
) -> tuple[list[RewritePair], list[RewritePair]]:
    """Drop the mined pairs whose exact (source, rewrite) is demoted.

    Returns:
        ``(kept, dropped)``, each in the input order.
    """
    demoted = {(f.source, f.rewrite) for f in feedback if f.demoted}
    kept = [p for p in pairs if (p.source, p.rewrite) not in demoted]
    dropped = [p for p in pairs if (p.source, p.rewrite) in demoted]
    return kept, dropped


def summarize(
    turns: Sequence[Turn],
    feedback: Sequence[PairFeedback],
    dropped: Sequence[RewritePair],
    settings: SelfLearningSettings,
) -> dict[str, Any]:
    """The ``self_learning`` section of ``report.json``.

    Keys: ``rewritten_turns`` (all rewritten turns of the window), ``rewritten_by_source``
    (per ``rewrite_source``), ``served_pairs`` (judged pairs seen), ``judged_turns``,
    ``judged_defects``, ``demoted_pairs``, ``dropped_pairs`` (mined pairs withdrawn tonight;
    0 with ``demote`` off), ``demote`` and ``demoted`` (the first ``max_report_entries``
    demoted pairs as dicts: source, rewrite, rewritten_turns, n_users, defects,
    defect_rate).
    """
    by_source = Counter(t.rewrite_source or "unknown" for t in turns if t.rewritten)
    demoted = [f for f in feedback if f.demoted]
    return {
        "rewritten_turns": sum(by_source.values()),
        "rewritten_by_source": dict(sorted(by_source.items())),
        "served_pairs": len(feedback),
        "judged_turns": sum(f.rewritten_turns for f in feedback),
        "judged_defects": sum(f.defects for f in feedback),
        "demoted_pairs": len(demoted),
        "dropped_pairs": len(dropped),
        "demote": settings.demote,
        "demoted": [
            {k: v for k, v in asdict(f).items() if k not in ("demoted", "rewrite_source")}
            for f in demoted[: settings.max_report_entries]
        ],
    }


def write_feedback(feedback: Sequence[PairFeedback], path: Path) -> None:
    """Write ``feedback.parquet`` (:data:`FEEDBACK_SCHEMA`), rows in the given order."""
    cols = {name: [getattr(f, name) for f in feedback] for name in FEEDBACK_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(cols, schema=FEEDBACK_SCHEMA), path)


def write_demoted(feedback: Sequence[PairFeedback], path: Path) -> None:
    """Write ``demoted.parquet`` (:data:`DEMOTED_SCHEMA`): the demoted entries of
    ``feedback``, in the given order."""
    rows = [f for f in feedback if f.demoted]
    cols = {name: [getattr(f, name) for f in rows] for name in DEMOTED_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(cols, schema=DEMOTED_SCHEMA), path)


def read_feedback(path: Path) -> list[PairFeedback]:
    """Read ``feedback.parquet`` back.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found (run `qrw nightly` first)")
    return [PairFeedback(**row) for row in pq.read_table(path).to_pylist()]
