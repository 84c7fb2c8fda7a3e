"""Prometheus metrics of the online service (library: prometheus-client).

No label carries a user id or an utterance: labels are bounded enums (source, reason, arm).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("qrw_requests_total", "Rewrite requests answered", ["source", "arm"])
PASS_THROUGH = Counter("qrw_pass_through_total", "Requests passed through", ["reason"])
INVALID = Counter("qrw_invalid_requests_total", "Requests rejected as INVALID_ARGUMENT")
STORE_ERRORS = Counter("qrw_store_errors_total", "Redis failures turned into pass-through")
PAIR_CACHE = Counter(
    "qrw_pair_cache_total", "Precomputed-pair lookups by in-process cache result", ["result"]
)
PAIR_CACHE_HIT = PAIR_CACHE.labels("hit")  # bound once: the lookup is on every request
PAIR_CACHE_MISS = PAIR_CACHE.labels("miss")
#: lookups answered "no pair" by the version's pair-source filter (after an answer-cache miss)
PAIR_FILTERED = PAIR_CACHE.labels("filtered")
PERSONAL_CACHE = Counter(
    "qrw_personal_cache_total",
    "Personal-history reads by in-process cache result",
    ["result"],
)
PERSONAL_CACHE_HIT = PERSONAL_CACHE.labels("hit")
PERSONAL_CACHE_MISS = PERSONAL_CACHE.labels("miss")
#: reads answered "no history" by the version's user filter (after a cache miss)
PERSONAL_FILTERED = PERSONAL_CACHE.labels("filtered")
LATENCY = Histogram(
    "qrw_rewrite_latency_seconds",
    "Time inside the Rewriter per request",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.004, 0.006, 0.01, 0.025, 0.05, 0.1, 0.5),
)
