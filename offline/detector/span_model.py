"""The contextual span rephrase detector (ContReph-style): rendering, model, decoding.

Input (Wang et al., EMNLP 2021, "Contextual Rephrase Detection for Reducing Friction in
Dialogue Systems")::

    [CLS] current [SEP] [GAPk] [BARGE]? [RESP] response[:n] [UTT] utterance_1 [SEP] ... [SEP]

Context turns are listed newest first, each with its interaction signals rendered as added
special tokens: a time-gap bucket, barge-in, and the first few wordpieces of the system
response. ``token_type_ids`` are 0 for the current utterance, 1 for the context. A start and
an end head (one ``Linear(hidden, 1)`` each, as in BERT extractive QA, Devlin et al. 2019)
score every token of the last layer; the answer is the span of the rephrased turn's utterance,
or ``[CLS]`` (position 0) for "no rephrase". Only ``[CLS]`` and context-utterance tokens may be
chosen (the mask is applied outside the network, so the ONNX graph stays plain).

Rendering and decoding are plain functions shared by training, torch inference and ONNX
inference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertModel, PreTrainedTokenizerBase

from offline.detector.examples import NO_REPHRASE, DetectorExample, Prediction

SPECIAL_TOKENS = ["[GAP0]", "[GAP1]", "[GAP2]", "[GAP3]", "[GAP4]", "[BARGE]", "[RESP]", "[UTT]"]


@dataclass(frozen=True)
class RenderConfig:
    """How examples become token ids.

    Attributes:
        gap_edges_s: upper edges (seconds) of gap buckets ``[GAP0]..[GAP3]``; above = ``[GAP4]``.
        max_current_tokens / max_utterance_tokens / max_response_tokens: per-piece caps.
        max_length: total cap (older context turns are dropped first when over it).
    """

    gap_edges_s: tuple[float, ...] = (2.0, 5.0, 10.0, 30.0)
    max_current_tokens: int = 32
    max_utterance_tokens: int = 24
    max_response_tokens: int = 4
    max_length: int = 128

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RenderConfig:
        """Inverse of :func:`dataclasses.asdict` (JSON lists back to tuples)."""
        return RenderConfig(
            gap_edges_s=tuple(float(x) for x in d["gap_edges_s"]),
            max_current_tokens=int(d["max_current_tokens"]),
            max_utterance_tokens=int(d["max_utterance_tokens"]),
            max_response_tokens=int(d["max_response_tokens"]),
            max_length=int(d["max_length"]),
        )


@dataclass
class Rendered:
    """One rendered example.

    Attributes:
        input_ids: ``(seq,)`` token ids; ``token_type_ids`` the same length.
        spans: per context turn (newest first) the inclusive ``(start, end)`` token positions of
            its utterance; turns that did not fit are absent.
        gold: gold ``(start, end)``; ``(0, 0)`` for no rephrase (or a dropped gold turn).
    """

    input_ids: list[int]
    token_type_ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    gold: tuple[int, int] = (0, 0)

    def allowed(self) -> np.ndarray:
        """``(seq,)`` bool: positions a span may start or end at (CLS + utterance tokens)."""
        mask = np.zeros(len(self.input_ids), dtype=bool)
        mask[0] = True
        for a, b in self.spans:
            mask[a : b + 1] = True
        return mask


class Renderer:
    """Renders :class:`DetectorExample` objects for a tokenizer that has :data:`SPECIAL_TOKENS`.

    Args:
        tokenizer: a BERT wordpiece tokenizer (special tokens already added).
        config: :class:`RenderConfig`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: RenderConfig) -> None:
        self.tok = tokenizer
        self.config = config
        ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        assert isinstance(ids, list)
        self.special = dict(zip(SPECIAL_TOKENS, ids, strict=True))
        self.cls = int(tokenizer.cls_token_id)
        self.sep = int(tokenizer.sep_token_id)
        self._pieces = functools.lru_cache(maxsize=200_000)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def gap_token(self, gap_s: float) -> int:
        for k, edge in enumerate(self.config.gap_edges_s):
            if gap_s <= edge:
                return self.special[f"[GAP{k}]"]
        return self.special["[GAP4]"]

    def render(self, ex: DetectorExample) -> Rendered:
        """Token ids, type ids, utterance spans and the gold span of one example."""
        c = self.config
        ids = [self.cls, *self._pieces(ex.current)[: c.max_current_tokens], self.sep]
        types = [0] * len(ids)
        spans: list[tuple[int, int]] = []
        for turn in ex.context:
            head = [self.gap_token(turn.gap_s)]
            if turn.barge_in:
                head.append(self.special["[BARGE]"])
            if turn.response:
                head += [
                    self.special["[RESP]"],
                    *self._pieces(turn.response)[: c.max_response_tokens],
                ]
            head.append(self.special["[UTT]"])
            utt = list(self._pieces(turn.text)[: c.max_utterance_tokens]) or [self.tok.unk_token_id]
            if len(ids) + len(head) + len(utt) + 1 > c.max_length:
                break
            start = len(ids) + len(head)
            ids += [*head, *utt, self.sep]
            spans.append((start, start + len(utt) - 1))
        types += [1] * (len(ids) - len(types))
        gold = spans[ex.label] if 0 <= ex.label < len(spans) else (0, 0)
        return Rendered(ids, types, spans, gold)


