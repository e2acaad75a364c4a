"""Calibrate: shrink each example's share of the update to the least that still corrects its query.

The edit moves every query to its guide's output, which is usually more than the answer needs; and in a job
of many examples, every example's share also moves the unrelated queries a little. Per example, the share
(its columns of each layer's left factor: one, or more with its answer's later words) is scaled by the
smallest step (`EditConfig.calibration_steps`) at which the query gives its answer, with all the examples
scaled at once; steps are then raised for any example the mix leaves uncorrected. An example that even the
full update does not correct gets scale 0: its share would move other queries for nothing (`pipeline`
drops it, unless no example is corrected at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from .answers import score_answers
from .edit import LayerDelta, low_rank_norm
from .models import LoadedModel
from .tracing import projection_hooks

ROUNDS = 4
"""Rounds of raising the steps of examples the mix of scales leaves uncorrected."""


def scale_examples(deltas: Sequence[LayerDelta], scales: Sequence[float], owners: Sequence[int] | None = None) -> list[LayerDelta]:
    """The deltas with each column scaled by its example's scale (column j belongs to example `owners[j]`,
    by default example j); dropped examples' columns removed."""
    owners = range(len(scales)) if owners is None else owners
    keep = [j for j, i in enumerate(owners) if scales[i] > 0]
    out = []
    for d in deltas:
        factor = d.left.new_tensor([scales[owners[j]] for j in keep])
        left, right = d.left[:, keep] * factor, d.right[keep]
        out.append(LayerDelta(d.layer, d.module, left, right, d.relative_norm * _norm_ratio(d, left, right), d.scaled))
    return out


def _norm_ratio(delta: LayerDelta, left, right) -> float:
    full = delta.norm()
    return low_rank_norm(left, right) / full if full > 0 else 0.0


def mixed_deltas(
    lm: LoadedModel, deltas: Sequence[LayerDelta], scales: torch.Tensor, owners: Sequence[int] | None = None
) -> AbstractContextManager:
    """Row b of a pass runs with Σ_i scales[b, i]·(example i's share) added to each layer's projection.

    The shares are added to the projection's output (x Rᵀ diag(s_b) Lᵀ) rather than to its weight, so one pass
    tries many mixes; `scales` is (B, n) for a batch of B rows and n examples. Column j of the deltas belongs
    to example `owners[j]` (by default example j).
    """
    dtype = lm.model.dtype
    factors = {d.layer: (d.left.to(lm.device, dtype), d.right.to(lm.device, dtype)) for d in deltas}
    columns = scales if owners is None else scales[:, list(owners)]
    s = columns.to(lm.device, dtype)[:, None, :]

    def hook_for(layer: int):
        left, right = factors[layer]

        def hook(module, args, output):
            return output + ((args[0] @ right.T) * s) @ left.T

        return hook

    return projection_hooks(lm, list(factors), hook_for)


def calibrate(
    lm: LoadedModel,
    deltas: Sequence[LayerDelta],
    queries: Sequence[str],
    answers: Sequence[Sequence[str]],
    steps: Sequence[float],
    owners: Sequence[int] | None = None,
) -> list[float]:
    """Each example's share of the update: the least of `steps` at which its query gives its answer, with
    every example scaled at once; 0 for an example that even the largest step does not correct.

    The model holds its base weights: every trial adds the deltas row by row (`mixed_deltas`), all of
    `steps` in one batched scoring call. `deltas` must not be compressed (at most `max_rank` columns): column j
    belongs to query `owners[j]`, by default query j. `answers[i]` are the accepted wordings of query i's answer.
    """
    n = len(queries)

    def corrected(trials: list[list[float]]) -> list[list[bool]]:
        """For each trial (a scale per example), which queries give their answer."""
        scales = torch.tensor([trial for trial in trials for _ in range(n)])  # row k·n + i: trial k, query i
        scores = score_answers(
            lm, list(queries) * len(trials), list(answers) * len(trials), lambda rows: mixed_deltas(lm, deltas, scales[rows], owners),
            edited_from=min(d.layer for d in deltas),
        )
        return [[score.gives for score in scores[k * n : (k + 1) * n]] for k in range(len(trials))]

    by_step = corrected([[step] * n for step in steps])
    chosen = [next((step for step, ok in zip(steps, by_step) if ok[i]), 0.0) for i in range(n)]
    top = max(steps)
    for _ in range(ROUNDS if any(0 < c < top for c in chosen) else 0):
        short = [i for i, ok in enumerate(corrected([chosen])[0]) if not ok and 0 < chosen[i] < top]
        if not short:
            break
        for i in short:
            chosen[i] = min(s for s in steps if s > chosen[i])
    return chosen
