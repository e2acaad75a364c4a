"""Warm models: an LRU cache of loaded models, bounded by count, owned by one worker process."""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from hoppatch.engine.models import LoadedModel, load_model, resolve_model_path
from hoppatch.engine.warm import WarmBudget, WarmState
from .metrics import MODEL_CACHE, MODEL_LOAD_SECONDS, MODELS_WARM


class ModelCache:
    def __init__(
        self,
        capacity: int = 1,
        model_roots: list[Path] | None = None,
        device: str | None = None,
        loader: Callable[..., LoadedModel] = load_model,
        warm_budget: WarmBudget | None = None,
    ):
        self.warm_budget = warm_budget or WarmBudget()
        self.device = device
        self.capacity = capacity
        self.model_roots = model_roots
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, ref: str) -> LoadedModel:
        if ref in self._models:
            MODEL_CACHE.labels("hit").inc()
            self._models.move_to_end(ref)
            return self._models[ref]
        MODEL_CACHE.labels("miss").inc()
        resolve_model_path(ref, self.model_roots)  # a model that cannot be found fails before anything is evicted
        while len(self._models) >= self.capacity:
            self._models.popitem(last=False)
            gc.collect()
        started = time.perf_counter()
        lm = self._loader(ref, model_roots=self.model_roots, device=self.device)
        lm.warm = WarmState(self.warm_budget)
        MODEL_LOAD_SECONDS.observe(time.perf_counter() - started)
        self._models[ref] = lm
        MODELS_WARM.set(len(self._models))
        return lm

    def peek(self, ref: str) -> LoadedModel | None:
        """The warm model, if any, without counting a lookup."""
        return self._models.get(ref)

    def discard(self, ref: str) -> None:
        if self._models.pop(ref, None) is not None:
            gc.collect()
        MODELS_WARM.set(len(self._models))

    def warm_states(self) -> list[WarmState]:
        """Each warm model's caches, for the worker's metrics."""
        return [lm.warm for lm in self._models.values()]

    def __contains__(self, ref: str) -> bool:
        return ref in self._models
