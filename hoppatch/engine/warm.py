"""What a warm model keeps between jobs, each cache typed, keyed and held within its own byte budget.

Everything here is a reading of the model's base weights (every job restores them), so an entry stays valid
for as long as the model is loaded; least-recently-used entries are evicted when a cache is over its budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MiB = 1 << 20


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


ENTRY_BYTES = 512
"""What one entry costs besides its value's own bytes: its key (prompt strings), the tensor's header, the
map's slot. Counted so that a cache of many small entries stays within its budget too."""


class ByteLru(Generic[K, V]):
    """A least-recently-used map whose entries (`size_of` each, plus `ENTRY_BYTES`) add up to at most
    `budget` bytes."""

    def __init__(self, name: str, budget: int, size_of: Callable[[V], int]):
        self.name, self.budget, self._size_of = name, budget, size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V) -> V:
        size = self._size_of(value) + ENTRY_BYTES
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


@dataclass(frozen=True)
class WarmBudget:
    """Bytes each cache may hold. Readings are small host objects, sized by a fixed estimate each."""

    readings: int = 64 * MiB
    locate_rows: int = 64 * MiB
    counterfactual_keys: int = 256 * MiB
    key_statistics: int = 1024 * MiB


    @classmethod
    def within(cls, total: int) -> WarmBudget:
        """The default split, scaled so that every cache together holds at most `total` bytes."""
        default = cls()
        whole = default.readings + default.locate_rows + default.counterfactual_keys + default.key_statistics
        share = lambda part: max(1, part * total // whole)  # noqa: E731
        return cls(share(default.readings), share(default.locate_rows), share(default.counterfactual_keys), share(default.key_statistics))

    @property
    def total(self) -> int:
        return self.readings + self.locate_rows + self.counterfactual_keys + self.key_statistics


READING_BYTES = 2048
"""An estimate of one diagnosis or probe reading on the host (a few floats, strings and token ids)."""


@dataclass
class WarmState:
    """Per loaded model: readings of its base weights worth keeping for the next job."""

    budget: WarmBudget = field(default_factory=WarmBudget)
    diagnoses: ByteLru = field(init=False)
    """(preamble, example's prompts and answers) → `Diagnosis`."""
    readings: ByteLru = field(init=False)
    """(preamble, `Probe`) → its `Reading` on the base model."""
    locate_rows: ByteLru = field(init=False)
    """(max_layers, query, guide, answer) → log p(answer) per patched row, (rows,)."""
    counterfactual_keys: ByteLru = field(init=False)
    """(prompt, layer) → the projection's input at its last token, (in,)."""
    key_statistics: ByteLru = field(init=False)
    """(statistics id, layer) → `KeyStatistics` of the preserved prompts."""
    fluency: object | None = None
    """The base model's `FluencyReading`."""
    fluency_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer → that layer's input over the fluency text on the base model, (1, T, D): an edited model's
    reading resumes there, since nothing below its lowest edited layer differs."""
    weight_hashes: dict[str, str] = field(default_factory=dict)
    """Parameter name → sha256 of its base value: part of the statistics' disk-cache key."""
    unverified: dict[str, str] = field(default_factory=dict)
    """Parameter name → base sha256 of each weight an edit touched and nobody has checked since."""

    def __post_init__(self) -> None:
        b = self.budget
        self.diagnoses = ByteLru("diagnoses", b.readings // 2, lambda _: READING_BYTES)
        self.readings = ByteLru("readings", b.readings // 2, lambda _: READING_BYTES)
        self.locate_rows = ByteLru("locate_rows", b.locate_rows, tensor_bytes)
        self.counterfactual_keys = ByteLru("counterfactual_keys", b.counterfactual_keys, tensor_bytes)
        self.key_statistics = ByteLru("key_statistics", b.key_statistics, lambda s: s.nbytes())

    def caches(self) -> list[ByteLru]:
        return [self.diagnoses, self.readings, self.locate_rows, self.counterfactual_keys, self.key_statistics]

    def clear(self) -> None:
        for cache in self.caches():
            cache.clear()
        self.fluency = None
        self.fluency_inputs.clear()
        self.weight_hashes.clear()
        self.unverified.clear()
