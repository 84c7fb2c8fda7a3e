"""How often a real Redis served a command (``INFO commandstats``): tests that a cache or a
filter answered without Redis count the server's own calls, not a mock's."""

from __future__ import annotations

import redis


def command_calls(client: redis.Redis, command: str) -> int:
    """Calls of ``command`` (lower case, e.g. ``"hgetall"``) since the server started."""
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
