"""The contextual span rephrase detector (ContReph-style): rendering, model, loss, decoding.

Task and input follow Wang et al., EMNLP 2021, "Contextual Rephrase Detection for Reducing
Friction in Dialogue Systems"::

    [CLS] current [SEP] [GAPk] [BARGE]? [RESP] r_1 .. r_n [UTT] utterance_0 [SEP]
                        [GAPk] ...                        [UTT] utterance_1 [SEP] ...

The context lists the earlier turns **newest first** (``utterance_0`` is the turn just before
the current one). Each turn carries its interaction signals as added special tokens: a
time-gap bucket ``[GAP0]..[GAP4]`` (edges in :class:`RenderConfig`), ``[BARGE]`` when the user
interrupted that turn's response, and the first few wordpieces (default 2, punctuation removed:
``sorry i``, ``okay email``) of the system response after a ``[RESP]`` marker. ``[UTT]`` marks
where the utterance starts (the truncated response has no natural end). Turns are terminated
by BERT's own ``[SEP]`` rather than a new ``[TURN]`` token: its embedding is pre-trained as a
segment boundary, while a fresh token would start from an untrained embedding learned from
little data; each turn also starts with its own ``[GAPk]``, which already marks a turn start.
``token_type_ids`` are 0 for ``[CLS] current [SEP]`` and 1 for the context. Over
``max_length`` tokens, responses are cut first (oldest turn first), then the oldest turns are
dropped.

Model: ``BertModel`` (all-MiniLM-L6-v2) + a start and an end head, one ``Linear(hidden, 1)``
each, over the last layer's token embeddings, as in BERT extractive QA (Devlin et al., 2019,
section 4.2/4.3). The answer is the rephrased turn's utterance span, or ``[CLS]`` (position 0)
for "no rephrase" (the SQuAD 2.0 treatment of unanswerable questions). Only ``[CLS]`` and
context-utterance tokens may be chosen; the mask is applied outside the network so the ONNX
graph stays a plain encoder + heads.

Everything that turns examples into tensors (:class:`Renderer` and :func:`encode_batch`) and
tensors into predictions (:func:`decode`) lives in the torch-free
:mod:`offline.detector.render` (re-exported here) and is shared by training, torch inference
and ONNX inference; this module adds the torch model, its loss and the transformers tokenizer
used in training.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, BertPreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from offline.detector.render import (  # re-exported: the torch-free half of this module
    CACHE_SIZE,
    CLS_POSITION,
    GAP_TOKENS,
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    N_GAP_BUCKETS,
    SPECIAL_TOKENS,
    DecodedSpan,
    FastWordpiece,
    RenderConfig,
    Rendered,
    Renderer,
    decode,
    decode_spans,
    encode_batch,
    pad_batch,
    short_response,
    tokens_of_span,
)

__all__ = [
    "CACHE_SIZE", "CLS_POSITION", "GAP_TOKENS", "MODEL_INPUTS", "MODEL_OUTPUTS",
    "N_GAP_BUCKETS", "SPECIAL_TOKENS", "DecodedSpan", "FastWordpiece", "RenderConfig",
    "Rendered", "Renderer", "SpanRephraseModel", "decode", "decode_spans", "encode_batch",
    "load_span_model", "load_tokenizer", "pad_batch", "short_response",
    "span_distillation_loss", "span_loss", "tokens_of_span", "truncate_layers",
]  # fmt: skip


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The wordpiece tokenizer at ``path`` with :data:`SPECIAL_TOKENS` added (offline).

    Raises:
        OSError: no tokenizer files at ``path``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


class SpanRephraseModel(BertPreTrainedModel):
    """``BertModel`` + start/end heads (one ``Linear(hidden, 1)`` each) over the last layer.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (safetensors); loading from
    the plain all-MiniLM-L6-v2 checkpoint initialises the heads (transformers reports them as
    newly initialised) and skips the unused pooler.
    """

    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.start_head = nn.Linear(config.hidden_size, 1)
        self.end_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Span logits.

        Args:
            input_ids, attention_mask, token_type_ids: ``(batch, seq) int64``.

        Returns:
            ``(start_logits, end_logits)``, each ``(batch, seq) float32`` (unmasked).
        """
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.start_head(hidden).squeeze(-1), self.end_head(hidden).squeeze(-1)


