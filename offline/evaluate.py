"""Replay evaluation: send held-out turn logs through a rewrite function, score against truth.

Every turn of the logs is replayed in time order as a :class:`rewrite.types.RewriteRequest`
with the user's recent turns as session context, and the answer is compared with what the
user really meant (the truth file's ``intended_text``, e.g. DSTC2's human transcription) by
word error rate. Both sides are normalized with :func:`rewrite.normalize.normalize_utterance`
(apostrophes dropped) first. WER comes from ``jiwer`` (``jiwer.process_words``):
(substitutions + deletions + insertions) / reference words.

A rewritten turn **wins** when its WER is lower than the original utterance's, **loses** when
higher, **ties** otherwise; the **win/loss ratio** is wins / losses (DESIGN.md, "Measures").
The module knows nothing about gRPC: ``rewrite_fn`` may be an in-process
``Rewriter.rewrite`` or a gRPC client's method.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import jiwer
from tqdm import tqdm

from offline.schema import TurnLog, read_turn_logs
from rewrite.config import Settings
from rewrite.normalize import normalize_utterance
from rewrite.rewriter import Rewriter
from rewrite.types import ContextTurn, RewriteRequest, RewriteResult

log = logging.getLogger(__name__)

Outcome = Literal["win", "loss", "tie"]
RewriteFn = Callable[[RewriteRequest], RewriteResult]
SuccessFn = Callable[[str, str], bool]
"""``success_fn(text, intended_text)``: would the assistant do what the user meant on ``text``?"""

CONTEXT_WINDOW_S = 300.0
MAX_CONTEXT_TURNS = 5


def load_truth(path: Path) -> dict[str, str]:
    """Read a truth file: JSONL rows with ``turn_id`` and ``intended_text``.

    Other fields (``semantics``, ``call_id``, ...) are ignored. Malformed lines are skipped
    with a warning; a later row for the same ``turn_id`` replaces an earlier one.

    Args:
        path: truth JSONL, e.g. ``truth.jsonl`` written by :func:`offline.importers.import_dstc2`.

    Returns:
        ``{turn_id: intended_text}``.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"truth file not found: {path}")
    truth: dict[str, str] = {}
    bad = 0
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            tid = row.get("turn_id") if isinstance(row, dict) else None
            text = row.get("intended_text") if isinstance(row, dict) else None
            if not isinstance(tid, str) or not tid or not isinstance(text, str):
                bad += 1
                if bad <= 5:
                    log.warning(
                        "%s:%d: not a truth row (turn_id, intended_text); skipped", path, line_no
                    )
                continue
            truth[tid] = text
    if bad:
        log.warning("%s: %d malformed truth line(s) skipped", path, bad)
    return truth


@dataclass
class ReplayReport:
    """Result of :func:`replay_evaluate`. All WERs are fractions (0.25 = 25%).

    Attributes:
        turns: turns scored (valid turn-log rows that have truth).
        turns_in: valid turn-log rows read (scored + ``missing_truth``).
        quarantined: turn-log rows that failed validation and were not replayed.
        missing_truth: valid turns without a truth row: not scored, but still session context.
        errors: scored turns where ``rewrite_fn`` raised; counted as pass-through.
        rewritten: scored turns where the result says ``rewritten``.
        wins, losses, ties: outcomes of the rewritten turns (WER after <, >, == WER before).
        win_loss_ratio: wins / losses; when losses == 0: ``float(wins)`` (0.0 without wins).
        win_loss_ratio_str: the same as text, ``"8.5:1"``, ``"12:1"`` or ``"7:0"``.
        coverage: rewritten / turns (the trigger rate on this replay; 0.0 without turns).
        wer_before: corpus WER of the original utterances over all scored turns.
        wer_after: corpus WER after rewriting (the original where not rewritten).
        by_source: scored turns per ``result.source`` (``"none"`` = pass-through, ``"error"`` =
            ``rewrite_fn`` raised).
        outcomes_by_source: ``{source: {"win": n, "loss": n, "tie": n}}`` of rewritten turns.
        examples: rewritten turns to look at (dicts: ``turn_id``, ``user_id``, ``utterance``,
            ``rewrite``, ``intended``, ``outcome``, ``source``, ``confidence``,
            ``wer_before``, ``wer_after``).
        task_wins, task_losses, task_win_loss_ratio(_str): only with a ``success_fn``: the
            DESIGN.md definition — rewrites that turn a failing request into a successful
            one vs. rewrites that break a working one (None without ``success_fn``).
    """

    turns: int = 0
    turns_in: int = 0
    quarantined: int = 0
    missing_truth: int = 0
    errors: int = 0
    rewritten: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    win_loss_ratio: float = 0.0
    win_loss_ratio_str: str = "0:0"
    coverage: float = 0.0
    wer_before: float = 0.0
    wer_after: float = 0.0
    by_source: dict[str, int] = field(default_factory=dict)
    outcomes_by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    task_wins: int | None = None
    task_losses: int | None = None
    task_win_loss_ratio: float | None = None
    task_win_loss_ratio_str: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)


