"""Rephrase labels without human annotation, and the detector's train/dev/test datasets.

Two label sources feed the contextual rephrase detector (the task of Wang et al., "Contextual
Rephrase Detection for Reducing Friction in Dialogue Systems", EMNLP 2021):

* **Simulator truth** -- the simulator knows which earlier turn a turn rephrases
  (``rephrase_of`` in its ``truth.jsonl``); :func:`label_from_truth` turns that into the
  context index of each :class:`~offline.detector.examples.DetectorExample`.
* **DSTC2 weak labels** -- real calls (Henderson, Thomson & Williams, "The Second Dialog State
  Tracking Challenge", SIGDIAL 2014) have no rephrase annotation, but every user turn carries
  the gold dialogue acts of its human transcription and the prompt the system played next.
  :func:`dstc2_rephrase_of` applies the rule below.

DSTC2 weak-labelling rule
-------------------------
Turn *j* of a call is a rephrase of an earlier turn *i* of the same call when all of these hold:

1. **Informative acts.** ``acts(t)`` is the set of gold acts of turn *t* whose type is
   ``inform``, ``request``, ``confirm``, ``deny`` or ``reqalts`` (what the user asks the
   system to do or know). Dropped: ``affirm``, ``negate``, ``ack`` (answers to the system, not
   requests; "no" said twice is not a rephrase), ``thankyou``, ``bye``, ``hello``, ``repeat``,
   ``restart``, ``reqmore`` and ``null`` (conversation management, no content).
   ``inform(this=dontcare)`` ("I don't care") is resolved to the slot the system's preceding
   prompt asked about (food, area or price range), else kept as ``this``.
2. **Same acts.** ``acts(i)`` is non-empty and every ``inform``/``request``/``confirm`` act
   of *i* is in ``acts(j)``: *j* says everything *i* asked for with the same act types and
   slot values, and may add to it ("no, thai food in the north" after "thai food").
   ``reqalts()`` and ``deny`` are modifiers, ignored next to those acts ("how about thai",
   "no not indian, thai" and "thai food" carry the same request); when *i* has only modifiers
   (just ``reqalts()``: "anything else") the two sets must be equal.
3. **Failed system turn.** The prompt *P* the system played right after *i* failed, i.e. at
   least one of (*S* = the prompt *i* answered, values are read from *P* with fixed patterns:
   ``the <area>``, ``serving <food> food``, ``no <food> restaurant``,
   ``<cheap|moderate|expensive>``, ``any part of town`` = area dontcare, ...):

   * ``clarify`` -- *P* is an explicit non-understanding or clarification prompt ("Sorry I am
     a bit confused", "Sorry, I can't hear you", "Sorry would you like ... or ...", "repeat");
   * ``fallback`` -- *P* is the DSTC2 system's bare fallback "<name> is a great restaurant"
     (it re-offers the current restaurant and acknowledges nothing; 496 times in train, after
     requests, thanks and noise alike);
   * ``reask`` -- *P* asks again for a slot that *i* informed ("What kind of food would you
     like?" after "thai food");
   * ``repeat`` -- *P* is the same prompt as *S* (the system did not move) and *P* does not
     echo *i*: not all of *i*'s inform/confirm values are mentioned, or a request is
     unanswered;
   * ``conflict`` -- *P* mentions a value for a slot that *i* informed or asked to confirm,
     but not *i*'s value ("no restaurant serving world food" after "thai food"), or mentions
     a value that *i* denied;
   * ``unanswered`` -- *i* requested a slot (phone, address, postcode, food, area, price
     range) and *P* does not answer it (no phone number after "what is the phone number");
   * ``misconfirm`` -- *P* is a confirmation prompt ("Did you say", "is that right", "Let me
     confirm") that mentions none of *i*'s inform values (the system confirms something *i*
     did not say);
   * ``asr_miss`` -- a value of one of *i*'s inform/confirm acts is in *i*'s transcription but
     not in the live ASR 1-best the system acted on, and *P* does not mention it;
   * ``misheard`` -- *P* mentions a slot value that is in *i*'s ASR 1-best but not in its
     transcription (the system acted on a recognition error: "la raza is in the cheap price
     range" after "sea food" heard as "cheap food").

4. **Nearest decides.** Candidates *i* are scanned newest first over the turns before *j*
   (at most ``max_back`` logged turns back). The first *i* that satisfies 1-2 decides: if its
   system turn failed and *i* is in the turn logs, *j* rephrases *i*; if it failed but is not
   logged (empty ASR, so not a log row) the scan continues (a chain of failed attempts); if it
   did not fail, *j* is no rephrase (the same request after a successful turn, e.g. asking
   for the phone number again after hearing it). Everything else is "no rephrase".

Known limits: the failure test reads the system's prompts, so a failure the prompt does not
show (the system silently ignored a value and asked an unrelated question, with a correct ASR)
is missed and that turn becomes a negative; caller-initiated repeats after a correct
"no restaurant serving X food" are negatives by design (no system failure).

Splits (:func:`build_datasets`) are by user, never by turn: simulated users by a stable hash of
``user_id`` (80/10/10 train/dev/test), DSTC2 train-file callers by a stable hash of
``caller_id`` (90/10 train/dev), DSTC2 dev-file callers are the DSTC2 test set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from offline.detector.examples import NO_REPHRASE, DetectorExample, build_examples, write_examples
from offline.schema import read_turn_logs
from offline.sessionize import sessionize, to_turns
from rewrite.config import Settings

log = logging.getLogger(__name__)

INFORMATIVE_ACT_TYPES = frozenset({"inform", "request", "confirm", "deny", "reqalts"})
"""Gold act types that carry what the user wants; all other types are dropped (see module)."""

FAILURE_REASONS = ("clarify", "fallback", "reask", "repeat", "conflict", "unanswered",
                   "misconfirm", "asr_miss", "misheard")  # fmt: skip
"""Names of the failed-system-turn tests, in the order they are checked."""

SPLITS = ("train", "dev", "test")

_KEY_ACT_TYPES = frozenset({"inform", "request", "confirm"})
_ACT_RE = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$")
_AREAS = ("centre", "north", "south", "east", "west")
_PRICES = ("cheap", "moderate", "expensive")
_CLARIFY_RE = re.compile(
    r"\bsorry\b.*\b(confused|can't hear|cannot hear|didn't (understand|catch)|would you like)\b"
    r"|\b(please )?(repeat that|say that again|tell me again)\b",
    re.IGNORECASE,
)
_FALLBACK_RE = re.compile(r"^\s*[a-z0-9' &-]+ is a great restaurant\s*\.?\s*$", re.IGNORECASE)
_CONFIRM_RE = re.compile(
    r"\bdid you say\b|\bis that right\b|\bright\s*\?\s*$|\blet me confirm\b", re.IGNORECASE
)
_FOOD_RES = (
    re.compile(r"\bserv(?:ing|es) ([a-z][a-z ]*?) food\b"),
    re.compile(r"\bno (?:other )?([a-z][a-z ]*?) restaurant\b"),
    re.compile(r"\blike ([a-z][a-z ]*?) or ([a-z][a-z ]*?) food\b"),
    re.compile(r"\blike ([a-z][a-z ]*?) food or you dont care\b"),
    re.compile(r"\brestaurants serving ([a-z][a-z ]*?) food\b"),
)
_AREA_RE = re.compile(r"\bthe (" + "|".join(_AREAS) + r")\b(?! american)")
_PRICE_RE = re.compile(r"\b(" + "|".join(_PRICES) + r")\b")
_REQUEST_ANSWER = {
    "phone": re.compile(r"\bphone\b"),
    "addr": re.compile(r"\bis on\b|\baddress\b|\bit is on\b"),
    "postcode": re.compile(r"\bpost ?code\b|\bc\.b\b"),
    "food": re.compile(r"\bserv(?:es|ing)\b|\bfood\b"),
    "area": re.compile(r"\bof town\b|\barea\b|\bpart of\b|\bin the (" + "|".join(_AREAS) + r")\b"),
    "pricerange": re.compile(r"\bprices?\b|\b(" + "|".join(_PRICES) + r")\b"),
}
_NOT_FOOD = frozenset({"other", "any", "any kind of", "a", "the"})
_SURFACE = {
    "centre": ("centre", "center"),
    "moderate": ("moderate", "moderately"),
    "seafood": ("seafood", "sea food"),
    "gastropub": ("gastropub", "gastro pub"),
}


# ---------------------------------------------------------------------------------------------
# Simulator truth
# ---------------------------------------------------------------------------------------------


@dataclass
class LabelStats:
    """What :func:`label_from_truth` did.

    Attributes:
        examples: examples labelled.
        positives: examples whose label points into the context (>= 0).
        out_of_context: the truth names a rephrased turn, but it is not in the context
            (too far back in turns or seconds, or not a log row); labelled -1.
    """

    examples: int = 0
    positives: int = 0
    out_of_context: int = 0

    def add(self, other: LabelStats) -> None:
        """Accumulate ``other`` into this one."""
        self.examples += other.examples
        self.positives += other.positives
        self.out_of_context += other.out_of_context


def label_from_truth(
    examples: Sequence[DetectorExample],
    rephrase_of: Mapping[str, str | None],
    stats: LabelStats | None = None,
) -> list[DetectorExample]:
    """Label each example with the context index of the turn it rephrases.

    Args:
        examples: examples from :func:`~offline.detector.examples.build_examples` (context
            newest first).
        rephrase_of: ``turn_id`` of a turn -> ``turn_id`` of the earlier turn it rephrases, or
            ``None``; turns missing from the mapping count as ``None``.
        stats: optional counters to update (examples, positives, out_of_context).

    Returns:
        New examples (same order) with ``label`` = index into ``context`` of the turn whose
        ``turn_id == rephrase_of[example_id]``, or -1 when that is ``None`` or the turn is not
        in the context (counted as ``out_of_context``).
    """
    st = stats if stats is not None else LabelStats()
    out: list[DetectorExample] = []
    for ex in examples:
        target = rephrase_of.get(ex.example_id)
        label = NO_REPHRASE
        if target is not None:
            label = next((i for i, c in enumerate(ex.context) if c.turn_id == target), NO_REPHRASE)
            if label == NO_REPHRASE:
                st.out_of_context += 1
        st.examples += 1
        st.positives += label != NO_REPHRASE
        out.append(replace(ex, label=label))
    return out


def read_rephrase_truth(truth_path: Path) -> dict[str, str | None]:
    """``turn_id -> rephrase_of`` from a simulator ``truth.jsonl``.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    truth_path = Path(truth_path)
    if not truth_path.is_file():
        raise FileNotFoundError(f"simulator truth not found: {truth_path}")
    out: dict[str, str | None] = {}
    with truth_path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                out[row["turn_id"]] = row.get("rephrase_of")
    return out


