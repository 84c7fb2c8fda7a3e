"""The user-traffic simulator: users with habits, a noisy ASR channel, a template NLU, and
users who barge in, rephrase or give up. Writes turn logs (schema v1) plus ground truth.

Goals and phrasings come from SLURP (Bastianelli et al., EMNLP 2020); phonetic ASR errors use
the CMU Pronouncing Dictionary via ``pronouncing`` (see :mod:`offline.simulate.asr`).

Randomness: every draw comes from a ``numpy.random.Generator`` seeded from
``(seed, user, day, stream)`` or from SHA-256 of named parts, so the same corpus, seed and
arguments give byte-identical files, and a day's traffic plan does not depend on earlier days
or on the rewriter (only the user's reactions to failures do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from offline.schema import write_turn_logs
from offline.simulate.asr import ChannelConfig, NoisyChannel, PhoneticNeighbours, stable_seed
from offline.simulate.corpus import Goal, GoalKey, Realization, SlurpCorpus
from rewrite.normalize import normalize_utterance
from rewrite.types import ContextTurn, RewriteRequest, RewriteResult

log = logging.getLogger(__name__)

RewriteFn = Callable[[RewriteRequest], RewriteResult]
"""A rewriter: the simulated assistant acts on ``result.rewrite`` when ``result.rewritten``."""

FAILURE_RESPONSE = "Sorry, I didn't understand that."
DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)

OUTCOME_SUCCESS = "success"
OUTCOME_WRONG = "wrong_action"
OUTCOME_NOT_UNDERSTOOD = "not_understood"

# numpy stream ids: day plan, reactions/channel, user setup, the user's device type (its own
# stream, so adding it left every other draw as it was)
_PLAN, _REACT, _USER, _DEVICE = 1, 2, 0, 3


class SimulatorConfig(BaseModel):
    """Simulator parameters. Times in seconds (of the simulated UTC day), probabilities in
    [0, 1]. Defaults give ~9 turns per active user and day and a 15-30 % defect rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_user_day: float = Field(default=8.0, gt=0)
    """Mean new requests (first attempts, not rephrases) per user and day."""
    active_day_prob: float = Field(default=0.85, gt=0, le=1)
    """P(a user uses the assistant on a given day)."""
    activity_sigma: float = Field(default=0.5, ge=0)
    """Log-normal sigma of per-user activity (mean 1): a few heavy users, many light ones."""
    habit_share: float = Field(default=0.6, ge=0, le=1)
    """Share of requests drawn from the user's habitual goals (rest: fresh popular draws)."""
    habits_mean: float = Field(default=4.0, ge=1)
    """Mean number of habitual goals per user (1 + Poisson(habits_mean - 1))."""
    habit_zipf: float = Field(default=1.0, ge=0)
    """Zipf exponent of a user's preference among their habits."""
    popularity_exponent: float = Field(default=1.0, ge=0)
    """Zipf-Mandelbrot exponent ``s`` of goal popularity ``(rank + q) ** -s``."""
    popularity_offset: float = Field(default=8.0, ge=0)
    """Zipf-Mandelbrot offset ``q``."""
    personal_slot_types: tuple[str, ...] = (
        "person",
        "place_name",
        "playlist_name",
        "artist_name",
        "song_name",
        "radio_name",
        "podcast_name",
        "audiobook_name",
        "business_name",
        "house_place",
        "list_name",
        "email_address",
        "music_genre",
    )
    """Slot types whose values are the user's own (contacts, places, playlists, ...)."""
    personal_values_per_type: int = Field(default=3, ge=1)
    personalize_prob: float = Field(default=0.8, ge=0, le=1)
    """P(a personal-type slot takes the user's own value instead of the corpus value)."""
    primary_phrasing_prob: float = Field(default=0.7, ge=0, le=1)
    """P(a user's habitual phrasing of a goal is its source SLURP sentence)."""
    phrasing_variation: float = Field(default=0.1, ge=0, le=1)
    """P(a request is phrased differently from the user's habitual phrasing)."""
    rephrase_candidates: int = Field(default=6, ge=1)
    """Realizations considered for phrasings and rephrases (the most similar ones)."""
    session_extra_requests_mean: float = Field(default=0.7, ge=0)
    """Requests per session = 1 + Poisson(this)."""
    day_start_s: float = Field(default=6.5 * 3600, ge=0)
    """Earliest session start, seconds after UTC midnight."""
    day_end_s: float = Field(default=22.5 * 3600, le=23.5 * 3600)
    """Latest session start, seconds after UTC midnight (sessions never cross midnight)."""
    min_session_gap_s: float = Field(default=900.0, gt=0)
    """Minimum time between session starts; the silence between sessions stays well above the
    job's 300 s session gap because a session lasts a few minutes at most."""
    next_request_delay_s: tuple[float, float] = (4.0, 15.0)
    """Uniform delay from a successful turn to the next request of the session."""
    rephrase_delay_s: tuple[float, float] = (2.0, 8.0)
    """Uniform delay from a failed turn to its rephrase."""
    barge_in_rephrase_delay_s: tuple[float, float] = (1.0, 4.0)
    """Uniform delay from a failed, barged-in turn to its rephrase."""
    barge_in_prob_wrong_action: float = Field(default=0.55, ge=0, le=1)
    barge_in_prob_not_understood: float = Field(default=0.3, ge=0, le=1)
    barge_in_prob_success: float = Field(default=0.02, ge=0, le=1)
    repeat_prob: float = Field(default=0.45, ge=0, le=1)
    """P(a rephrase repeats the same words; else another realization of the goal)."""
    abandon_prob: float = Field(default=0.12, ge=0, le=1)
    """P(giving up after the first failure of a request)."""
    abandon_prob_step: float = Field(default=0.15, ge=0, le=1)
    """Added P(giving up) per further failure of the same request."""
    max_retries: int = Field(default=3, ge=0)
    """Rephrases per request at most; the user gives up after that many failed retries."""
    max_context_turns: int = Field(default=10, ge=0)
    """Earlier session turns passed to ``rewrite_fn`` (newest kept)."""
    locale: str = "en-US"
    device_types: dict[str, float] = Field(
        default_factory=lambda: {"speaker": 0.6, "display": 0.25, "phone": 0.15}
    )
    """Device type of each user's device (logged as ``device_type``), drawn with these
    weights; empty = not logged. Outcomes do not depend on it in this simulator."""
    use_lm_vocabulary: bool = True
    """Favour ASR substitutes from ``lm.txt`` next to the corpus (if present) as LM vocabulary."""
    channel: ChannelConfig = Field(default_factory=ChannelConfig)

    @model_validator(mode="after")
    def _check_ranges(self) -> SimulatorConfig:
        if self.day_end_s <= self.day_start_s:
            raise ValueError("day_end_s must be after day_start_s")
        for name in ("next_request_delay_s", "rephrase_delay_s", "barge_in_rephrase_delay_s"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high")
        return self

    @classmethod
    def from_settings(cls, settings: BaseModel | Mapping[str, Any]) -> SimulatorConfig:
        """Take the fields of ``settings`` (e.g. ``Settings().simulator``) that this model
        has; unknown fields are ignored, missing ones keep their defaults."""
        data = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings)
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


