"""The nightly job's online artifacts: the DPR passage encoder, the FAISS global index of the
catalog, and the index folder a published version points at.

The passage encoder is the fine-tuned DPR artifact ``dpr.artifact`` / ``dpr.artifacts_dir/LATEST``
(``qrw train dpr``); when none is trained the job uses the zero-shot MiniLM artifact (exported
on first use, no training) and says so in the log and in ``report.json``
(``online.encoder_kind``). The index is written into the run dir; publishing copies it to
``dpr.index_root/<content id[:16]>/`` (content-addressed, so the folder name is known before
the version id) and records that folder and the ``encoder_id`` in the version's meta. The
folder name hashes the index, the catalog and the encoder id, so the same index bytes under
another encoder never share a folder.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offline.dpr.ids import zero_shot_dir
from rewrite.config import Settings
from rewrite.encoder import DPR_META, DprModelMissingError, PassageEncoder, resolve_dpr_artifact
from rewrite.ivflists import IVFDATA_FILE
from rewrite.retrieval import (
    CATALOG_FILE,
    INDEX_FILE,
    INDEX_META,
    TEXT_HASH,
    IndexInfo,
    data_files,
)

log = logging.getLogger(__name__)


@dataclass
class OnlineBuild:
    """What the job built for the online layer.

    Attributes:
        encoder: the passage encoder (also used for personal-history vectors).
        encoder_kind: the artifact's ``variant``: ``"zero-shot"``, ``"fine-tuned"``,
            ``"distilled-query"`` (a shallower query tower) or ``"static-query"``.
        index_dir: the index folder inside the run dir.
        info: its ``index.json``.
        known_rows: text → row of ``known_vectors``: catalog texts whose passage vectors the
            index stage kept because publishing needs them again (personal histories).
        known_vectors: ``(len(known_rows), dim)`` float32, L2-normalised.
    """

    encoder: PassageEncoder
    encoder_kind: str
    index_dir: Path
    info: IndexInfo
    known_rows: dict[str, int] = field(default_factory=dict)
    known_vectors: np.ndarray | None = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Passage vectors of ``texts``, ``(len(texts), dim)`` float32, L2-normalised: the
        index stage's vectors for the catalog texts it kept (:attr:`known_rows`), the encoder
        for the others (one call). Saves encoding a text twice in one night: personal
        histories hold the catalog's utterances too.
        """
        known = [i for i, t in enumerate(texts) if t in self.known_rows]
        if not known or self.known_vectors is None:
            return self.encoder.encode(texts)
        out = np.empty((len(texts), self.known_vectors.shape[1]), dtype=np.float32)
        out[known] = self.known_vectors[[self.known_rows[texts[i]] for i in known]]
        rest = [i for i, t in enumerate(texts) if t not in self.known_rows]
        if rest:
            out[rest] = self.encoder.encode([texts[i] for i in rest])
        return out

    @property
    def content_id(self) -> str:
        """sha256 over the index file (and its lists file, when it has one), the catalog
        sidecar, the encoder id and the catalog's text-hash scheme (part of the published
        version's content, and the installed
        folder's name: a folder installed before the text hashes were stable, whose
        ``catalog.arrow`` the service would have to rehash, is not taken for a new build)."""
        sha = self.info.sha256
        lists = [sha[IVFDATA_FILE]] if IVFDATA_FILE in sha else []  # format 2's lists file
        h = hashlib.sha256()
        for part in (sha[INDEX_FILE], sha[CATALOG_FILE], self.info.encoder_id, TEXT_HASH, *lists):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()


def load_passage_encoder(settings: Settings) -> tuple[PassageEncoder, str]:
    """The DPR passage tower the settings name, else the zero-shot MiniLM one.

    Returns:
        ``(encoder, kind)`` with kind the artifact's ``variant`` (:class:`OnlineBuild`).

    Raises:
        DprModelMissingError: ``dpr.artifact`` is set explicitly but missing (an explicit
            choice is never replaced).
    """
    d = settings.dpr
    try:
        path = resolve_dpr_artifact(Path(d.artifacts_dir), d.artifact)
        kind = "fine-tuned"
    except DprModelMissingError:
        if d.artifact is not None:
            raise
        log.warning(
            "no fine-tuned DPR encoder under %s (run `qrw train dpr`); the job indexes the "
            "catalog with the zero-shot MiniLM encoder",
            d.artifacts_dir,
        )
        path = zero_shot_dir(Path(d.artifacts_dir))
        if not (path / DPR_META).exists():  # export once; torch is imported only then
            from offline.dpr.train import export_zero_shot

            path = export_zero_shot(Path(d.artifacts_dir)).artifact
        kind = "zero-shot"
    enc = PassageEncoder.load(path, threads=2)
    kind = "zero-shot" if enc.meta.get("zero_shot") else str(enc.meta.get("variant", kind))
    return enc, kind


def build_online(
    run_dir: Path,
    settings: Settings,
    progress: bool = False,
    reuse_texts: Collection[str] = (),
) -> OnlineBuild:
    """Encode ``run_dir/catalog.parquet`` and write ``run_dir/index/``.

    Args:
        reuse_texts: texts the night encodes again later (its personal histories' utterances);
            the vectors of those that are catalog texts are kept for :meth:`OnlineBuild.encode`.

    Raises:
        FileNotFoundError: no catalog in the run dir.
    """
    from offline.index import encode_and_index

    encoder, kind = load_passage_encoder(settings)
    info, texts, vectors = encode_and_index(
        run_dir / CATALOG_FILE, encoder, run_dir / "index", settings.dpr, progress=progress
    )
    keep = [i for i, t in enumerate(texts) if t in reuse_texts]
    log.info("keeping the vectors of %d catalog texts for personal histories", len(keep))
    return OnlineBuild(
        encoder,
        kind,
        run_dir / "index",
        info,
        known_rows={texts[i]: row for row, i in enumerate(keep)},
        known_vectors=vectors[keep] if keep else None,
    )


def install_index(build: OnlineBuild, settings: Settings) -> Path:
    """Copy the run's index folder to ``dpr.index_root/<content_id[:16]>/`` (idempotent).

    The copy is written under a temporary name and renamed, so a reader never sees a partial
    folder. Returns the installed folder (absolute).
    """
    root = Path(settings.dpr.index_root).resolve()
    final = root / build.content_id[:16]
    if (final / INDEX_META).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in (*data_files(build.info), INDEX_META):
        shutil.copy2(build.index_dir / name, tmp / name)
    if final.exists():  # an incomplete leftover (no index.json)
        shutil.rmtree(final)
    tmp.rename(final)
    return final