def pad_batch(rendered: Sequence[Rendered], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pad to the longest: ``input_ids``, ``attention_mask``, ``token_type_ids`` as
    ``(batch, seq) int64`` and ``allowed`` as ``(batch, seq) bool``."""
    n, length = len(rendered), max(len(r.input_ids) for r in rendered)
    out = {
        "input_ids": np.full((n, length), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((n, length), dtype=np.int64),
        "token_type_ids": np.zeros((n, length), dtype=np.int64),
        "allowed": np.zeros((n, length), dtype=bool),
    }
    for i, r in enumerate(rendered):
        k = len(r.input_ids)
        out["input_ids"][i, :k] = r.input_ids
        out["attention_mask"][i, :k] = 1
        out["token_type_ids"][i, :k] = r.token_type_ids
        out["allowed"][i, :k] = r.allowed()
    return out


class SpanRephraseModel(nn.Module):
    """``BertModel`` + start/end heads over the last layer.

    ``forward(input_ids, attention_mask, token_type_ids)`` with ``(batch, seq) int64`` inputs
    returns ``(start_logits, end_logits)``, each ``(batch, seq) float32``.
    """

    def __init__(self, encoder: BertModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.span_head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logits = self.span_head(hidden)
        return logits[..., 0], logits[..., 1]


def span_loss(
    start: torch.Tensor, end: torch.Tensor, allowed: torch.Tensor, gold: torch.Tensor
) -> torch.Tensor:
    """Mean of the start and end cross-entropies over allowed positions.

    Args:
        start, end: ``(batch, seq)`` logits; allowed: ``(batch, seq)`` bool;
        gold: ``(batch, 2)`` int64 gold (start, end) positions.
    """
    neg = torch.finfo(start.dtype).min / 2
    start = start.masked_fill(~allowed, neg)
    end = end.masked_fill(~allowed, neg)
    ce = nn.functional.cross_entropy
    return (ce(start, gold[:, 0]) + ce(end, gold[:, 1])) / 2


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def decode(start: np.ndarray, end: np.ndarray, rendered: Sequence[Rendered]) -> list[Prediction]:
    """Best span per example among "no rephrase" and spans inside one context utterance.

    Args:
        start, end: ``(batch, seq) float32`` logits (padding beyond each example ignored).
        rendered: the rendered examples of the batch, same order.

    Returns:
        One :class:`Prediction` per example: ``label`` = context index of the chosen turn
        (-1 = no rephrase), ``score`` = P(start) * P(end) under the masked softmaxes,
        ``exact_span`` = the chosen span is exactly that turn's utterance.
    """
    preds = []
    for i, r in enumerate(rendered):
        allowed = r.allowed()
        k = len(allowed)
        ls = np.where(allowed, _log_softmax(np.where(allowed, start[i, :k], -1e9)), -np.inf)
        le = np.where(allowed, _log_softmax(np.where(allowed, end[i, :k], -1e9)), -np.inf)
        best = (float(ls[0] + le[0]), NO_REPHRASE, True)
        for t, (a, b) in enumerate(r.spans):
            s_scores = ls[a : b + 1]
            e_scores = le[a : b + 1]
            # best s <= e: running max of start scores up to each end position
            run = np.maximum.accumulate(s_scores)
            total = run + e_scores
            e = int(total.argmax())
            s = int(np.flatnonzero(s_scores[: e + 1] == run[e])[0])
            score = float(total[e])
            if score > best[0]:
                best = (score, t, (s, e) == (0, b - a))
        preds.append(Prediction(best[1], float(np.exp(best[0])), bool(best[2])))
    return preds


def render_config_dict(config: RenderConfig) -> dict[str, object]:
    """JSON-ready form of a :class:`RenderConfig`."""
    return asdict(config)