@dataclass
class DayCounts:
    """Counts of one simulated day (or a sum of days)."""

    turns: int = 0
    requests: int = 0
    defects: int = 0
    wrong_actions: int = 0
    not_understood: int = 0
    rephrases: int = 0
    barge_ins: int = 0
    abandons: int = 0
    rewrites: int = 0
    corrupted: int = 0

    def add(self, other: DayCounts) -> None:
        """Add ``other`` into this one."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class DayResult:
    """One simulated day.

    Attributes:
        day: 1-based day number.
        turns: turn-log rows (schema v1 dicts), sorted by timestamp then ``turn_id``.
        truth: one ground-truth row per turn, same order.
        counts: totals of the day.
    """

    day: int
    turns: list[dict[str, Any]]
    truth: list[dict[str, Any]]
    counts: DayCounts


@dataclass
class SimulationSummary:
    """What :func:`simulate` produced. Rates are per turn."""

    turns: int
    users: int
    days: int
    defects: int
    rephrases: int
    barge_ins: int
    abandons: int
    wrong_actions: int
    not_understood: int
    rewrites: int
    requests: int
    files_written: int
    files: tuple[Path, ...] = ()
    seconds: float = 0.0

    @property
    def defect_rate(self) -> float:
        """Defective turns / turns."""
        return self.defects / self.turns if self.turns else 0.0


@dataclass
class _User:
    index: int
    user_id: str
    device_id: str
    device_type: str
    activity: float
    personal: dict[str, tuple[str, ...]]
    habits: list[Goal]
    habit_cdf: np.ndarray
    phrasing: dict[tuple[GoalKey, int], Realization] = field(default_factory=dict)


@dataclass
class _Turn:
    t: float
    text: str
    response: str
    barge_in: bool


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _user_hex(kind: str, seed: int, index: int, n: int) -> str:
    return hashlib.sha256(f"qrw-sim-{kind}|{seed}|{index}".encode()).hexdigest()[:n]


def _timestamp(base: datetime, ms: int) -> str:
    ts = base + timedelta(milliseconds=ms)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _read_lm_counts(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            counts.update(normalize_utterance(line).split())
    return counts


def confirmation(intent: str, values: Sequence[str]) -> str:
    """The assistant's success response naming the intent and slot values.

    Example: ``confirmation("weather_query", ["boston"]) == "Okay, weather query: boston."``
    """
    what = intent.replace("_", " ")
    return f"Okay, {what}: {', '.join(values)}." if values else f"Okay, {what}."


class Simulator:
    """Stateful simulator of a population of users, one day at a time.

    Users (habits, personal entities, ids) are fixed at construction; :meth:`simulate_day`
    can be called for any day in any order with any rewriter. A day's plan (who talks when,
    wanting what) depends only on (seed, user, day); the channel noise and the user's
    reactions come from a second stream, so two rewriters see the same requests.

    Args:
        corpus: path of SLURP ``utterances.jsonl``, or an already loaded :class:`SlurpCorpus`.
        users: number of users (>= 1).
        seed: non-negative simulation seed.
        config: parameters; default :class:`SimulatorConfig`.
        start: UTC midnight of day 1 (timezone-aware).

    Raises:
        FileNotFoundError: the corpus path does not exist.
        ValueError: ``users < 1``, ``seed < 0`` or a naive ``start``.
    """

    def __init__(
        self,
        corpus: Path | SlurpCorpus,
        users: int,
        seed: int,
        config: SimulatorConfig | None = None,
        start: datetime = DEFAULT_START,
    ) -> None:
        if users < 1:
            raise ValueError(f"users must be >= 1 (got {users})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (got {seed})")
        if start.tzinfo is None or start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        self.config = config or SimulatorConfig()
        self.seed = seed
        self.start = start.astimezone(UTC)
        self.corpus = corpus if isinstance(corpus, SlurpCorpus) else SlurpCorpus.load(corpus)
        lm_path = self.corpus.path.parent / "lm.txt" if self.corpus.path else None
        vocab = Counter(self.corpus.word_counts)
        if self.config.use_lm_vocabulary and lm_path is not None and lm_path.is_file():
            vocab.update(_read_lm_counts(lm_path))
        entity_pairs = frozenset(
            (a, b)
            for slot_type in self.config.personal_slot_types
            for v in self.corpus.values_by_type.get(slot_type, ())
            for a, b in pairwise(v.split())
        )
        self.channel = NoisyChannel(
            self.config.channel, seed, PhoneticNeighbours(vocab), entity_pairs
        )
        self._build_popularity()
        self.users = [self._make_user(i) for i in range(users)]

    # ------------------------------------------------------------------ setup
    def _build_popularity(self) -> None:
        c = self.config
        goals = self.corpus.goals
        order = sorted(
            range(len(goals)),
            key=lambda i: hashlib.sha256(
                f"qrw-sim-pop|{self.seed}|{goals[i].goal_id}|{goals[i].source_tid}".encode()
            ).digest(),
        )
        self._popular: list[Goal] = [goals[i] for i in order]
        w = (np.arange(len(order), dtype=float) + 1.0 + c.popularity_offset) ** (
            -c.popularity_exponent
        )
        self._pop_cdf = np.cumsum(w / w.sum())

    def _draw_popular(self, rng: np.random.Generator) -> Goal:
        i = int(np.searchsorted(self._pop_cdf, rng.random() * self._pop_cdf[-1], side="right"))
        return self._popular[min(i, len(self._popular) - 1)]

    def _device_type(self, index: int) -> str:
        kinds = {k: w for k, w in self.config.device_types.items() if w > 0}
        if not kinds:
            return ""
        w = np.array(list(kinds.values()), dtype=np.float64)
        rng = np.random.default_rng([self.seed, index, 0, _DEVICE])
        return list(kinds)[int(rng.choice(len(w), p=w / w.sum()))]

    def _make_user(self, index: int) -> _User:
        c = self.config
        rng = np.random.default_rng([self.seed, index, 0, _USER])
        activity = float(rng.lognormal(-0.5 * c.activity_sigma**2, c.activity_sigma))
        personal: dict[str, tuple[str, ...]] = {}
        for slot_type in c.personal_slot_types:
            values = self.corpus.values_by_type.get(slot_type)
            if values:
                k = min(c.personal_values_per_type, len(values))
                picks = rng.choice(len(values), size=k, replace=False)
                personal[slot_type] = tuple(values[int(j)] for j in picks)
        user = _User(
            index=index,
            user_id="u" + _user_hex("user", self.seed, index, 12),
            device_id="d" + _user_hex("device", self.seed, index, 10),
            device_type=self._device_type(index),
            activity=activity,
            personal=personal,
            habits=[],
            habit_cdf=np.ones(1),
        )
        n_habits = 1 + int(rng.poisson(c.habits_mean - 1.0))
        seen: set[GoalKey] = set()
        for _ in range(n_habits * 4):
            if len(user.habits) >= n_habits:
                break
            g = self._personalize(self._draw_popular(rng), user, rng)
            if g.key not in seen:
                seen.add(g.key)
                user.habits.append(g)
        w = (np.arange(len(user.habits), dtype=float) + 1.0) ** (-c.habit_zipf)
        user.habit_cdf = np.cumsum(w / w.sum())
        return user

    def _personalize(self, goal: Goal, user: _User, rng: np.random.Generator) -> Goal:
        slots = list(goal.slots)
        changed = False
        for i, (slot_type, _) in enumerate(slots):
            mine = user.personal.get(slot_type)
            if mine and rng.random() < self.config.personalize_prob:
                w = 1.0 / np.arange(1, len(mine) + 1)
                j = int(rng.choice(len(mine), p=w / w.sum()))
                slots[i] = (slot_type, mine[j])
                changed = True
        return goal.with_slots(slots) if changed else goal

    def _habitual_phrasing(self, user: _User, goal: Goal) -> Realization:
        ck = (goal.key, goal.source_tid)
        hit = user.phrasing.get(ck)
        if hit is None:
            reals = self.corpus.realizations(goal, self.config.rephrase_candidates)
            r = np.random.default_rng(
                stable_seed("qrw-sim-phrasing", self.seed, user.index, goal.goal_id, ck[1])
            ).random(2)
            if len(reals) == 1 or r[0] < self.config.primary_phrasing_prob:
                hit = reals[0]
            else:
                hit = reals[1 + int(r[1] * (len(reals) - 1))]
            user.phrasing[ck] = hit
        return hit

    # ------------------------------------------------------------------ plan
    def _plan(self, user: _User, day: int) -> list[tuple[float, list[tuple[Goal, Realization]]]]:
        """Sessions of the day: ``[(start second of day, [(goal, phrasing), ...]), ...]``."""
        c = self.config
        rng = np.random.default_rng([self.seed, user.index, day, _PLAN])
        if rng.random() >= c.active_day_prob:
            return []
        lam = c.requests_per_user_day * user.activity / c.active_day_prob
        n = max(1, int(rng.poisson(lam)))
        requests: list[tuple[Goal, Realization]] = []
        for _ in range(n):
            if user.habits and rng.random() < c.habit_share:
                j = int(np.searchsorted(user.habit_cdf, rng.random() * user.habit_cdf[-1]))
                goal = user.habits[min(j, len(user.habits) - 1)]
            else:
                goal = self._personalize(self._draw_popular(rng), user, rng)
            phrasing = self._habitual_phrasing(user, goal)
            if rng.random() < c.phrasing_variation:
                reals = self.corpus.realizations(goal, c.rephrase_candidates)
                phrasing = reals[int(rng.integers(len(reals)))]
            requests.append((goal, phrasing))
        groups: list[list[tuple[Goal, Realization]]] = []
        i = 0
        while i < n:
            k = 1 + int(rng.poisson(c.session_extra_requests_mean))
            groups.append(requests[i : i + k])
            i += k
        span = c.day_end_s - c.day_start_s
        max_sessions = max(1, int(span // c.min_session_gap_s))
        if len(groups) > max_sessions:  # merge surplus sessions into the last one
            tail = [r for g in groups[max_sessions - 1 :] for r in g]
            groups = [*groups[: max_sessions - 1], tail]
        free = span - (len(groups) - 1) * c.min_session_gap_s
        offsets = np.sort(rng.random(len(groups))) * free
        return [
            (c.day_start_s + float(offsets[k]) + k * c.min_session_gap_s, g)
            for k, g in enumerate(groups)
        ]

    # ------------------------------------------------------------------ NLU
    def understand(self, text: str, goal: Goal) -> tuple[str, GoalKey | None]:
        """The simulated NLU: ``(outcome, understood goal key)``.

        ``success`` when ``text`` (normalized) is a realization of ``goal``; ``wrong_action``
        when it realizes another goal (the first in sorted order is acted on);
        ``not_understood`` (key ``None``) otherwise.
        """
        parses = self.corpus.grammar.parse(text)
        if goal.key in parses:
            return OUTCOME_SUCCESS, goal.key
        if parses:
            return OUTCOME_WRONG, parses[0]
        return OUTCOME_NOT_UNDERSTOOD, None

    # ------------------------------------------------------------------ day
    def simulate_day(
        self, day: int, rewrite_fn: RewriteFn | None = None, progress: bool = False
    ) -> DayResult:
        """Simulate every user for one day.

        Args:
            day: 1-based day number (timestamps fall on ``start + (day - 1)`` days).
            rewrite_fn: optional rewriter called on every turn's ASR text; exceptions propagate.
            progress: show a tqdm progress bar over users.

        Returns:
            :class:`DayResult` with rows sorted by timestamp.

        Raises:
            ValueError: ``day < 1``.
        """
        if day < 1:
            raise ValueError(f"day must be >= 1 (got {day})")
        base = self.start + timedelta(days=day - 1)
        rows: list[tuple[int, str, dict[str, Any], dict[str, Any]]] = []
        counts = DayCounts()
        for user in tqdm(self.users, desc=f"day {day:02d}", unit="user", disable=not progress):
            self._simulate_user_day(user, day, base, rewrite_fn, rows, counts)
        rows.sort(key=lambda r: (r[0], r[1]))
        return DayResult(day, [r[2] for r in rows], [r[3] for r in rows], counts)

    def _simulate_user_day(
        self,
        user: _User,
        day: int,
        base: datetime,
        rewrite_fn: RewriteFn | None,
        rows: list[tuple[int, str, dict[str, Any], dict[str, Any]]],
        counts: DayCounts,
    ) -> None:
        c = self.config
        rng = np.random.default_rng([self.seed, user.index, day, _REACT])
        prefix = f"sim-s{self.seed}-d{day:02d}-u{user.index:05d}"
        n_turn = 0
        for s_idx, (t0, requests) in enumerate(self._plan(user, day), start=1):
            session_id = f"{prefix}-s{s_idx:02d}"
            history: list[_Turn] = []
            t = t0
            abandoned = False
            for r_idx, (goal, phrasing) in enumerate(requests):
                if abandoned:
                    break
                counts.requests += 1
                if r_idx > 0:
                    t += _uniform(rng, c.next_request_delay_s)
                said = phrasing
                tried = {said.text}
                rephrase_of: str | None = None
                repeat = False
                failures = 0
                while True:
                    n_turn += 1
                    turn_id = f"{prefix}-t{n_turn:04d}"
                    heard = self.channel.transmit(said.text, said.wer, rng, careful=repeat)
                    row: dict[str, Any] = {
                        "turn_id": turn_id,
                        "user_id": user.user_id,
                        "timestamp": "",
                        "utterance": heard.text,
                        "device_id": user.device_id,
                        "locale": c.locale,
                    }
                    if user.device_type:
                        row["device_type"] = user.device_type
                    acted_on = heard.text
                    rewritten = False
                    if rewrite_fn is not None:
                        ctx = (
                            tuple(
                                ContextTurn(h.text, h.response, round(t - h.t, 3), h.barge_in)
                                for h in history[-c.max_context_turns :]
                            )
                            if c.max_context_turns
                            else ()
                        )
                        res = rewrite_fn(
                            RewriteRequest(
                                utterance=heard.text,
                                user_id=user.user_id,
                                context=ctx,
                                device_id=user.device_id,
                                locale=c.locale,
                                request_id=turn_id,
                                device_type=user.device_type,
                            )
                        )
                        if res.rewritten and res.rewrite.strip():
                            rewritten = True
                            acted_on = res.rewrite
                            row["rewrite"] = res.rewrite
                            row["rewrite_source"] = res.source
                        if res.arm:
                            row["arm"] = res.arm
                        if res.model_version:
                            row["model_version"] = res.model_version
                    outcome, key = self.understand(acted_on, goal)
                    # what the request without the rewrite would have done (win/loss judge)
                    original = self.understand(heard.text, goal)[0] if rewritten else outcome
                    intent: str | None
                    scenario: str | None
                    if outcome == OUTCOME_SUCCESS:
                        intent, scenario = goal.intent, goal.scenario
                        response = confirmation(intent, [v for _, v in goal.slots])
                        nlu_conf = rng.beta(14, 2)
                        p_barge = c.barge_in_prob_success
                    elif outcome == OUTCOME_WRONG and key is not None:
                        intent, scenario = self.corpus.goal_of(key)
                        response = confirmation(intent, [v for _, v in key[1]])
                        nlu_conf = rng.beta(6, 4)
                        p_barge = c.barge_in_prob_wrong_action
                    else:
                        intent = scenario = None
                        response = FAILURE_RESPONSE
                        nlu_conf = rng.beta(2, 9)
                        p_barge = c.barge_in_prob_not_understood
                    asr_conf = rng.beta(5, 4) if heard.corrupted else rng.beta(16, 2)
                    barge_in = bool(rng.random() < p_barge)
                    row.update(
                        asr_confidence=round(float(asr_conf), 3),
                        response=response,
                        domain=scenario,
                        intent=intent,
                        nlu_confidence=round(float(nlu_conf), 3),
                        barge_in=barge_in,
                    )
                    defective = outcome != OUTCOME_SUCCESS
                    give_up = False
                    if defective:
                        failures += 1
                        p_abandon = c.abandon_prob + c.abandon_prob_step * (failures - 1)
                        give_up = failures > c.max_retries or bool(rng.random() < p_abandon)
                    ms = round(t * 1000.0)
                    row["timestamp"] = _timestamp(base, ms)
                    truth = {
                        "turn_id": turn_id,
                        "user_id": user.user_id,
                        "day": day,
                        "session_id": session_id,
                        "goal_id": goal.goal_id,
                        "intent": goal.intent,
                        "domain": goal.scenario,
                        "intended_text": said.text,
                        "defective": defective,
                        "outcome": outcome,
                        "rephrase_of": rephrase_of,
                        "error_type": heard.error_type,
                        "asr_mode": heard.mode,
                        "rewritten": rewritten,
                        "original_outcome": original,
                        "abandoned": give_up,
                    }
                    rows.append((ms, turn_id, row, truth))
                    history.append(_Turn(t, heard.text, response, barge_in))
                    counts.turns += 1
                    counts.defects += defective
                    counts.wrong_actions += outcome == OUTCOME_WRONG
                    counts.not_understood += outcome == OUTCOME_NOT_UNDERSTOOD
                    counts.rephrases += rephrase_of is not None
                    counts.barge_ins += barge_in
                    counts.rewrites += rewritten
                    counts.corrupted += heard.corrupted
                    if not defective:
                        break
                    if give_up:
                        counts.abandons += 1
                        abandoned = True
                        break
                    before = said.text
                    said = self._rephrase(goal, said, tried, rng)
                    repeat = said.text == before
                    tried.add(said.text)
                    rephrase_of = turn_id
                    t += _uniform(
                        rng, c.barge_in_rephrase_delay_s if barge_in else c.rephrase_delay_s
                    )

    def _rephrase(
        self, goal: Goal, said: Realization, tried: set[str], rng: np.random.Generator
    ) -> Realization:
        reals = self.corpus.realizations(goal, self.config.rephrase_candidates)
        if len(reals) == 1 or rng.random() < self.config.repeat_prob:
            return said
        fresh = [r for r in reals if r.text not in tried] or [
            r for r in reals if r.text != said.text
        ]
        w = 1.0 / np.arange(1, len(fresh) + 1)
        return fresh[int(rng.choice(len(fresh), p=w / w.sum()))]


def simulate(
    corpus: Path,
    users: int,
    days: int,
    seed: int,
    out: Path,
    start: datetime = DEFAULT_START,
    config: SimulatorConfig | None = None,
    rewrite_fn: RewriteFn | None = None,
    progress: bool = False,
) -> SimulationSummary:
    """Simulate ``users`` users for ``days`` days and write the logs.

    Writes ``out/day-01.jsonl`` ... (turn-log schema v1, one row per turn, sorted by
    timestamp; valid under :class:`offline.schema.TurnValidator`) and ``out/truth.jsonl``
    (one row per turn, same order: ``turn_id``, ``user_id``, ``day``, ``session_id``,
    ``goal_id``, ``intent``, ``domain`` (the goal's SLURP scenario), ``intended_text``,
    ``defective``, ``outcome``, ``rephrase_of``
    (the failed turn this one rephrases, or null), ``error_type``, ``asr_mode``,
    ``rewritten``, ``original_outcome`` (the outcome without the rewrite; equals ``outcome``
    when not rewritten), ``abandoned``). Same corpus, seed and arguments give byte-identical files.

    Args:
        corpus: SLURP ``utterances.jsonl`` (Bastianelli et al., EMNLP 2020).
        users: number of users (>= 1).
        days: number of days (>= 1).
        seed: non-negative seed.
        out: output directory (created).
        start: timezone-aware midnight of day 1.
        config: simulator parameters.
        rewrite_fn: optional rewriter in the loop (see :meth:`Simulator.simulate_day`).
        progress: show progress bars.

    Returns:
        :class:`SimulationSummary`.

    Raises:
        FileNotFoundError: the corpus path does not exist.
        ValueError: a count or the seed is out of range, or ``start`` is naive.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1 (got {days})")
    t_start = time.perf_counter()
    sim = Simulator(corpus, users, seed, config=config, start=start)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(
        p.name for p in out.glob("day-*.jsonl") if p.stem[4:].isdigit() and int(p.stem[4:]) > days
    )
    if stale:
        log.warning("%s holds day files from an earlier, longer run: %s", out, ", ".join(stale))
    total = DayCounts()
    files: list[Path] = []
    truth_path = out / "truth.jsonl"
    with truth_path.open("w", encoding="utf-8") as truth_fh:
        for day in range(1, days + 1):
            res = sim.simulate_day(day, rewrite_fn=rewrite_fn, progress=progress)
            path = out / f"day-{day:02d}.jsonl"
            write_turn_logs(res.turns, path)
            files.append(path)
            for t in res.truth:
                truth_fh.write(json.dumps(t, ensure_ascii=False) + "\n")
            total.add(res.counts)
            log.info(
                "day %02d: %d turns, %d defects (%.1f%%), %d rephrases, %d abandons",
                day,
                res.counts.turns,
                res.counts.defects,
                100.0 * res.counts.defects / max(res.counts.turns, 1),
                res.counts.rephrases,
                res.counts.abandons,
            )
    files.append(truth_path)
    seconds = time.perf_counter() - t_start
    summary = SimulationSummary(
        turns=total.turns,
        users=users,
        days=days,
        defects=total.defects,
        rephrases=total.rephrases,
        barge_ins=total.barge_ins,
        abandons=total.abandons,
        wrong_actions=total.wrong_actions,
        not_understood=total.not_understood,
        rewrites=total.rewrites,
        requests=total.requests,
        files_written=len(files),
        files=tuple(files),
        seconds=seconds,
    )
    log.info(
        "simulated %d turns (%d users x %d days) in %.1f s -> %s",
        summary.turns,
        users,
        days,
        seconds,
        out,
    )
    return summary
