"""Rendering and decoding for the span rephrase detector, without torch.

Everything that turns :class:`~offline.detector.examples.DetectorExample` objects into token ids
(:class:`Renderer`, :func:`pad_batch`) and span logits into predictions (:func:`decode`) lives
here, shared by training, torch inference and ONNX inference; the input format is described in
:mod:`offline.detector.span_model`. This module imports numpy and the ``tokenizers`` library
only, so ONNX inference (the nightly job, each Spark executor) never loads torch or
transformers (~4 s of imports per process).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offline.detector.examples import NO_REPHRASE, DetectorExample, Prediction

N_GAP_BUCKETS = 5
GAP_TOKENS = [f"[GAP{k}]" for k in range(N_GAP_BUCKETS)]
SPECIAL_TOKENS = [*GAP_TOKENS, "[BARGE]", "[RESP]", "[UTT]"]
CLS_POSITION = 0
CACHE_SIZE = 500_000
_APOS = re.compile(r"['’]")
_PUNCT = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class RenderConfig:
    """How examples become token ids.

    Attributes:
        gap_edges_s: upper edges (seconds, inclusive) of the gap buckets ``[GAP0]..[GAP3]``;
            larger gaps are ``[GAP4]``. Exactly ``N_GAP_BUCKETS - 1`` increasing values.
        max_current_tokens: wordpieces kept of the current utterance.
        max_utterance_tokens: wordpieces kept of each context utterance (so also the longest
            span the decoder can return).
        max_response_tokens: wordpieces kept of each system response after
            :func:`short_response` (0 = no responses).
        max_length: total sequence cap in tokens. When over it, system responses are cut first
            (oldest turn first), then the oldest turns are dropped.
    """

    gap_edges_s: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)
    max_current_tokens: int = 32
    max_utterance_tokens: int = 24
    max_response_tokens: int = 2
    max_length: int = 128

    def __post_init__(self) -> None:
        edges = self.gap_edges_s
        if len(edges) != N_GAP_BUCKETS - 1 or list(edges) != sorted(edges):
            raise ValueError(f"gap_edges_s needs {N_GAP_BUCKETS - 1} increasing values: {edges}")
        if self.max_length < self.max_current_tokens + 2 + 4:
            raise ValueError("max_length leaves no room for a context turn")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RenderConfig:
        """Inverse of :meth:`to_dict` (JSON lists back to tuples)."""
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
        input_ids: ``(seq,)`` token ids; ``token_type_ids`` has the same length.
        spans: per context turn that fitted (newest first, so index = context index) the
            inclusive ``(start, end)`` token positions of its utterance.
        gold: gold ``(start, end)``; ``(0, 0)`` = [CLS] = no rephrase.
        dropped_turns: context turns left out to respect ``max_length``.
        gold_dropped: the example's label points at a turn that was dropped (its gold is then
            ``(0, 0)``, which would be a wrong target; training skips such examples).
    """

    input_ids: list[int]
    token_type_ids: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    gold: tuple[int, int] = (CLS_POSITION, CLS_POSITION)
    dropped_turns: int = 0
    gold_dropped: bool = False

    def allowed(self) -> np.ndarray:
        """``(seq,)`` bool: positions a span may start or end at ([CLS] + utterance tokens)."""
        mask = np.zeros(len(self.input_ids), dtype=bool)
        mask[CLS_POSITION] = True
        for a, b in self.spans:
            mask[a : b + 1] = True
        return mask


def short_response(response: str) -> str:
    """The system response as rendered: lower case, punctuation removed (so the first few
    wordpieces are words, e.g. ``"Sorry, I didn't get that."`` -> ``"sorry i didnt get that"``).
    """
    return _SPACES.sub(" ", _PUNCT.sub(" ", _APOS.sub("", response.lower()))).strip()


class WordpieceTokenizer(Protocol):
    """What :class:`Renderer` needs of a tokenizer: transformers' fast tokenizers
    (training, :func:`offline.detector.span_model.load_tokenizer`) and
    :class:`FastWordpiece` (inference) both provide it."""

    cls_token: Any
    sep_token: Any
    unk_token: Any
    pad_token: Any

    def get_vocab(self) -> dict[str, int]: ...

    def __call__(self, texts: list[str], add_special_tokens: bool = ...) -> Any: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> Any: ...


