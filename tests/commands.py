"""Assistant commands written for tests (templates x slots)."""

from __future__ import annotations


def distill_texts() -> list[str]:
    """~500 distinct assistant commands (templates x slots) to distil query towers on."""
    cities = ["wilmington", "wilkesboro", "boston", "austin", "paris", "london", "denver",
              "dallas", "seattle", "chicago", "miami", "tokyo"]  # fmt: skip
    texts = []
    for c in cities:
        texts += [f"what's the weather in {c}", f"weather in {c} tomorrow",
                  f"will it rain in {c}", f"how hot is it in {c} today",
                  f"what time is it in {c}", f"book a flight to {c}",
                  f"find restaurants in {c}", f"how far is {c}"]  # fmt: skip
    for g in ["jazz", "rock", "pop", "classical", "the beatles", "my playlist", "country"]:
        texts += [f"play some {g}", f"play {g} in the kitchen", f"i want to hear {g}"]
    for d in ["lights", "fan", "heating", "radio", "tv", "oven", "coffee machine"]:
        for room in ["", " in the kitchen", " in the bedroom", " in the living room"]:
            texts += [f"turn on the {d}{room}", f"turn off the {d}{room}"]
    for n in ["five", "six", "seven", "eight", "nine", "ten", "eleven"]:
        texts += [f"set an alarm for {n} am", f"wake me up at {n}",
                  f"set a timer for {n} minutes", f"remind me at {n} to call mom"]  # fmt: skip
    for who in ["mom", "dad", "alice", "bob", "the office", "my sister"]:
        texts += [f"call {who}", f"send a message to {who}", f"email {who}"]
    return texts