def load_span_model(path: Path, vocab_size: int | None = None) -> SpanRephraseModel:
    """A :class:`SpanRephraseModel` from ``path`` (a trained artifact or the base MiniLM).

    Args:
        path: folder with ``config.json`` and ``model.safetensors``.
        vocab_size: resize the token embeddings to this size (the tokenizer's length, after
            adding :data:`SPECIAL_TOKENS` to the base tokenizer); ``None`` keeps the checkpoint's.

    Raises:
        OSError: no model at ``path``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base checkpoint's new heads are expected
    try:
        model = SpanRephraseModel.from_pretrained(str(path), local_files_only=True)
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            # new rows drawn from the old embeddings' mean and covariance (seeded by the caller)
            model.resize_token_embeddings(vocab_size)
    finally:
        hf_logging.set_verbosity(level)
    model.eval()
    return model


def truncate_layers(model: SpanRephraseModel, layers: int) -> None:
    """Keep the first ``layers`` transformer layers of ``model`` (in place), before fine-tuning.

    Bottom-layer truncation of a pre-trained encoder (Sajjad et al., "On the effect of dropping
    layers of pre-trained transformer models", 2023: dropping top layers keeps most of
    fine-tuned quality); the saved ``config.json`` records the new depth, so ONNX export and
    loading need nothing else.

    Raises:
        ValueError: ``layers`` not in ``1..num_hidden_layers``.
    """
    have = model.config.num_hidden_layers
    if not 1 <= layers <= have:
        raise ValueError(f"layers must be in 1..{have}, got {layers}")
    model.bert.encoder.layer = nn.ModuleList(list(model.bert.encoder.layer)[:layers])
    model.config.num_hidden_layers = layers


def span_loss(
    start: torch.Tensor, end: torch.Tensor, allowed: torch.Tensor, gold: torch.Tensor
) -> torch.Tensor:
    """``CE(start) + CE(end)`` over allowed positions, averaged over the batch.

    Args:
        start, end: ``(batch, seq) float32`` logits.
        allowed: ``(batch, seq) bool`` positions a span may use.
        gold: ``(batch, 2) int64`` gold (start, end) positions.

    Returns:
        Scalar loss tensor (nats).
    """
    neg = torch.finfo(start.dtype).min / 2
    ce = nn.functional.cross_entropy
    start = start.masked_fill(~allowed, neg)
    end = end.masked_fill(~allowed, neg)
    return ce(start, gold[:, 0]) + ce(end, gold[:, 1])


def span_distillation_loss(
    start: torch.Tensor,
    end: torch.Tensor,
    teacher_start: torch.Tensor,
    teacher_end: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Knowledge distillation of the span distributions (Hinton, Vinyals & Dean, "Distilling
    the Knowledge in a Neural Network", 2015; per start/end distribution as in DistilBERT's
    SQuAD fine-tuning, Sanh et al. 2019): ``T² · (KL(p_T ‖ p_S)`` of the start positions
    ``+`` the same for the end positions), each a softmax at temperature ``T`` over the allowed
    positions only, averaged over the batch. ``T²`` keeps the gradient scale comparable to
    :func:`span_loss` (Hinton et al., section 2).

    Args:
        start, end: ``(batch, seq) float32`` student logits.
        teacher_start, teacher_end: ``(batch, seq) float32`` teacher logits (no gradient).
        allowed: ``(batch, seq) bool`` positions a span may use.
        temperature: softmax temperature ``T`` (> 0).

    Returns:
        Scalar loss tensor (nats); 0 when the student's logits equal the teacher's on the
        allowed positions.

    Raises:
        ValueError: ``temperature`` <= 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kl = nn.functional.kl_div
    log_softmax = nn.functional.log_softmax
    total = start.new_zeros(())
    for student, teacher in ((start, teacher_start), (end, teacher_end)):
        # -1e4 / T still underflows to probability 0 and keeps (target - input) finite
        s = student.masked_fill(~allowed, -1e4) / temperature
        t = teacher.masked_fill(~allowed, -1e4) / temperature
        total = total + kl(
            log_softmax(s, dim=-1), log_softmax(t, dim=-1), reduction="batchmean", log_target=True
        )
    return total * temperature**2
