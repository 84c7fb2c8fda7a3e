"""Guardrails the nightly job runs before it publishes a new version (``guardrails:``).

Two checks compare the freshly mined rewrite pairs with what is known to be good:

- **canary**: a canary list (``guardrails.canary_file``; known-good, well-formed commands, one
  per line, ``#`` starts a comment) is normalized with the service's
  :func:`~rewrite.normalize.normalize_utterance`; a canary that is the *source* of a new pair
  would be rewritten by the service, which is the violation. Pairs whose *rewrite* is a
  canary are fine. At most ``max_canary_rewrites`` violations are allowed (default 0);
  canary precision = share of canaries left alone.
- **changed_share**: against the active version's pairs, ``(changed + removed) /
  active_pairs`` — a source whose rewrite differs or that disappeared — must not exceed
  ``max_changed_share``, and ``added / active_pairs`` (new sources) must not exceed
  ``max_added_share``. Growth is kept apart from churn: a self-learning system adds pairs
  every night (measured in the closed loop: +13 on 24 pairs, all fine), while rewrites that
  change under existing traffic are the risk. Skipped (passes) when nothing is active or the
  active version has fewer than ``min_pairs_for_change_check`` pairs.

:func:`check_before_publish` runs both and returns a :class:`GuardrailResult`; the job refuses
to publish when it failed (unless forced) and records ``result.to_dict()`` in ``report.json``.
Only counts and canary texts are reported or logged, never users' utterances.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from offline.markov import RewritePair
from offline.publish import PublishError
from rewrite import keyspace
from rewrite.config import PROJECT_ROOT, GuardrailSettings
from rewrite.normalize import normalize_utterance

log = logging.getLogger(__name__)

_SCAN_COUNT = 1000
_HGET_BATCH = 2000
_EXAMPLES = 5


class PublishRefusedError(PublishError):
    """The guardrails refused a publish; the previous version stays active.

    Attributes:
        reason: why (the failed checks with their numbers).
        result: the :class:`GuardrailResult`.
        report: the job's report (``offline.job.NightlyReport``), already written to
            ``report.json``, or None.
    """

    def __init__(self, reason: str, result: GuardrailResult, report: Any = None) -> None:
        super().__init__(f"publish refused by guardrails: {reason}")
        self.reason = reason
        self.result = result
        self.report = report


@dataclass
class GuardrailResult:
    """Outcome of the pre-publish checks.

    Attributes:
        passed: every enabled check passed (True when guardrails are disabled).
        refused: the reason a publish is refused, ``None`` when it passed.
        checks: per check: ``passed``, the measured values and the threshold.
        enabled: ``guardrails.enabled``.
        forced: the publish went ahead despite a failure (``--force``).
    """

    passed: bool
    refused: str | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    enabled: bool = True
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` form: ``{"refused": reason | None, "checks": {...}, ...}``."""
        return {
            "enabled": self.enabled,
            "passed": self.passed,
            "refused": self.refused,
            "forced": self.forced,
            "checks": self.checks,
        }


