"""SLURP commands as a goal/realization grammar, and the simulated assistant's NLU parser.

Source: SLURP, a spoken-language-understanding corpus of home-assistant commands
(Bastianelli, Vanzo, Swietojanski & Rieser, EMNLP 2020), textual part, CC BY 4.0.

Terms used here:

- **template**: a SLURP annotation with its slots replaced by placeholders, e.g.
  ``what's the weather in <place_name>`` (intent ``weather_query``).
- **goal**: what the user wants, ``(intent, slot values)``; its key compares slot values as a
  multiset of ``(slot type, value)`` pairs, so word order inside the template does not matter.
- **realization** of a goal: a template of the same intent with the same multiset of slot
  types, filled with the goal's values. Texts are normalized (lower-case, no punctuation but
  apostrophes) with :func:`rewrite.normalize.normalize_utterance`.

:class:`TemplateGrammar` is the simulated NLU: it parses a text into every goal it is a
realization of, over all templates and all SLURP slot values of each type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidfuzz import fuzz

from rewrite.normalize import normalize_utterance

log = logging.getLogger(__name__)

SLOT_RE = re.compile(r"\[\s*([^:\]\[]+?)\s*:\s*([^\]\[]*?)\s*\]")
"""A SLURP slot mark ``[type : value]``; group 1 = type, group 2 = value."""

SlotPair = tuple[str, str]
GoalKey = tuple[str, tuple[SlotPair, ...]]
"""``(intent, sorted((slot_type, value), ...))``: equal keys are the same goal."""


def _placeholder(slot_type: str) -> str:
    # normalize_utterance strips "<" and ">", so a placeholder never collides with a word.
    return f"<{slot_type}>"


def _is_placeholder(token: str) -> bool:
    return token.startswith("<")


@dataclass(frozen=True)
class Template:
    """One SLURP annotation as a token template.

    Attributes:
        tid: index in :attr:`SlurpCorpus.templates`.
        row_id: the SLURP row id (e.g. ``"slurp-13804"``).
        intent: SLURP intent (``scenario_action``), e.g. ``"weather_query"``.
        scenario: SLURP scenario, e.g. ``"weather"``.
        tokens: literal words and slot placeholders ``<type>`` in spoken order.
        slot_types: slot types in spoken order (the placeholders of ``tokens``).
        wer: SLURP ``mean_recording_wer`` of the source sentence (0..1+, word error rate).
    """

    tid: int
    row_id: str
    intent: str
    scenario: str
    tokens: tuple[str, ...]
    slot_types: tuple[str, ...]
    wer: float

    @property
    def group(self) -> tuple[str, tuple[str, ...]]:
        """``(intent, sorted slot types)``: templates of one group realize the same goals."""
        return self.intent, tuple(sorted(self.slot_types))


@dataclass(frozen=True)
class Goal:
    """What a user wants: an intent plus slot values.

    Attributes:
        intent: SLURP intent.
        scenario: SLURP scenario (the assistant's ``domain``).
        slots: ``(slot_type, value)`` pairs in the spoken order of ``source_tid``'s template.
        source_tid: the template this goal was taken from (its primary realization).
    """

    intent: str
    scenario: str
    slots: tuple[SlotPair, ...]
    source_tid: int
    key: GoalKey = field(init=False, compare=False)
    goal_id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        key: GoalKey = (self.intent, tuple(sorted(self.slots)))
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "goal_id", goal_id_of(key))

    def with_slots(self, slots: Sequence[SlotPair]) -> Goal:
        """The same intent and source template with other slot values (same types, same order)."""
        return Goal(self.intent, self.scenario, tuple(slots), self.source_tid)


def goal_id_of(key: GoalKey) -> str:
    """Stable goal id ``g`` + 12 hex digits of SHA-1 over the goal key."""
    intent, slots = key
    text = intent + "|" + "|".join(f"{t}={v}" for t, v in slots)
    return "g" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Realization:
    """A goal said one way: normalized ``text``, its template ``tid``, that sentence's ``wer``."""

    text: str
    tid: int
    wer: float


class _Node:
    __slots__ = ("ends", "lit", "slot")

    def __init__(self) -> None:
        self.lit: dict[str, _Node] = {}
        self.slot: dict[str, _Node] = {}
        self.ends: list[int] = []


_VALUE_END = ""


class TemplateGrammar:
    """The simulated NLU: parses a normalized text into the goals it realizes.

    A token trie over all templates; at a slot placeholder the parser consumes any SLURP value
    of that slot type (a per-type token trie). Parses are cached per text.

    Args:
        templates: all templates.
        values_by_type: slot type -> normalized values (each non-empty).
    """

    def __init__(
        self, templates: Sequence[Template], values_by_type: Mapping[str, Sequence[str]]
    ) -> None:
        self._templates = templates
        self._root = _Node()
        for t in templates:
            node = self._root
            for tok in t.tokens:
                if _is_placeholder(tok):
                    node = node.slot.setdefault(tok[1:-1], _Node())
                else:
                    node = node.lit.setdefault(tok, _Node())
            node.ends.append(t.tid)
        self._values: dict[str, dict[str, Any]] = {}
        for slot_type, values in values_by_type.items():
            trie: dict[str, Any] = {}
            for v in values:
                cur = trie
                for tok in v.split():
                    cur = cur.setdefault(tok, {})
                cur[_VALUE_END] = True
            self._values[slot_type] = trie
        self._cache: dict[str, tuple[GoalKey, ...]] = {}

    def _value_ends(self, slot_type: str, tokens: Sequence[str], i: int) -> list[int]:
        cur = self._values.get(slot_type)
        out: list[int] = []
        j = i
        while cur is not None and j < len(tokens):
            cur = cur.get(tokens[j])
            j += 1
            if cur is not None and _VALUE_END in cur:
                out.append(j)
        return out

    def parse(self, text: str) -> tuple[GoalKey, ...]:
        """Every goal ``text`` is a realization of, sorted; ``()`` when it parses as nothing.

        Args:
            text: an utterance; it is normalized with ``normalize_utterance`` first.
        """
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        norm = normalize_utterance(text)
        hit = self._cache.get(norm)
        if hit is not None:
            self._cache[text] = hit
            return hit
        tokens = norm.split()
        found: set[GoalKey] = set()
        stack: list[tuple[_Node, int, tuple[SlotPair, ...]]] = [(self._root, 0, ())]
        while stack:
            node, i, slots = stack.pop()
            if i == len(tokens):
                for tid in node.ends:
                    found.add((self._templates[tid].intent, tuple(sorted(slots))))
                continue
            child = node.lit.get(tokens[i])
            if child is not None:
                stack.append((child, i + 1, slots))
            for slot_type, snode in node.slot.items():
                for j in self._value_ends(slot_type, tokens, i):
                    stack.append((snode, j, (*slots, (slot_type, " ".join(tokens[i:j])))))
        result = tuple(sorted(found)) if tokens else ()
        self._cache[norm] = self._cache[text] = result
        return result


class SlurpCorpus:
    """SLURP commands as templates, goals and a parser. Build with :meth:`load`.

    Args:
        templates: usable SLURP rows as templates (``tid`` = list index).
        source_slots: per template, its own ``(slot_type, value)`` pairs in spoken order.
        path: the file it was read from, if any (``lm.txt`` beside it is used by the simulator).

    Attributes:
        templates: one per usable SLURP row, in file order.
        goals: one goal per template (its intent and its own slot values, primary realization =
            that template), in file order. Several templates can share a goal key (e.g. all
            slot-less ``general_quirky`` commands).
        values_by_type: slot type -> sorted distinct normalized values.
        scenario_of: intent -> scenario.
        grammar: the NLU parser over all templates.
        word_counts: word -> occurrences in the corpus sentences.
    """

    def __init__(
        self,
        templates: list[Template],
        source_slots: Sequence[tuple[SlotPair, ...]],
        path: Path | None = None,
    ) -> None:
        if len(templates) != len(source_slots):
            raise ValueError("templates and source_slots differ in length")
        self.path = path
        self.templates = templates
        self.scenario_of: dict[str, str] = {t.intent: t.scenario for t in templates}
        self.groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for t in templates:
            self.groups.setdefault(t.group, []).append(t.tid)
        values: dict[str, set[str]] = {}
        self._source_slots: dict[int, tuple[SlotPair, ...]] = dict(enumerate(source_slots))
        self.goals: list[Goal] = []
        for t in templates:
            slots = self._source_slots[t.tid]
            for slot_type, v in slots:
                values.setdefault(slot_type, set()).add(v)
            self.goals.append(Goal(t.intent, t.scenario, slots, t.tid))
        self.values_by_type: dict[str, list[str]] = {k: sorted(v) for k, v in values.items()}
        self.word_counts: Counter[str] = Counter(
            w for t in templates for w in fill(t.tokens, self._source_slots[t.tid]).split()
        )
        self.grammar = TemplateGrammar(templates, self.values_by_type)
        self._realizations: dict[tuple[GoalKey, int], tuple[Realization, ...]] = {}

    @classmethod
    def load(cls, path: Path) -> SlurpCorpus:
        """Read SLURP ``utterances.jsonl`` (fields ``id``, ``text``, ``annotation``, ``scenario``,
        ``intent``, ``mean_recording_wer``).

        Rows whose annotation does not reproduce their text (a few SLURP typos) or that do not
        parse are skipped (counted in the debug log).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: no usable row in the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"SLURP corpus not found: {path} (expected shared/data/slurp/utterances.jsonl)"
            )
        templates: list[Template] = []
        source_slots: list[tuple[SlotPair, ...]] = []
        skipped = Counter[str]()
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    parsed = _parse_annotation(str(row["annotation"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    skipped["unparsable"] += 1
                    continue
                tokens, slots = parsed
                filled = fill(tokens, slots)
                if filled != normalize_utterance(str(row.get("text", ""))):
                    skipped["annotation_differs_from_text"] += 1
                    continue
                templates.append(
                    Template(
                        tid=len(templates),
                        row_id=str(row.get("id", len(templates))),
                        intent=str(row["intent"]),
                        scenario=str(row.get("scenario") or row["intent"].split("_")[0]),
                        tokens=tokens,
                        slot_types=tuple(t for t, _ in slots),
                        wer=float(row.get("mean_recording_wer") or 0.0),
                    )
                )
                source_slots.append(slots)
        if not templates:
            raise ValueError(f"no usable SLURP rows in {path}")
        if skipped:
            log.debug("SLURP rows skipped: %s", dict(skipped))
        return cls(templates, source_slots, path)

    def realizations(self, goal: Goal, limit: int = 0) -> tuple[Realization, ...]:
        """Ways to say ``goal``: its primary realization first, then the others by decreasing
        string similarity to it (rapidfuzz ``ratio``), distinct texts only.

        Args:
            goal: the goal.
            limit: keep at most this many (0 = all).
        """
        ck = (goal.key, goal.source_tid)
        cached = self._realizations.get(ck)
        if cached is None:
            primary_t = self.templates[goal.source_tid]
            primary = Realization(fill(primary_t.tokens, goal.slots), primary_t.tid, primary_t.wer)
            others: dict[str, Realization] = {}
            for tid in self.groups.get(primary_t.group, ()):
                t = self.templates[tid]
                text = fill(t.tokens, goal.slots)
                if text != primary.text and text not in others:
                    others[text] = Realization(text, tid, t.wer)
            ranked = sorted(
                others.values(), key=lambda r: (-fuzz.ratio(primary.text, r.text), r.text)
            )
            cached = (primary, *ranked)
            self._realizations[ck] = cached
        return cached[:limit] if limit > 0 else cached

    def goal_of(self, key: GoalKey) -> tuple[str, str]:
        """``(intent, scenario)`` of a goal key."""
        return key[0], self.scenario_of.get(key[0], key[0].split("_")[0])


def _parse_annotation(annotation: str) -> tuple[tuple[str, ...], tuple[SlotPair, ...]]:
    """Split a SLURP annotation into tokens (with ``<type>`` placeholders) and slot pairs.

    Raises:
        ValueError: a slot value normalizes to nothing, or stray brackets remain.
    """
    tokens: list[str] = []
    slots: list[SlotPair] = []
    pos = 0
    for m in SLOT_RE.finditer(annotation):
        tokens.extend(normalize_utterance(annotation[pos : m.start()]).split())
        slot_type = m.group(1).strip().lower()
        value = normalize_utterance(m.group(2))
        if not value or not slot_type:
            raise ValueError(f"empty slot in {annotation!r}")
        tokens.append(_placeholder(slot_type))
        slots.append((slot_type, value))
        pos = m.end()
    tail = annotation[pos:]
    if "[" in tail or "]" in tail:
        raise ValueError(f"stray bracket in {annotation!r}")
    tokens.extend(normalize_utterance(tail).split())
    if not tokens:
        raise ValueError("empty annotation")
    return tuple(tokens), tuple(slots)


def fill(tokens: Iterable[str], slots: Sequence[SlotPair]) -> str:
    """Fill a template's placeholders with values of the matching type, in order.

    Values of one type are used in their order in ``slots``.

    Raises:
        KeyError: ``slots`` lacks a value for a placeholder's type.
    """
    queues: dict[str, list[str]] = {}
    for slot_type, value in slots:
        queues.setdefault(slot_type, []).append(value)
    used: dict[str, int] = {}
    out: list[str] = []
    for tok in tokens:
        if _is_placeholder(tok):
            slot_type = tok[1:-1]
            k = used.get(slot_type, 0)
            out.append(queues[slot_type][k])
            used[slot_type] = k + 1
        else:
            out.append(tok)
    return " ".join(out)


def task_success_oracle(corpus: Path | SlurpCorpus) -> Callable[[str, str], bool]:
    """The simulated NLU as an oracle for replay evaluation.

    Returns ``success(text, intended_text)``: True when ``text`` realizes a goal that
    ``intended_text`` realizes (both parsed by the SLURP template grammar), i.e. the simulated
    assistant would do what the user meant. Used for the task-level win/loss ratio.

    Raises:
        FileNotFoundError: the corpus path does not exist.
    """
    c = corpus if isinstance(corpus, SlurpCorpus) else SlurpCorpus.load(Path(corpus))

    def success(text: str, intended_text: str) -> bool:
        return bool(set(c.grammar.parse(text)) & set(c.grammar.parse(intended_text)))

    return success