# ---------------------------------------------------------------------------------------------
# DSTC2 weak-labelling rule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Act:
    """One gold dialogue act, e.g. ``inform(food=thai)`` -> ``Act("inform", "food", "thai")``.

    ``slot``/``value`` are ``""`` when absent (``reqalts()``; ``request(phone)`` has slot
    ``phone`` and no value).
    """

    type: str
    slot: str = ""
    value: str = ""

    def __str__(self) -> str:
        arg = f"{self.slot}={self.value}" if self.value else self.slot
        return f"{self.type}({arg})"


def parse_act(text: str) -> Act | None:
    """Parse a DSTC2 act string (``inform(food=thai)``, ``request(phone)``, ``bye()``).

    Returns:
        The act (type, slot and value lower-cased and stripped), or ``None`` if ``text`` is
        not of the form ``type(args)``.
    """
    m = _ACT_RE.match(text.lower())
    if m is None:
        return None
    typ, arg = m.group(1), m.group(2).strip()
    slot, _, value = arg.partition("=")
    return Act(typ, slot.strip(), value.strip())


def asked_slot(prompt: str) -> str | None:
    """The slot a system prompt asks the user for (``food``, ``area``, ``pricerange``), if any.

    Recognises the DSTC2 system's slot questions ("What kind of food would you like?", "What
    part of town do you have in mind?", "Would you like something in the cheap , moderate , or
    expensive price range?", "... what area do you want?") and its "Sorry would you like X or
    you dont care" clarifications.
    """
    p = prompt.lower()
    if re.search(r"what kind of food|food would you like|food or you dont care", p):
        return "food"
    if re.search(r"what part of town|area do you want|area would you like|of town or you dont", p):
        return "area"
    if re.search(r"would you like something in the .*price range", p):
        return "pricerange"
    return None


