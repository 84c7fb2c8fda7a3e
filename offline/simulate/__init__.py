"""User-traffic simulator v1: SLURP goals, habitual users, a noisy ASR channel with recurring
errors, a template NLU, and barge-ins, rephrases and abandons. See :func:`simulate`.

Sources: SLURP (Bastianelli et al., EMNLP 2020); CMU Pronouncing Dictionary via ``pronouncing``.
"""

from offline.simulate.asr import ChannelConfig, NoisyChannel, PhoneticNeighbours
from offline.simulate.core import (
    FAILURE_RESPONSE,
    DayCounts,
    DayResult,
    RewriteFn,
    SimulationSummary,
    Simulator,
    SimulatorConfig,
    simulate,
)
from offline.simulate.corpus import (
    Goal,
    Realization,
    SlurpCorpus,
    TemplateGrammar,
    task_success_oracle,
)

__all__ = [
    "FAILURE_RESPONSE",
    "ChannelConfig",
    "DayCounts",
    "DayResult",
    "Goal",
    "NoisyChannel",
    "PhoneticNeighbours",
    "Realization",
    "RewriteFn",
    "SimulationSummary",
    "Simulator",
    "SimulatorConfig",
    "SlurpCorpus",
    "TemplateGrammar",
    "simulate",
    "task_success_oracle",
]
