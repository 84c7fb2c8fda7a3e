"""Experiment arms: deterministic assignment of users to arms and the layers each arm applies.

A user's arm comes from a salted SHA-256 of ``salt``, the experiment name and the user id,
mapped to ``[0, 1)`` and cut by the cumulative arm shares (the usual hash bucketing of online
experiments; Kohavi, Tang & Xu, *Trustworthy Online Controlled Experiments*, 2020, ch. 14).
The same user always lands in the same arm of one experiment; a new experiment name reshuffles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rewrite.config import ExperimentSettings
from rewrite.types import InvalidRequestError


@dataclass(frozen=True)
class Arm:
    """An arm as the pipeline sees it: its name and the layers it may rewrite with."""

    name: str
    layers: frozenset[str]


class UnknownArmError(InvalidRequestError):
    """A request named an arm the experiment does not have."""


#: Characters of an unknown arm name quoted back in the error message (the name comes from
#: the caller and may be arbitrarily long; the message travels in a gRPC trailer).
MAX_QUOTED_ARM_CHARS = 64


def _quote_arm(name: str) -> str:
    """``repr`` of an arm name, cut to :data:`MAX_QUOTED_ARM_CHARS` with its length noted."""
    if len(name) <= MAX_QUOTED_ARM_CHARS:
        return repr(name)
    return f"{name[:MAX_QUOTED_ARM_CHARS]!r}… ({len(name)} chars)"


class ArmAssigner:
    """Resolves a request's arm.

    Args:
        settings: the ``experiment:`` section.
    """

    def __init__(self, settings: ExperimentSettings) -> None:
        self.settings = settings
        self.arms = {name: Arm(name, frozenset(a.layers)) for name, a in settings.arms.items()}
        edges: list[tuple[float, str]] = []
        acc = 0.0
        for name, arm in settings.arms.items():
            acc += arm.share
            edges.append((acc, name))
        self._edges = edges

    def bucket(self, user_id: str) -> float:
        """The user's position in ``[0, 1)``: SHA-256 of ``salt:experiment:user_id``."""
        key = f"{self.settings.salt}:{self.settings.name}:{user_id}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64

    def assign(self, user_id: str) -> Arm:
        """The arm of ``user_id`` under the experiment (ignores ``enabled``)."""
        u = self.bucket(user_id)
        for edge, name in self._edges:
            if u < edge:
                return self.arms[name]
        return self.arms[self._edges[-1][1]]

    def resolve(self, user_id: str, requested: str = "") -> Arm:
        """The arm to apply: the requested one, else the assigned one when the experiment is
        enabled, else ``default_arm``.

        Raises:
            UnknownArmError: ``requested`` is not an arm of the experiment.
        """
        if requested:
            arm = self.arms.get(requested)
            if arm is None:
                raise UnknownArmError(
                    f"unknown arm {_quote_arm(requested)}; known: {sorted(self.arms)}"
                )
            return arm
        if self.settings.enabled:
            return self.assign(user_id)
        return self.arms[self.settings.default_arm]