def informative_acts(semantics: Iterable[str], prev_prompt: str = "") -> frozenset[Act]:
    """The informative acts of a user turn (types in :data:`INFORMATIVE_ACT_TYPES`).

    ``inform(this=dontcare)`` becomes ``inform(<slot>=dontcare)`` when ``prev_prompt`` (the
    prompt the user answered) asks for a slot (:func:`asked_slot`).
    """
    out: set[Act] = set()
    slot = asked_slot(prev_prompt)
    for s in semantics:
        act = parse_act(s)
        if act is None or act.type not in INFORMATIVE_ACT_TYPES:
            continue
        if act.slot == "this" and slot is not None:
            act = Act(act.type, slot, act.value)
        out.add(act)
    return frozenset(out)


def prompt_values(prompt: str) -> dict[str, set[str]]:
    """Slot values a system prompt mentions: ``{"food"|"area"|"pricerange": {value, ...}}``.

    Patterns (lower-cased prompt): food from "serving/serves X food", "no (other) X restaurant",
    "like X or Y food", "X food or you dont care"; area from "the <area>" (not "the north
    american"); price range
    from the words cheap/moderate/expensive. "any part of town", "any kind of food" and "dont
    care about the price range" give ``dontcare``. A price word caught by "no X restaurant" is
    a price, not a food.
    """
    p = prompt.lower()
    vals: dict[str, set[str]] = {"food": set(), "area": set(), "pricerange": set()}
    for rx in _FOOD_RES:
        for m in rx.finditer(p):
            for g in m.groups():
                g = g.strip()
                if g and g not in _PRICES and g not in _NOT_FOOD and len(g.split()) <= 3:
                    vals["food"].add(g)
    vals["area"].update(_AREA_RE.findall(p))
    vals["pricerange"].update(_PRICE_RE.findall(p))
    if "any part of town" in p or "dont care about the area" in p:
        vals["area"].add("dontcare")
    if "any kind of food" in p or "any food" in p:
        vals["food"].add("dontcare")
    if "dont care about the price" in p or "any price range" in p:
        vals["pricerange"].add("dontcare")
    return vals


