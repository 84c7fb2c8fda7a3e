"""DPR training data: (defective utterance → rewrite target) pairs from a nightly run dir.

Two sources, both written by the nightly job (:func:`offline.job.run_nightly`) into the run dir:

- ``pairs.parquet`` (:data:`offline.job.PAIRS_SCHEMA`): rewrite pairs solved by the absorbing
  Markov chain; ``source`` → ``rewrite``, weight ``support``. High precision, few.
- ``rephrases.parquet``: detected rephrase links ``earlier`` → ``later``. A link is used when
  the later text is in the catalog (``catalog.parquet``: utterances that historically succeed,
  so the rephrase most likely fixed the request) and the earlier text is not (an utterance that
  usually succeeds and was still rephrased is more likely a change of mind than a defect).

Identical (query, target) pairs are merged (count = support + links). Queries equal to their
target are dropped. The split is by query text (every pair of one defective utterance goes to
the same split, so no source is in two splits), seeded. The passage set the dev recall is
measured over is the catalog plus every target (targets outside the catalog are rare: a Markov
rewrite below the catalog thresholds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rapidfuzz import fuzz

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
REPHRASES_FILE = "rephrases.parquet"
CATALOG_FILE = "catalog.parquet"


@dataclass(frozen=True)
class DprPair:
    """One training pair.

    Attributes:
        query: the defective utterance (normalized), the query side.
        target: its rewrite (normalized), the passage side.
        origin: ``"pairs"`` (Markov-chain pair; wins when both sources have the pair) or
            ``"rephrase"`` (a rephrase link into the catalog).
        count: support (pairs) plus links (rephrases) behind it.
    """

    query: str
    target: str
    origin: str
    count: int = 1


@dataclass
class DprDataset:
    """Train/dev pairs and the passage universe.

    Attributes:
        train / dev: pairs, split by query text (disjoint queries).
        passages: sorted unique passage texts: catalog texts plus every target.
        counts: how many rows each source gave and how many were kept.
    """

    train: list[DprPair]
    dev: list[DprPair]
    passages: list[str]
    counts: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 hex over train, dev and passages (part of the artifact's content hash)."""
        h = hashlib.sha256()
        for name, rows in (("train", self.train), ("dev", self.dev)):
            h.update(f"\n{name}:{len(rows)}\n".encode())
            for p in rows:
                h.update(json.dumps(asdict(p), sort_keys=True, ensure_ascii=False).encode())
        h.update(f"\npassages:{len(self.passages)}\n".encode())
        h.update("\n".join(self.passages).encode())
        return h.hexdigest()


def read_catalog_texts(run_dir: Path) -> list[str] | None:
    """The ``text`` column of ``run_dir/catalog.parquet``, or None when there is no catalog."""
    path = Path(run_dir) / CATALOG_FILE
    if not path.exists():
        return None
    texts: list[str] = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in texts if t]