def win_loss(wins: int, losses: int) -> tuple[float, str]:
    """Win/loss ratio as a number and as text.

    Returns:
        ``(wins / losses, "8.5:1")`` when ``losses > 0``; else ``(float(wins), f"{wins}:0")``
        (``(0.0, "0:0")`` without wins). The text keeps one decimal, dropping ``.0``.
    """
    if losses == 0:
        return float(wins), f"{wins}:0"
    ratio = wins / losses
    text = f"{ratio:.1f}".removesuffix(".0")
    return ratio, f"{text}:1"


@dataclass
class _Errors:
    """Word-level edit counts against one reference."""

    edits: int
    ref_words: int

    @property
    def wer(self) -> float:
        if self.ref_words == 0:
            return 0.0 if self.edits == 0 else float(self.edits)
        return self.edits / self.ref_words


def _wer_form(text: str) -> str:
    """Scoring form: :func:`normalize_utterance` with apostrophes dropped ("i'm" → "im").

    DSTC2 transcriptions are written without apostrophes while its ASR emits them, so
    keeping them would count every "i'm"/"im" as an error on both sides of the comparison.
    """
    return normalize_utterance(text).replace("'", "")


def _word_errors(reference: str, hypothesis: str) -> _Errors:
    """Edit counts of normalized ``hypothesis`` against normalized ``reference`` (jiwer).

    An empty reference has no words: its error count is the hypothesis length (insertions).
    """
    ref, hyp = _wer_form(reference), _wer_form(hypothesis)
    if not ref:
        return _Errors(len(hyp.split()), 0)
    if not hyp:
        n = len(ref.split())
        return _Errors(n, n)
    out = jiwer.process_words(ref, hyp)
    edits = out.substitutions + out.deletions + out.insertions
    return _Errors(int(edits), int(out.hits + out.substitutions + out.deletions))


def _outcome(before: _Errors, after: _Errors) -> Outcome:
    # Same reference on both sides, so comparing edit counts == comparing WERs.
    if after.edits < before.edits:
        return "win"
    if after.edits > before.edits:
        return "loss"
    return "tie"


def _context(
    history: deque[TurnLog], now: TurnLog, window_s: float, max_turns: int
) -> tuple[ContextTurn, ...]:
    """The user's earlier turns within ``window_s`` seconds of ``now``, oldest first."""
    ctx: list[ContextTurn] = []
    for prev in history:
        gap = (now.timestamp - prev.timestamp).total_seconds()
        if 0.0 <= gap <= window_s:
            ctx.append(
                ContextTurn(
                    utterance=prev.utterance,
                    response=prev.response or "",
                    seconds_ago=gap,
                    barge_in=bool(prev.barge_in),
                )
            )
    return tuple(ctx[-max_turns:]) if max_turns > 0 else ()