def answers_request(prompt: str, slot: str) -> bool:
    """Whether a prompt answers ``request(slot)``; slots without a pattern count as answered."""
    rx = _REQUEST_ANSWER.get(slot)
    return True if rx is None else rx.search(prompt.lower()) is not None


def _norm(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def _said(value: str, text: str) -> bool:
    t = _norm(text)
    return any(_norm(form) in t for form in _SURFACE.get(value, (value,)))


def failure_reasons(
    acts: frozenset[Act], prev_prompt: str, next_prompt: str, asr_1best: str, transcription: str
) -> tuple[str, ...]:
    """Why the system turn after a user turn failed (empty tuple: it did not fail).

    Args:
        acts: the user turn's informative acts (:func:`informative_acts`).
        prev_prompt: the prompt the user turn answered (*S*).
        next_prompt: the prompt the system played after the user turn (*P*).
        asr_1best: what the live recogniser heard (what the system acted on).
        transcription: what the user really said (human transcription).

    Returns:
        The names (subset of :data:`FAILURE_REASONS` order) of the tests that fired; see the
        module docstring for their definitions.
    """
    p_vals = prompt_values(next_prompt)
    slotted = [a for a in acts if a.type == "inform" and a.slot in p_vals]
    informed = {a.slot for a in acts if a.type == "inform"}
    # A confirm question ("is it thai?") is answered by any statement about its slot.
    requests = [a.slot for a in acts if a.type in ("request", "confirm")]
    echoed = bool(slotted or requests) and (
        all(a.value in p_vals[a.slot] for a in slotted)
        and all(answers_request(next_prompt, s) for s in requests)
    )
    reasons: list[str] = []
    if _CLARIFY_RE.search(next_prompt):
        reasons.append("clarify")
    if _FALLBACK_RE.match(next_prompt):
        reasons.append("fallback")
    if asked_slot(next_prompt) in informed:
        reasons.append("reask")
    if _norm(next_prompt) == _norm(prev_prompt) and not echoed:
        reasons.append("repeat")
    conflict = any(p_vals[a.slot] and a.value not in p_vals[a.slot] for a in slotted) or any(
        a.type == "deny" and a.value in p_vals.get(a.slot, set()) for a in acts
    )
    if conflict:
        reasons.append("conflict")
    if any(not answers_request(next_prompt, s) for s in requests):
        reasons.append("unanswered")
    if _CONFIRM_RE.search(next_prompt) and not any(a.value in p_vals[a.slot] for a in slotted):
        reasons.append("misconfirm")
    if any(
        a.value != "dontcare"
        and a.value not in p_vals[a.slot]
        and _said(a.value, transcription)
        and not _said(a.value, asr_1best)
        for a in slotted
    ):
        reasons.append("asr_miss")
    if any(
        _said(v, asr_1best) and not _said(v, transcription)
        for vals in p_vals.values()
        for v in vals
        if v != "dontcare"
    ):
        reasons.append("misheard")
    return tuple(reasons)


def covers(later: frozenset[Act], earlier: frozenset[Act]) -> bool:
    """Rule step 2: ``later`` carries every ``inform``/``request``/``confirm`` act of ``earlier``.

    ``reqalts()`` and ``deny`` are modifiers and ignored there ("how about thai", "no not
    indian, thai" and "thai food" carry the same request); when ``earlier`` has only modifiers
    (e.g. just ``reqalts()``, "anything else") the two sets must be equal. ``earlier`` must be
    non-empty.
    """
    key = frozenset(a for a in earlier if a.type in _KEY_ACT_TYPES)
    if not key:
        return bool(earlier) and later == earlier
    return key <= later


@dataclass
class RuleStats:
    """Counters of the DSTC2 rule over the calls it read.

    Attributes:
        calls: calls read.
        user_turns: user turns in those calls (logged or not).
        judged: logged turns the rule labelled (keys of the mapping).
        positives: logged turns labelled as a rephrase of a logged earlier turn.
        same_acts_no_failure: logged turns whose nearest same-acts turn was followed by a
            successful system turn (labelled no rephrase; the rule's deliberate negatives).
        chained: positives whose scan skipped over unlogged failed same-acts turns.
        reasons: positives per failure test that fired on the rephrased turn (a positive can
            count under several).
        only_reason: positives per failure test when it was the only one that fired.
    """

    calls: int = 0
    user_turns: int = 0
    judged: int = 0
    positives: int = 0
    same_acts_no_failure: int = 0
    chained: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    only_reason: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (reason counters in :data:`FAILURE_REASONS` order)."""
        d = asdict(self)
        d["reasons"] = {r: self.reasons[r] for r in FAILURE_REASONS}
        d["only_reason"] = {r: self.only_reason[r] for r in FAILURE_REASONS}
        d["positive_rate"] = self.positives / self.judged if self.judged else 0.0
        return d


def call_rephrase_of(
    call: Mapping[str, Any],
    logged: Collection[str] | None = None,
    max_back: int = 3,
    stats: RuleStats | None = None,
    reasons_out: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, str | None]:
    """Apply the DSTC2 weak-labelling rule (module docstring) to one call.

    Args:
        call: one DSTC2 call (a line of ``../shared/data/dstc2/*.jsonl``): ``call_id`` and
            ``turns`` with ``turn_index``, ``system``, ``asr_1best``, ``transcription`` and
            ``semantics`` (list of act strings).
        logged: ``turn_id`` s (``f"{call_id}:{turn_index}"``) present in the turn logs; ``None``
            means every turn. Only logged turns are labelled or chosen as targets.
        max_back: candidates are at most this many logged turns before the current one.
        stats: optional counters to update.
        reasons_out: optional dict that receives ``turn_id -> failure tests`` for positives.

    Returns:
        ``turn_id -> turn_id`` of the rephrased turn, or ``None``, for every logged turn.

    Raises:
        KeyError: a required field is missing.
    """
    st = stats if stats is not None else RuleStats()
    cid = str(call["call_id"])
    turns = sorted(call["turns"], key=lambda t: int(t["turn_index"]))
    ids = [f"{cid}:{t['turn_index']}" for t in turns]
    is_logged = [logged is None or i in logged for i in ids]
    acts = [informative_acts(t.get("semantics") or [], t["system"]) for t in turns]
    failed: list[tuple[str, ...] | None] = [None] * len(turns)  # computed lazily

    def failure(i: int) -> tuple[str, ...]:
        if failed[i] is None:
            t = turns[i]
            failed[i] = failure_reasons(acts[i], t["system"], turns[i + 1]["system"],
                                        t["asr_1best"], t["transcription"])  # fmt: skip
        return failed[i] or ()

    st.calls += 1
    st.user_turns += len(turns)
    out: dict[str, str | None] = {}
    for j in range(len(turns)):
        if not is_logged[j]:
            continue
        st.judged += 1
        target: str | None = None
        seen_logged = skipped = 0
        for i in range(j - 1, -1, -1):
            if is_logged[i]:
                seen_logged += 1
                if seen_logged > max_back:
                    break
            if not covers(acts[j], acts[i]):
                continue
            why = failure(i)
            if not why:
                st.same_acts_no_failure += 1
                break
            if not is_logged[i]:
                skipped += 1
                continue
            target = ids[i]
            st.positives += 1
            st.chained += skipped > 0
            st.reasons.update(why)
            if len(why) == 1:
                st.only_reason[why[0]] += 1
            if reasons_out is not None:
                reasons_out[ids[j]] = why
            break
        out[ids[j]] = target
    return out


@dataclass
class Dstc2RephraseLabels:
    """Result of :func:`dstc2_rephrase_of`: the mapping, its counters and why each positive."""

    rephrase_of: dict[str, str | None]
    stats: RuleStats
    reasons: dict[str, tuple[str, ...]]


def iter_calls(path: Path, max_calls: int | None = None) -> Iterable[dict[str, Any]]:
    """Yield DSTC2 call dicts from a JSONL file (one call a line), at most ``max_calls``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        json.JSONDecodeError: a line is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DSTC2 calls not found: {path}")
    n = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if max_calls is not None and n >= max_calls:
                return
            if line.strip():
                n += 1
                yield json.loads(line)


def dstc2_rephrase_of(
    calls_path: Path,
    imported_dir: Path | None = None,
    max_back: int = 3,
    max_calls: int | None = None,
) -> Dstc2RephraseLabels:
    """Weak rephrase labels for the DSTC2 calls of one file (rule: module docstring).

    Args:
        calls_path: DSTC2 JSONL, e.g. ``../shared/data/dstc2/train.jsonl``.
        imported_dir: output of :func:`offline.importers.dstc2.import_dstc2` for the same
            calls; its ``turns.jsonl`` defines which turns are log rows (empty-ASR turns are
            not). ``None``: every turn counts as logged.
        max_back: candidates at most this many logged turns back (the detector's lookback).
        max_calls: read only the first ``max_calls`` calls.

    Returns:
        :class:`Dstc2RephraseLabels`; ``rephrase_of`` maps every logged ``turn_id`` to the
        ``turn_id`` it rephrases or ``None``.

    Raises:
        FileNotFoundError: ``calls_path`` or ``imported_dir/turns.jsonl`` is missing.
    """
    logged: set[str] | None = None
    if imported_dir is not None:
        turns_path = Path(imported_dir) / "turns.jsonl"
        if not turns_path.is_file():
            raise FileNotFoundError(f"imported DSTC2 turns not found: {turns_path}")
        with turns_path.open(encoding="utf-8") as fh:
            logged = {json.loads(line)["turn_id"] for line in fh if line.strip()}
    stats = RuleStats()
    reasons: dict[str, tuple[str, ...]] = {}
    out: dict[str, str | None] = {}
    for call in iter_calls(calls_path, max_calls):
        out.update(call_rephrase_of(call, logged, max_back, stats, reasons))
    log.info(
        "DSTC2 rule %s: %d calls, %d turns judged, %d rephrases (%.1f%%), %d same acts without "
        "failure",
        calls_path,
        stats.calls,
        stats.judged,
        stats.positives,
        100.0 * stats.positives / max(stats.judged, 1),
        stats.same_acts_no_failure,
    )
    return Dstc2RephraseLabels(out, stats, reasons)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _bucket(key: str, salt: str) -> int:
    """Stable bucket 0..99 of a key (sha256; independent of Python's hash seed)."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16) % 100


def sim_user_split(user_id: str) -> str:
    """Split of a simulated user: ``train`` 80 %, ``dev`` 10 %, ``test`` 10 % (stable hash)."""
    b = _bucket(user_id, "sim")
    return "train" if b < 80 else ("dev" if b < 90 else "test")


def dstc2_caller_split(caller_id: str) -> str:
    """Split of a DSTC2 train-file caller: ``train`` 90 %, ``dev`` 10 % (stable hash)."""
    return "train" if _bucket(caller_id, "dstc2") < 90 else "dev"


@dataclass
class DatasetStats:
    """What :func:`build_datasets` wrote.

    Attributes:
        files: output name (``train``, ``dev``, ``test_sim``, ``test_dstc2``) -> per source
            (``sim``, ``dstc2``, ``all``): ``examples``, ``positives``, ``positive_rate``,
            ``users``.
        labels: per input (``sim``, ``dstc2_train``, ``dstc2_dev``): :class:`LabelStats`.
        rule: per DSTC2 file (``dstc2_train``, ``dstc2_dev``): :meth:`RuleStats.to_dict`.
        config: the parameters used (simulation, settings, DSTC2 limit).
        paths: output name -> file path.
        elapsed_s: wall time, seconds (logged; not in ``stats.json`` so reruns are identical).
    """

    files: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    rule: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict without ``elapsed_s``."""
        d = asdict(self)
        d.pop("elapsed_s")
        return d


def _file_stats(rows: Sequence[DetectorExample]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for src in ("sim", "dstc2", "all"):
        sel = [ex for ex in rows if src == "all" or ex.source == src]
        pos = sum(ex.label >= 0 for ex in sel)
        out[src] = {
            "examples": len(sel),
            "positives": pos,
            "positive_rate": round(pos / len(sel), 4) if sel else 0.0,
            "users": len({ex.user_id for ex in sel}),
        }
    return out


def _examples_from_logs(
    log_paths: Sequence[Path], settings: Settings, source: str
) -> list[DetectorExample]:
    read = read_turn_logs(log_paths)
    if read.quarantined:
        log.warning("%s: %d rows quarantined while reading logs", source, len(read.quarantined))
    turns = to_turns(read.turns)
    sessions = sessionize(turns, settings.session.gap_s)
    r = settings.rephrase
    return build_examples(turns, sessions, r.lookback_turns, r.max_gap_s, source=source)


def _subset_calls(src: Path, dst: Path, max_calls: int | None) -> Path:
    """``src`` itself, or its first ``max_calls`` calls copied to ``dst`` (a work file)."""
    if max_calls is None:
        return src
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("w", encoding="utf-8") as fh:
        for call in iter_calls(src, max_calls):
            fh.write(json.dumps(call, ensure_ascii=False) + "\n")
    return dst


def build_datasets(
    out_dir: Path,
    data_root: Path,
    settings: Settings,
    sim_users: int = 1200,
    sim_days: int = 3,
    sim_seed: int = 1001,
    dstc2_max_calls: int | None = None,
    progress: bool = False,
) -> DatasetStats:
    """Build the detector's labelled datasets from a training simulation and DSTC2.

    Steps: simulate ``sim_users`` x ``sim_days`` from SLURP (Bastianelli et al., EMNLP 2020)
    under ``sim_seed`` (keep it distinct from the demo's seed 7) into ``out_dir/raw/sim``;
    import DSTC2 train and dev (``out_dir/raw/dstc2-{train,dev}``); sessionize with
    ``settings.session.gap_s``; build examples with ``settings.rephrase.lookback_turns``
    earlier turns within ``settings.rephrase.max_gap_s`` s; label sim examples from the
    simulator truth and DSTC2 examples with the weak rule; split by user.

    Writes in ``out_dir``: ``train.jsonl`` and ``dev.jsonl`` (sim + DSTC2 mixed, ``source``
    tells them apart), ``test_sim.jsonl``, ``test_dstc2.jsonl`` (:func:`write_examples`
    format) and ``stats.json`` (:meth:`DatasetStats.to_json`). Same inputs and arguments give
    identical files.

    Args:
        out_dir: output folder (created; files overwritten).
        data_root: folder with ``slurp/utterances.jsonl`` and ``dstc2/{train,dev}.jsonl``.
        settings: loaded settings.
        sim_users, sim_days, sim_seed: the training simulation.
        dstc2_max_calls: use only the first N calls of each DSTC2 file (tests); ``None``: all.
        progress: show the simulator's progress bars.

    Returns:
        :class:`DatasetStats`.

    Raises:
        FileNotFoundError: an input file under ``data_root`` is missing.
        AssertionError: a user ended up in two splits (a bug).
    """
    from offline.importers.dstc2 import import_dstc2
    from offline.simulate import SimulatorConfig, simulate

    t0 = time.perf_counter()
    out_dir, data_root = Path(out_dir), Path(data_root)
    corpus = data_root / "slurp" / "utterances.jsonl"
    dstc2_files = {"dstc2_train": data_root / "dstc2" / "train.jsonl",
                   "dstc2_dev": data_root / "dstc2" / "dev.jsonl"}  # fmt: skip
    for p in (corpus, *dstc2_files.values()):
        if not p.is_file():
            raise FileNotFoundError(f"detector training data not found: {p}")
    raw = out_dir / "raw"
    stats = DatasetStats()
    r = settings.rephrase
    stats.config = {
        "sim_users": sim_users,
        "sim_days": sim_days,
        "sim_seed": sim_seed,
        "dstc2_max_calls": dstc2_max_calls,
        "session_gap_s": settings.session.gap_s,
        "lookback_turns": r.lookback_turns,
        "max_gap_s": r.max_gap_s,
    }

    # Simulator: labels from truth, split by a stable hash of the user id.
    sim_dir = raw / "sim"
    for stale in sim_dir.glob("day-*.jsonl"):
        stale.unlink()
    sim_config = SimulatorConfig.from_settings(settings.simulator)
    simulate(corpus, sim_users, sim_days, sim_seed, sim_dir, config=sim_config,
             progress=progress)  # fmt: skip
    sim_label_stats = LabelStats()
    sim_examples = label_from_truth(
        _examples_from_logs(sorted(sim_dir.glob("day-*.jsonl")), settings, "sim"),
        read_rephrase_truth(sim_dir / "truth.jsonl"),
        sim_label_stats,
    )
    stats.labels["sim"] = asdict(sim_label_stats)

    # DSTC2: import (ASR 1-best as the utterance), weak labels, split by caller.
    dstc2_examples: dict[str, list[DetectorExample]] = {}
    for name, path in dstc2_files.items():
        imp_dir = raw / name.replace("_", "-")
        src = _subset_calls(path, raw / f"{name}-subset.jsonl", dstc2_max_calls)
        import_dstc2(src, imp_dir, fixed_spacing_s=settings.session.fixed_spacing_s)
        weak = dstc2_rephrase_of(src, imp_dir, max_back=r.lookback_turns)
        st = LabelStats()
        dstc2_examples[name] = label_from_truth(
            _examples_from_logs([imp_dir / "turns.jsonl"], settings, "dstc2"),
            weak.rephrase_of,
            st,
        )
        stats.labels[name] = asdict(st)
        stats.rule[name] = weak.stats.to_dict()

    splits: dict[str, list[DetectorExample]] = {
        "train": [], "dev": [], "test_sim": [], "test_dstc2": []
    }  # fmt: skip
    for ex in sim_examples:
        s = sim_user_split(ex.user_id)
        splits["test_sim" if s == "test" else s].append(ex)
    for ex in dstc2_examples["dstc2_train"]:
        splits[dstc2_caller_split(ex.user_id)].append(ex)
    splits["test_dstc2"].extend(dstc2_examples["dstc2_dev"])

    owner: dict[str, str] = {}
    for name, rows in splits.items():
        for ex in rows:
            prev = owner.setdefault(ex.user_id, name)
            assert prev == name, f"user {ex.user_id} ({ex.source}) in splits {prev} and {name}"
            assert -1 <= ex.label < len(ex.context), f"label out of range: {ex.example_id}"

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        path = out_dir / f"{name}.jsonl"
        write_examples(rows, path)
        stats.paths[name] = str(path)
        stats.files[name] = _file_stats(rows)
    stats.paths["stats"] = str(out_dir / "stats.json")
    (out_dir / "stats.json").write_text(
        json.dumps(stats.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    stats.elapsed_s = time.perf_counter() - t0
    for name in splits:
        a = stats.files[name]["all"]
        log.info("%s: %d examples, %.1f%% positive, %d users", name, a["examples"],
                 100 * a["positive_rate"], a["users"])  # fmt: skip
    log.info("detector datasets -> %s in %.1f s", out_dir, stats.elapsed_s)
    return stats