def load_pairs(
    run_dir: Path, catalog: Sequence[str] | None, min_similarity: float = 0.0
) -> tuple[list[DprPair], dict[str, int]]:
    """Merged (query, target) pairs of a run dir, in a deterministic order.

    Args:
        run_dir: a nightly run dir.
        catalog: catalog texts; None = no catalog (rephrase links are then not used).
        min_similarity: rephrase links whose normalized Levenshtein similarity
            (``rapidfuzz.fuzz.ratio`` / 100) is below this are dropped (Markov pairs are kept).

    Returns:
        (pairs sorted by query then target; row counts per source).

    Raises:
        FileNotFoundError: neither ``pairs.parquet`` nor ``rephrases.parquet`` exists.
    """
    run_dir = Path(run_dir)
    pairs_path, reph_path = run_dir / PAIRS_FILE, run_dir / REPHRASES_FILE
    if not pairs_path.exists() and not reph_path.exists():
        raise FileNotFoundError(
            f"no {PAIRS_FILE} or {REPHRASES_FILE} in {run_dir} (run `qrw nightly` first)"
        )
    merged: dict[tuple[str, str], list[Any]] = {}
    counts = {"pairs_rows": 0, "rephrase_rows": 0, "rephrase_used": 0,
              "rephrase_later_not_in_catalog": 0, "rephrase_earlier_in_catalog": 0,
              "rephrase_dissimilar": 0, "identical_dropped": 0}  # fmt: skip
    if pairs_path.exists():
        for row in pq.read_table(pairs_path, columns=["source", "rewrite", "support"]).to_pylist():
            counts["pairs_rows"] += 1
            q, t = row["source"] or "", row["rewrite"] or ""
            if not q or not t or q == t:
                counts["identical_dropped"] += 1
                continue
            merged[(q, t)] = ["pairs", int(row["support"] or 1)]
    cat = set(catalog) if catalog is not None else None
    if reph_path.exists() and cat is None:
        log.warning("no %s in %s: rephrase links are not used for DPR", CATALOG_FILE, run_dir)
    elif reph_path.exists() and cat is not None:
        for row in pq.read_table(reph_path, columns=["earlier", "later"]).to_pylist():
            counts["rephrase_rows"] += 1
            q, t = row["earlier"] or "", row["later"] or ""
            if not q or not t or q == t:
                counts["identical_dropped"] += 1
                continue
            if t not in cat:
                counts["rephrase_later_not_in_catalog"] += 1
                continue
            if q in cat:
                counts["rephrase_earlier_in_catalog"] += 1
                continue
            if min_similarity > 0 and fuzz.ratio(q, t) < 100 * min_similarity:
                counts["rephrase_dissimilar"] += 1
                continue
            counts["rephrase_used"] += 1
            entry = merged.setdefault((q, t), ["rephrase", 0])
            entry[1] += 1
    pairs = [DprPair(q, t, o, c) for (q, t), (o, c) in sorted(merged.items())]
    return pairs, counts


def split_by_query(
    pairs: Sequence[DprPair], dev_share: float, seed: int
) -> tuple[list[DprPair], list[DprPair]]:
    """Seeded split by query text: a query's pairs all go to train or all to dev.

    ``round(dev_share * n_queries)`` queries (at least 1 when there are >= 2 queries and
    ``dev_share > 0``) go to dev.
    """
    queries = sorted({p.query for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(queries)
    n_dev = round(dev_share * len(queries))
    if dev_share > 0 and len(queries) >= 2:
        n_dev = min(max(n_dev, 1), len(queries) - 1)
    dev_q = set(queries[:n_dev])
    train = [p for p in pairs if p.query not in dev_q]
    dev = [p for p in pairs if p.query in dev_q]
    return train, dev


def build_dataset(
    run_dir: Path, dev_share: float = 0.15, seed: int = 13, min_similarity: float = 0.0
) -> DprDataset:
    """Pairs, split and passages of a nightly run dir (see the module docstring);
    ``min_similarity`` filters rephrase links (:func:`load_pairs`).

    Raises:
        FileNotFoundError: no pairs or rephrases in ``run_dir``.
        ValueError: no usable pair (nothing to train on).
    """
    catalog = read_catalog_texts(run_dir)
    pairs, counts = load_pairs(run_dir, catalog, min_similarity)
    if not pairs:
        raise ValueError(
            f"no usable DPR training pairs in {run_dir} ({counts}); "
            "need pairs.parquet rows or rephrase links into catalog.parquet"
        )
    train, dev = split_by_query(pairs, dev_share, seed)
    passages = sorted(set(catalog or ()) | {p.target for p in pairs})
    counts.update(
        {
            "catalog": len(catalog) if catalog is not None else 0,
            "passages": len(passages),
            "pairs": len(pairs),
            "train_pairs": len(train),
            "dev_pairs": len(dev),
            "train_queries": len({p.query for p in train}),
            "dev_queries": len({p.query for p in dev}),
        }
    )
    log.info("DPR data from %s: %s", run_dir, counts)
    return DprDataset(train, dev, passages, counts)


def dev_groups(dev: Sequence[DprPair]) -> dict[str, set[str]]:
    """Dev query → its set of correct targets (a query may have several rewrites)."""
    out: dict[str, set[str]] = {}
    for p in dev:
        out.setdefault(p.query, set()).add(p.target)
    return out