def resolve_canary_file(path: Path) -> Path:
    """Where the canary file is: as given when absolute or present relative to the working
    directory, else relative to the project root.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(path)
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"guardrails.canary_file not found: {path}")
        return path
    alt = PROJECT_ROOT / path
    if not alt.exists():
        raise FileNotFoundError(f"guardrails.canary_file not found: {path} (nor {alt})")
    return alt


def load_canaries(path: Path) -> list[str]:
    """Normalized canary utterances of a file, in file order, without duplicates.

    Blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: the file does not exist (see :func:`resolve_canary_file`).
        ValueError: the file holds no canary.
    """
    resolved = resolve_canary_file(path)
    seen: dict[str, None] = {}
    for line in resolved.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        norm = normalize_utterance(text)
        if norm:
            seen.setdefault(norm, None)
    if not seen:
        raise ValueError(f"canary file {resolved} holds no utterance")
    return list(seen)


def active_pairs(client: redis.Redis) -> tuple[str | None, dict[str, str]]:
    """The active version id and its pairs ``{source: rewrite}`` (``(None, {})`` when none).

    Args:
        client: redis-py client with ``decode_responses=True``.

    Raises:
        redis.RedisError, OSError: Redis failed.
    """
    active = client.get(keyspace.ACTIVE)
    if not active:
        return None, {}
    version = str(active)
    prefix = keyspace.pair_key(version, "")
    keys = [str(k) for k in client.scan_iter(match=prefix + "*", count=_SCAN_COUNT)]
    pairs: dict[str, str] = {}
    for i in range(0, len(keys), _HGET_BATCH):
        batch = keys[i : i + _HGET_BATCH]
        pipe = client.pipeline(transaction=False)
        for k in batch:
            pipe.hget(k, "rewrite")
        for k, rw in zip(batch, pipe.execute(), strict=True):
            if rw is not None:
                pairs[k[len(prefix) :]] = str(rw)
    return version, pairs


def canary_check(
    pairs: Sequence[RewritePair], canaries: Sequence[str], max_rewrites: int
) -> dict[str, Any]:
    """Canary utterances that are the source of a new pair (would be rewritten).

    Returns:
        ``{"passed", "canaries", "rewritten", "max_canary_rewrites", "precision",
        "examples"}``; ``precision`` = canaries not rewritten / canaries (1.0 for none);
        ``examples``: up to 5 rewritten canaries (canary texts, not user data).
    """
    canary_set = set(canaries)
    hit = sorted({p.source for p in pairs if p.source in canary_set})
    n = len(canary_set)
    return {
        "passed": len(hit) <= max_rewrites,
        "canaries": n,
        "rewritten": len(hit),
        "max_canary_rewrites": max_rewrites,
        "precision": round((n - len(hit)) / n, 6) if n else 1.0,
        "examples": hit[:_EXAMPLES],
    }


def changed_share_check(
    pairs: Sequence[RewritePair],
    active: Mapping[str, str],
    active_version: str | None,
    max_share: float,
    min_pairs: int,
    max_added_share: float = float("inf"),
) -> dict[str, Any]:
    """How much of the active version the new pairs change.

    Args:
        pairs: the new pairs.
        active: the active version's ``{source: rewrite}``.
        active_version: its id (None = nothing published).
        max_share: ``guardrails.max_changed_share``.
        min_pairs: ``guardrails.min_pairs_for_change_check``.
        max_added_share: ``guardrails.max_added_share``.

    Returns:
        ``{"passed", "skipped", "active_version", "active_pairs", "new_pairs", "changed",
        "removed", "added", "share", "added_share", "max_changed_share", "max_added_share"}``;
        ``skipped`` is a reason or None, ``share`` = (changed + removed) / active_pairs and
        ``added_share`` = added / active_pairs (None when skipped).
    """
    new = {p.source: p.rewrite for p in pairs}
    changed = sum(1 for s, rw in active.items() if s in new and new[s] != rw)
    removed = sum(1 for s in active if s not in new)
    added = sum(1 for s in new if s not in active)
    out: dict[str, Any] = {
        "passed": True,
        "skipped": None,
        "active_version": active_version,
        "active_pairs": len(active),
        "new_pairs": len(new),
        "changed": changed,
        "removed": removed,
        "added": added,
        "share": None,
        "added_share": None,
        "max_changed_share": max_share,
        "max_added_share": max_added_share,
    }
    if active_version is None:
        out["skipped"] = "no active version"
    elif len(active) < min_pairs:
        out["skipped"] = f"active version has {len(active)} < {min_pairs} pairs"
    else:
        share = (changed + removed) / len(active)
        added_share = added / len(active)
        out["share"] = round(share, 6)
        out["added_share"] = round(added_share, 6)
        out["passed"] = share <= max_share and added_share <= max_added_share
    return out


def evaluate_guardrails(
    pairs: Sequence[RewritePair],
    canaries: Sequence[str],
    active: Mapping[str, str],
    active_version: str | None,
    settings: GuardrailSettings,
) -> GuardrailResult:
    """Run both checks on in-memory inputs (no Redis); see the module docstring.

    Returns:
        :class:`GuardrailResult`; ``refused`` names every failed check with its numbers.
    """
    if not settings.enabled:
        return GuardrailResult(passed=True, enabled=False)
    canary = canary_check(pairs, canaries, settings.max_canary_rewrites)
    change = changed_share_check(
        pairs,
        active,
        active_version,
        settings.max_changed_share,
        settings.min_pairs_for_change_check,
        settings.max_added_share,
    )
    reasons = []
    if not canary["passed"]:
        reasons.append(
            f"{canary['rewritten']} canary utterance(s) would be rewritten (max "
            f"{settings.max_canary_rewrites}; canary precision {canary['precision']:.3f}), "
            f"e.g. {canary['examples'][:3]}"
        )
    if not change["passed"]:
        reasons.append(
            f"changed-pair share {change['share']:.3f} (max {settings.max_changed_share}), "
            f"added-pair share {change['added_share']:.3f} (max {settings.max_added_share}): "
            f"{change['changed']} changed, {change['removed']} removed, {change['added']} "
            f"added vs {change['active_pairs']} pairs of active version {active_version}"
        )
    return GuardrailResult(
        passed=not reasons,
        refused="; ".join(reasons) or None,
        checks={"canary": canary, "changed_share": change},
    )


def check_before_publish(
    client: redis.Redis,
    pairs: Sequence[RewritePair],
    settings: GuardrailSettings,
    canaries: Sequence[str] | None = None,
) -> GuardrailResult:
    """Run the guardrails against the active version in Redis.

    Args:
        client: redis-py client (``decode_responses=True``).
        pairs: the pairs about to be published.
        settings: ``guardrails:`` section.
        canaries: normalized canaries (default: :func:`load_canaries` of
            ``settings.canary_file``).

    Returns:
        :class:`GuardrailResult` (logged at INFO; the caller logs a refusal).

    Raises:
        FileNotFoundError, ValueError: the canary file is missing or empty.
        redis.RedisError, OSError: Redis failed while reading the active version.
    """
    if not settings.enabled:
        log.info("guardrails disabled: publishing without checks")
        return GuardrailResult(passed=True, enabled=False)
    if canaries is None:
        canaries = load_canaries(settings.canary_file)
    version, active = active_pairs(client)
    result = evaluate_guardrails(pairs, canaries, active, version, settings)
    if result.passed:
        change = result.checks["changed_share"]
        log.info(
            "guardrails passed: %d/%d canaries rewritten, changed share %s (%s)",
            result.checks["canary"]["rewritten"],
            result.checks["canary"]["canaries"],
            change["share"],
            change["skipped"] or f"vs {version}",
        )
    else:  # the caller decides: the job logs the refusal (or the override) at WARNING
        log.info("guardrails failed: %s", result.refused)
    return result
