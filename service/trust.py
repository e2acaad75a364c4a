"""What an API process trusts for a while without asking again: the API keys it has looked up, the model
references it has checked. Per process, so a revoked key or a change on disk is seen within that time."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_clock = time.monotonic


class Trusted(Generic[K, V]):
    """Values trusted for `seconds` after they were put. It holds only what was found valid, so a full cache
    (`size` entries) simply starts over."""

    def __init__(self, seconds: float, size: int) -> None:
        self.seconds = seconds
        self.size = size
        self._entries: dict[K, tuple[V, float]] = {}

    def get(self, key: K) -> V | None:
        """The value put under `key`, or None where there is none or its time is up."""
        value, until = self._entries.get(key, (None, 0.0))
        return value if _clock() < until else None

    def put(self, key: K, value: V) -> V:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key] = (value, _clock() + self.seconds)
        return value

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)
