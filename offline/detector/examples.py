"""Detector examples: the current turn plus the preceding turns of its session.

One :class:`DetectorExample` per turn that has at least one earlier turn of the same session
within ``max_gap_s`` seconds. The context lists those earlier turns **newest first** (at most
``max_context``), each with its interaction signals (time gap, barge-in, system response).
``label`` is the index into ``context`` of the turn the current one rephrases, or -1 for
"no rephrase". Every detector (span model, pairwise baselines, heuristic) consumes these and
returns one :class:`Prediction` per example, so all are evaluated on exactly the same input.

The same builder serves training (labels from truth files) and the nightly job (labels unknown),
so the model sees identical inputs in both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from offline.sessionize import Session, Turn

NO_REPHRASE = -1


@dataclass(frozen=True)
class ContextFeature:
    """One earlier turn as the detector sees it.

    Attributes:
        turn_id: id of the earlier turn.
        text: its normalized utterance (what the user said, :attr:`Turn.normalized`).
        gap_s: seconds from that turn to the current turn (>= 0).
        barge_in: the user interrupted that turn's response.
        response: the system response to that turn ('' if unknown).
    """

    turn_id: str
    text: str
    gap_s: float
    barge_in: bool
    response: str


@dataclass(frozen=True)
class DetectorExample:
    """A current turn and its session context (newest first).

    Attributes:
        example_id: the current turn's ``turn_id``.
        user_id: the user (splits are by user, never by turn).
        source: data source tag (``"sim"``, ``"dstc2"``, ``"job"``).
        current: normalized current utterance.
        context: earlier turns, newest first, ``1 <= len <= max_context``.
        label: index into ``context`` of the rephrased turn, or -1 (no rephrase).
        current_idx / context_idx: job-internal turn indices (-1 outside a job run).
    """

    example_id: str
    user_id: str
    source: str
    current: str
    context: tuple[ContextFeature, ...]
    label: int = NO_REPHRASE
    current_idx: int = -1
    context_idx: tuple[int, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form without the job-internal indices (what ``asdict`` gives, built
        directly: ``asdict`` deep-copies every field and cost ~3 s per 100k turns in the job)."""
        return {
            "example_id": self.example_id,
            "user_id": self.user_id,
            "source": self.source,
            "current": self.current,
            "context": [
                {
                    "turn_id": c.turn_id,
                    "text": c.text,
                    "gap_s": c.gap_s,
                    "barge_in": c.barge_in,
                    "response": c.response,
                }
                for c in self.context
            ],
            "label": self.label,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> DetectorExample:
        ctx = tuple(ContextFeature(**c) for c in d["context"])
        return DetectorExample(
            d["example_id"], d["user_id"], d["source"], d["current"], ctx, int(d["label"])
        )


@dataclass(frozen=True)
class Prediction:
    """A detector's answer for one example.

    Attributes:
        label: predicted context index, or -1 (no rephrase).
        score: confidence of that decision in [0, 1] (span models: span probability;
            pairwise models: the best pair's probability).
        exact_span: for span models, whether the predicted (start, end) tokens are exactly the
            chosen turn's utterance span; pairwise models always choose whole turns (True).
    """

    label: int
    score: float
    exact_span: bool = True


class ExampleDetector(Protocol):
    """Anything that maps examples to predictions (span model, baselines)."""

    name: str

    def predict(self, examples: Sequence[DetectorExample]) -> list[Prediction]:
        """One prediction per example, same order."""


def build_examples(
    turns: Sequence[Turn],
    sessions: Iterable[Session],
    max_context: int = 3,
    max_gap_s: float = 45.0,
    source: str = "job",
) -> list[DetectorExample]:
    """Examples for every turn that has earlier turns of its session within ``max_gap_s``.

    Args:
        turns: the job's turns (``Turn.idx`` indexes this sequence).
        sessions: sessions over those turns.
        max_context: most earlier turns per example (newest kept).
        max_gap_s: earlier turns further back than this (seconds) are left out.
        source: tag stored on each example.

    Returns:
        Examples in session order, all with ``label = -1``.
    """
    out: list[DetectorExample] = []
    for s in sessions:
        ids = s.turns
        for j in range(1, len(ids)):
            cur = turns[ids[j]]
            ctx: list[ContextFeature] = []
            ctx_idx: list[int] = []
            for i in range(j - 1, max(-1, j - 1 - max_context), -1):
                e = turns[ids[i]]
                gap = cur.ts - e.ts
                if gap > max_gap_s:
                    break
                ctx.append(ContextFeature(e.turn_id, e.normalized, round(gap, 3),
                                          e.barge_in, e.response))  # fmt: skip
                ctx_idx.append(e.idx)
            if ctx:
                out.append(
                    DetectorExample(
                        cur.turn_id,
                        cur.user_id,
                        source,
                        cur.normalized,
                        tuple(ctx),
                        NO_REPHRASE,
                        cur.idx,
                        tuple(ctx_idx),
                    )
                )
    return out


def write_examples(examples: Iterable[DetectorExample], path: Path) -> int:
    """Write examples as JSONL; returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_examples(path: Path) -> list[DetectorExample]:
    """Read examples written by :func:`write_examples`.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"detector examples not found: {path}")
    with Path(path).open(encoding="utf-8") as fh:
        return [DetectorExample.from_json(json.loads(line)) for line in fh if line.strip()]