class FastWordpiece:
    """An artifact's saved tokenizer through the ``tokenizers`` library (Rust), with the slice
    of transformers' tokenizer API that :class:`Renderer` uses. transformers' fast tokenizer
    wraps the same ``tokenizer.json``, so the ids are identical
    (``tests/test_span_detector.py::test_fast_wordpiece_matches_transformers``).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in ``path``.
    """

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self._tok = Tokenizer.from_file(str(file))
        # a saved tokenizer.json may carry padding/truncation (all-MiniLM-L6-v2's pads to 128);
        # transformers turns both off for a call without padding/truncation, so do the same
        self._tok.no_padding()
        self._tok.no_truncation()
        cfg_file = Path(path) / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.cls_token = cfg.get("cls_token", "[CLS]")
        self.sep_token = cfg.get("sep_token", "[SEP]")
        self.unk_token = cfg.get("unk_token", "[UNK]")
        self.pad_token = cfg.get("pad_token", "[PAD]")

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """``{"input_ids": [[id, ...], ...]}`` for ``texts`` (one batched Rust call)."""
        enc = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in enc]}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Token strings of ``ids``."""
        return [str(self._tok.id_to_token(i)) for i in ids]


class Renderer:
    """Renders :class:`DetectorExample` objects (the one function shared by all backends).

    Args:
        tokenizer: the BERT wordpiece tokenizer from :func:`load_tokenizer`.
        config: :class:`RenderConfig`.

    Raises:
        ValueError: the tokenizer lacks the special tokens.
    """

    def __init__(self, tokenizer: WordpieceTokenizer, config: RenderConfig) -> None:
        self.tok = tokenizer
        self.config = config
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; use load_tokenizer()")
        self.special = {t: int(vocab[t]) for t in SPECIAL_TOKENS}
        self.cls = int(vocab[str(tokenizer.cls_token)])
        self.sep = int(vocab[str(tokenizer.sep_token)])
        self.unk = int(vocab[str(tokenizer.unk_token)])
        self.pad = int(vocab[str(tokenizer.pad_token)])
        self._cache: dict[str, tuple[int, ...]] = {}

    def prefetch(self, texts: Iterable[str]) -> None:
        """Tokenize the not-yet-cached ``texts`` in one batched tokenizer call."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if not todo:
            return
        if len(self._cache) + len(todo) > CACHE_SIZE:
            self._cache.clear()
        encoded = self.tok(todo, add_special_tokens=False)["input_ids"]
        for text, ids in zip(todo, encoded, strict=True):
            self._cache[text] = tuple(int(i) for i in ids)

    def _pieces(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            self.prefetch([text])
            ids = self._cache[text]
        return ids

    def gap_token(self, gap_s: float) -> int:
        """Id of the gap bucket token for a gap of ``gap_s`` seconds."""
        for k, edge in enumerate(self.config.gap_edges_s):
            if gap_s <= edge:
                return self.special[GAP_TOKENS[k]]
        return self.special[GAP_TOKENS[-1]]

    def render(self, ex: DetectorExample) -> Rendered:
        """Token ids, type ids, utterance spans and the gold span of one example.

        Truncation: pieces are capped first (``max_current_tokens`` etc.); if the sequence is
        still longer than ``max_length``, the oldest turns' responses are cut first, then the
        oldest turns are dropped (the newest turn is the most likely to be rephrased).
        """
        c = self.config
        head = [self.cls, *self._pieces(ex.current)[: c.max_current_tokens], self.sep]
        signals: list[list[int]] = []
        responses: list[list[int]] = []
        utterances: list[list[int]] = []
        for turn in ex.context:
            sig = [self.gap_token(turn.gap_s)]
            if turn.barge_in:
                sig.append(self.special["[BARGE]"])
            signals.append(sig)
            resp = list(self._pieces(short_response(turn.response))[: c.max_response_tokens])
            responses.append([self.special["[RESP]"], *resp] if resp else [])
            utterances.append(list(self._pieces(turn.text)[: c.max_utterance_tokens]) or [self.unk])
        # fixed cost of turn k without its response: signals + [UTT] + utterance + [SEP]
        fixed = [len(s) + 1 + len(u) + 1 for s, u in zip(signals, utterances, strict=True)]
        budget = c.max_length - len(head)
        keep = 0
        while keep < len(fixed) and sum(fixed[: keep + 1]) <= budget:
            keep += 1
        budget -= sum(fixed[:keep])
        with_response = [False] * keep
        for k in range(keep):  # newest first keep their responses
            if responses[k] and len(responses[k]) <= budget:
                with_response[k] = True
                budget -= len(responses[k])
        ids = list(head)
        spans: list[tuple[int, int]] = []
        for k in range(keep):
            ids += signals[k]
            if with_response[k]:
                ids += responses[k]
            ids.append(self.special["[UTT]"])
            start = len(ids)
            ids += utterances[k]
            spans.append((start, len(ids) - 1))
            ids.append(self.sep)
        types = [0] * len(head) + [1] * (len(ids) - len(head))
        gold = (CLS_POSITION, CLS_POSITION)
        gold_dropped = False
        if ex.label >= 0:
            if ex.label < keep:
                gold = spans[ex.label]
            else:
                gold_dropped = True
        return Rendered(ids, types, spans, gold, len(ex.context) - keep, gold_dropped)

    def render_many(self, examples: Sequence[DetectorExample]) -> list[Rendered]:
        """:meth:`render` over a sequence (texts tokenized in one batched call first)."""
        texts: list[str] = []
        for ex in examples:
            texts.append(ex.current)
            for turn in ex.context:
                texts += (turn.text, short_response(turn.response))
        self.prefetch(texts)
        return [self.render(ex) for ex in examples]


def pad_batch(rendered: Sequence[Rendered], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Dynamic padding to the longest example of the batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids``: ``(batch, seq) int64``;
        ``allowed``: ``(batch, seq) bool`` (positions a span may use);
        ``gold``: ``(batch, 2) int64`` gold (start, end) positions.

    Raises:
        ValueError: empty batch.
    """
    if not rendered:
        raise ValueError("empty batch")
    n, length = len(rendered), max(len(r.input_ids) for r in rendered)
    out = {
        "input_ids": np.full((n, length), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((n, length), dtype=np.int64),
        "token_type_ids": np.zeros((n, length), dtype=np.int64),
        "allowed": np.zeros((n, length), dtype=bool),
        "gold": np.array([r.gold for r in rendered], dtype=np.int64).reshape(n, 2),
    }
    for i, r in enumerate(rendered):
        k = len(r.input_ids)
        out["input_ids"][i, :k] = r.input_ids
        out["attention_mask"][i, :k] = 1
        out["token_type_ids"][i, :k] = r.token_type_ids
        out["allowed"][i, :k] = r.allowed()
    return out


def encode_batch(
    renderer: Renderer, examples: Sequence[DetectorExample]
) -> tuple[list[Rendered], dict[str, np.ndarray]]:
    """Render and pad a batch: the single path from examples to model inputs.

    Returns:
        The rendered examples and the arrays of :func:`pad_batch`.
    """
    rendered = renderer.render_many(examples)
    return rendered, pad_batch(rendered, renderer.pad)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MODEL_OUTPUTS = ("start_logits", "end_logits")


def _masked_log_softmax(x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the allowed positions; ``-inf`` elsewhere. ``(batch, seq)``."""
    z = np.where(allowed, x.astype(np.float64), -np.inf)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


@functools.lru_cache(maxsize=256)
def _span_mask(n: int, max_span_tokens: int | None) -> np.ndarray:
    """``(n, n)`` bool: ``(s, e)`` with ``0 <= e - s < max_span_tokens``."""
    offs = np.arange(n)[None, :] - np.arange(n)[:, None]
    ok = offs >= 0
    if max_span_tokens is not None:
        ok &= offs < max_span_tokens
    return ok


@dataclass(frozen=True)
class DecodedSpan:
    """A decoded answer: context index (-1 = no rephrase), token span and its probability.

    Attributes:
        label: context index of the chosen turn, or -1.
        start, end: inclusive token positions (``(0, 0)`` = [CLS]).
        score: ``P_start(start) * P_end(end)`` under the masked softmaxes, in [0, 1].
        exact: the span is exactly that turn's utterance (True for -1).
    """

    label: int
    start: int
    end: int
    score: float
    exact: bool


def decode_spans(
    start: np.ndarray,
    end: np.ndarray,
    rendered: Sequence[Rendered],
    max_span_tokens: int | None = None,
    null_margin: float = 0.0,
) -> list[DecodedSpan]:
    """Best span per example: [CLS] ("no rephrase") versus spans inside ONE context utterance.

    Start and end logits are softmax-normalised over the allowed positions ([CLS] and the
    context-utterance tokens); a span ``(s, e)`` scores ``log P_start(s) + log P_end(e)`` and
    must satisfy ``a <= s <= e <= b`` for one turn's utterance ``(a, b)`` and
    ``e - s + 1 <= max_span_tokens``. "No rephrase" is ``s = e = 0``; a span wins only if it
    beats it by more than ``null_margin`` (nats), as in BERT's SQuAD 2.0 decoding (Devlin et
    al., 2019).

    Args:
        start, end: ``(batch, seq) float32`` logits (positions beyond each example ignored).
        rendered: the rendered examples of the batch, same order.
        max_span_tokens: longest span (tokens); ``None`` = no cap beyond the utterance.
        null_margin: how much (nats) a span must beat [CLS] by.

    Returns:
        One :class:`DecodedSpan` per example.

    Raises:
        ValueError: the logits have fewer rows than ``rendered`` or are shorter than an example.
    """
    n_rows, seq = start.shape
    if n_rows < len(rendered) or end.shape != start.shape:
        raise ValueError(f"logits {start.shape}/{end.shape} for {len(rendered)} examples")
    allowed = np.zeros((len(rendered), seq), dtype=bool)
    for i, r in enumerate(rendered):
        if len(r.input_ids) > seq:
            raise ValueError(f"example {i} has {len(r.input_ids)} tokens, logits only {seq}")
        allowed[i, CLS_POSITION] = True
        for a, b in r.spans:
            allowed[i, a : b + 1] = True
    ls = _masked_log_softmax(start[: len(rendered)], allowed)
    le = _masked_log_softmax(end[: len(rendered)], allowed)
    out = []
    for i, r in enumerate(rendered):
        null = float(ls[i, CLS_POSITION] + le[i, CLS_POSITION])
        best = DecodedSpan(NO_REPHRASE, CLS_POSITION, CLS_POSITION, null + null_margin, True)
        for t, (a, b) in enumerate(r.spans):
            n = b - a + 1
            pair = ls[i, a : b + 1, None] + le[i, None, a : b + 1]  # (s, e) inside the turn
            grid = np.where(_span_mask(n, max_span_tokens), pair, -np.inf)
            s, e = divmod(int(grid.argmax()), n)
            score = float(grid[s, e])
            if score > best.score:
                best = DecodedSpan(t, a + s, a + e, score, s == 0 and e == n - 1)
        if best.label == NO_REPHRASE:
            best = replace(best, score=null)
        out.append(replace(best, score=float(np.exp(best.score))))
    return out


def decode(
    start: np.ndarray,
    end: np.ndarray,
    rendered: Sequence[Rendered],
    max_span_tokens: int | None = None,
    null_margin: float = 0.0,
) -> list[Prediction]:
    """:func:`decode_spans` as :class:`~offline.detector.examples.Prediction` objects.

    ``label`` = context index of the chosen turn (-1 = no rephrase); ``score`` = the span
    probability ``P_start(s) * P_end(e)`` (for -1, of [CLS]); ``exact_span`` = the span is
    exactly that turn's utterance.
    """
    spans = decode_spans(start, end, rendered, max_span_tokens, null_margin)
    return [Prediction(d.label, d.score, d.exact) for d in spans]


def tokens_of_span(renderer: Renderer, rendered: Rendered, span: tuple[int, int]) -> list[str]:
    """The wordpieces at an inclusive ``(start, end)`` span (for tests and debugging)."""
    a, b = span
    out = renderer.tok.convert_ids_to_tokens(rendered.input_ids[a : b + 1])
    return [str(t) for t in out] if isinstance(out, list) else [str(out)]