def _pick_examples(rows: list[tuple[Outcome, dict[str, Any]]], n: int) -> list[dict[str, Any]]:
    """First wins and first losses (half each, the other side fills a shortfall), then the
    first ties; kept in replay order."""
    if n <= 0:
        return []
    idx = {o: [i for i, (oc, _) in enumerate(rows) if oc == o] for o in ("win", "loss", "tie")}
    n_win = min(len(idx["win"]), max(n - len(idx["loss"]), (n + 1) // 2))
    n_loss = min(len(idx["loss"]), n - n_win)
    n_tie = min(len(idx["tie"]), n - n_win - n_loss)
    chosen = sorted(idx["win"][:n_win] + idx["loss"][:n_loss] + idx["tie"][:n_tie])
    return [rows[i][1] for i in chosen]


def replay_evaluate(
    logs: list[Path],
    truth: Path,
    rewrite_fn: RewriteFn,
    progress: bool = False,
    examples: int = 20,
    context_window_s: float = CONTEXT_WINDOW_S,
    max_context_turns: int = MAX_CONTEXT_TURNS,
    success_fn: SuccessFn | None = None,
) -> ReplayReport:
    """Replay held-out turn logs through ``rewrite_fn`` and score the rewrites by WER.

    Turns are replayed in timestamp order (ties by ``turn_id``), each as
    ``RewriteRequest(utterance, user_id, context, device_id, locale, request_id=turn_id,
    device_type)``.
    The context holds the same user's earlier turns at most ``context_window_s`` seconds
    before this one, oldest first, at most ``max_context_turns`` (the most recent ones), as
    :class:`rewrite.types.ContextTurn` (logged utterance, response, ``seconds_ago`` in seconds,
    ``barge_in``; unknown barge-in counts as ``False``). Other users' turns never appear.

    Turns without a truth row are counted (``missing_truth``), not sent and not scored, but
    remain context for the user's later turns. If ``rewrite_fn`` raises, the turn counts as an
    error and a pass-through. Per turn, WER(original) and WER(rewrite) are computed against the
    normalized ``intended_text``; ``wer_before``/``wer_after`` are corpus-level (total edits /
    total reference words over all scored turns).

    Args:
        logs: turn-log files or directories (JSONL / Parquet, read with
            :func:`offline.schema.read_turn_logs`); invalid rows are quarantined (counted in
            ``quarantined``), not replayed.
        truth: truth JSONL (``turn_id``, ``intended_text``), see :func:`load_truth`.
        rewrite_fn: the system under test, e.g. ``Rewriter.rewrite`` or a gRPC client method.
        progress: show a tqdm progress bar.
        examples: how many rewritten turns to keep in ``examples`` (first wins and losses).
        context_window_s: context look-back, seconds (DESIGN: the 300 s session gap).
        max_context_turns: most context turns sent per request.
        success_fn: optional task-success oracle ``(text, intended_text) -> bool`` (e.g. the
            simulator's NLU); adds the task win/loss counts.

    Returns:
        :class:`ReplayReport`.

    Raises:
        FileNotFoundError: a log path or the truth file does not exist.
    """
    intended = load_truth(truth)
    read = read_turn_logs(logs)
    if read.quarantined:
        log.warning("%d turn-log row(s) quarantined, not replayed", len(read.quarantined))
    turns = sorted(read.turns, key=lambda t: (t.timestamp, t.turn_id))

    rep = ReplayReport(turns_in=len(turns), quarantined=len(read.quarantined))
    # Turns arrive in time order, so the in-window turns are a suffix of each user's history:
    # keeping the last ``max_context_turns`` is enough.
    keep = max(0, max_context_turns)
    history: dict[str, deque[TurnLog]] = defaultdict(lambda: deque(maxlen=keep))
    by_source: Counter[str] = Counter()
    by_source_outcome: dict[str, Counter[str]] = defaultdict(Counter)
    scored: list[tuple[Outcome, dict[str, Any]]] = []
    edits_before = edits_after = ref_words = 0
    task_wins = task_losses = 0

    for turn in tqdm(turns, desc="replay", unit="turn", disable=not progress):
        hist = history[turn.user_id]
        ref = intended.get(turn.turn_id)
        if ref is None:
            rep.missing_truth += 1
            hist.append(turn)
            continue
        request = RewriteRequest(
            utterance=turn.utterance,
            user_id=turn.user_id,
            context=_context(hist, turn, context_window_s, max_context_turns),
            device_id=turn.device_id or "",
            locale=turn.locale or "",
            request_id=turn.turn_id,
            device_type=turn.device_type or "",
        )
        hist.append(turn)
        rep.turns += 1
        before = _word_errors(ref, turn.utterance)
        edits_before += before.edits
        ref_words += before.ref_words
        try:
            result: RewriteResult | None = rewrite_fn(request)
        except Exception as e:  # the system under test failing is data, not a crash
            rep.errors += 1
            if rep.errors <= 5:
                log.warning("rewrite_fn failed on %s: %s", turn.turn_id, e)
            result = None
        if result is None or not result.rewritten:
            edits_after += before.edits
            by_source[result.source if result is not None else "error"] += 1
            continue
        by_source[result.source] += 1
        after = _word_errors(ref, result.rewrite)
        edits_after += after.edits
        rep.rewritten += 1
        outcome = _outcome(before, after)
        if success_fn is not None:
            ok_before, ok_after = success_fn(turn.utterance, ref), success_fn(result.rewrite, ref)
            task_wins += ok_after and not ok_before
            task_losses += ok_before and not ok_after
        by_source_outcome[result.source][outcome] += 1
        scored.append(
            (
                outcome,
                {
                    "turn_id": turn.turn_id,
                    "user_id": turn.user_id,
                    "utterance": turn.utterance,
                    "rewrite": result.rewrite,
                    "intended": ref,
                    "outcome": outcome,
                    "source": result.source,
                    "confidence": result.confidence,
                    "wer_before": before.wer,
                    "wer_after": after.wer,
                },
            )
        )

    counts = Counter(o for o, _ in scored)
    rep.wins, rep.losses, rep.ties = counts["win"], counts["loss"], counts["tie"]
    rep.win_loss_ratio, rep.win_loss_ratio_str = win_loss(rep.wins, rep.losses)
    rep.coverage = rep.rewritten / rep.turns if rep.turns else 0.0
    rep.wer_before = edits_before / ref_words if ref_words else 0.0
    rep.wer_after = edits_after / ref_words if ref_words else 0.0
    rep.by_source = dict(sorted(by_source.items()))
    rep.outcomes_by_source = {
        s: {o: c[o] for o in ("win", "loss", "tie")} for s, c in sorted(by_source_outcome.items())
    }
    rep.examples = _pick_examples(scored, examples)
    if success_fn is not None:
        rep.task_wins, rep.task_losses = task_wins, task_losses
        rep.task_win_loss_ratio, rep.task_win_loss_ratio_str = win_loss(task_wins, task_losses)
    if rep.errors:
        log.warning("rewrite_fn raised on %d of %d turns", rep.errors, rep.turns)
    log.info(
        "replay: %d turns, %d rewritten (coverage %.3f), wins %d / losses %d / ties %d (%s), "
        "WER %.4f -> %.4f, %d without truth",
        rep.turns,
        rep.rewritten,
        rep.coverage,
        rep.wins,
        rep.losses,
        rep.ties,
        rep.win_loss_ratio_str,
        rep.wer_before,
        rep.wer_after,
        rep.missing_truth,
    )
    return rep


def rewriter_for_run(run: Path, settings: Settings) -> Rewriter:
    """An in-process :class:`Rewriter` over a run directory's ``pairs.parquet`` (precomputed
    pairs only: ``normalize → precomputed``).

    Nothing is published: the pairs are served from a
    :class:`rewrite.store.StaticPairStore`, so a run can be evaluated before it ships. The
    online layer (index + personal histories) is evaluated through a publish
    (``qrw evaluate online``).

    Raises:
        FileNotFoundError: ``run/pairs.parquet`` does not exist.
    """
    from offline.job import read_pairs
    from offline.publish import content_hash
    from rewrite.store import StaticPairStore

    pairs = read_pairs(run / "pairs.parquet")
    table = {p.source: (p.rewrite, p.absorption_probability, p.support, p.n_users) for p in pairs}
    s = settings.model_copy(deep=True)
    s.service.pipeline = ["normalize", "precomputed"]  # the online layer needs a publish
    rewriter = Rewriter(s, pair_store=StaticPairStore(table, f"v{content_hash(pairs)[:16]}"))
    rewriter.warm_up()
    return rewriter
