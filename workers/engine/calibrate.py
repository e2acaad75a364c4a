"""Calibrate: shrink each example's share of the update to the least that still corrects its query.

The edit moves every query to its guide's output, which is usually more than the answer needs; and in a job
of many examples, every example's share also moves the unrelated queries a little. Per example, the share
(its column of each layer's left factor) is scaled by the smallest step of `SCALES` at which the query gives
its answer, with all the examples scaled at once; steps are then raised for any example the mix leaves
uncorrected. An example that even the full update does not correct is dropped from the delta (scale 0):
its share would move other queries for nothing. When no example is corrected at any step, the update is
kept whole: the job's correction rate then says what happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from .answers import score_answers
from .edit import LayerDelta, WeightSnapshot, apply_layer_delta, low_rank_norm
from .models import LoadedModel
from .tracing import projection_hooks

SCALES = (0.5, 1.0)
"""Coarse on purpose: the least share that corrects the query seldom carries to its paraphrases. On the 20 dev
failures in one job (ridge 0.003, 32 counterfactuals per example), steps 0.2, 0.5, 1.0 scored paraphrase 0.47
and specificity 0.965; 0.3, 0.6, 1.0 gave 0.42 and 0.955; 0.5, 1.0 gave 0.53 and 0.95."""
ROUNDS = 4
"""Rounds of raising the steps of examples the mix of scales leaves uncorrected."""


def scale_examples(deltas: Sequence[LayerDelta], scales: Sequence[float]) -> list[LayerDelta]:
    """The deltas with example i's column scaled by scales[i]; dropped examples' columns removed."""
    keep = [i for i, s in enumerate(scales) if s > 0]
    out = []
    for d in deltas:
        factor = d.left.new_tensor([scales[i] for i in keep])
        left, right = d.left[:, keep] * factor, d.right[keep]
        out.append(LayerDelta(d.layer, d.module, left, right, d.relative_norm * _norm_ratio(d, left, right), d.scaled))
    return out


def _norm_ratio(delta: LayerDelta, left, right) -> float:
    full = delta.norm()
    return low_rank_norm(left, right) / full if full > 0 else 0.0


def mixed_deltas(lm: LoadedModel, deltas: Sequence[LayerDelta], scales: torch.Tensor) -> AbstractContextManager:
    """Row b of a pass runs with Σ_i scales[b, i]·(example i's share) added to each layer's projection.

    The shares are added to the projection's output (x Rᵀ diag(s_b) Lᵀ) rather than to its weight, so one pass
    tries many mixes; `scales` is (B, n) for a batch of B rows.
    """
    dtype = lm.model.dtype
    factors = {d.layer: (d.left.to(lm.device, dtype), d.right.to(lm.device, dtype)) for d in deltas}
    s = scales.to(lm.device, dtype)[:, None, :]

    def hook_for(layer: int):
        left, right = factors[layer]

        def hook(module, args, output):
            return output + ((args[0] @ right.T) * s) @ left.T

        return hook

    return projection_hooks(lm, list(factors), hook_for)


def calibrate(
    lm: LoadedModel,
    deltas: Sequence[LayerDelta],
    snapshot: WeightSnapshot,
    queries: Sequence[str],
    answers: Sequence[Sequence[str]],
) -> tuple[list[LayerDelta], list[float]]:
    """Per-example scales and the scaled deltas, applied to the model (which holds `deltas` on entry).

    `deltas` must have one column per query (a job of at most `max_rank` examples); `answers[i]` are the
    accepted wordings of query i's answer. Every step of `SCALES` is tried in one batched scoring call.
    """
    snapshot.restore()  # the trials add the deltas row by row, in `mixed_deltas`
    n = len(queries)

    def corrected(trials: list[list[float]]) -> list[list[bool]]:
        """For each trial (a scale per example), which queries give their answer."""
        scales = torch.tensor([trial for trial in trials for _ in range(n)])  # row k·n + i: trial k, query i
        scores = score_answers(
            lm, list(queries) * len(trials), list(answers) * len(trials), lambda rows: mixed_deltas(lm, deltas, scales[rows])
        )
        return [[score.gives for score in scores[k * n : (k + 1) * n]] for k in range(len(trials))]

    by_step = corrected([[step] * n for step in SCALES])
    chosen = [next((step for step, ok in zip(SCALES, by_step) if ok[i]), 0.0) for i in range(n)]
    if not any(chosen):
        chosen = [1.0] * n
    for _ in range(ROUNDS if any(0 < c < 1.0 for c in chosen) else 0):
        short = [i for i, ok in enumerate(corrected([chosen])[0]) if not ok and 0 < chosen[i] < 1.0]
        if not short:
            break
        for i in short:
            chosen[i] = min(s for s in SCALES if s > chosen[i])
    scaled = scale_examples(deltas, chosen)
    for delta in scaled:
        apply_layer_delta(lm, delta)
    return scaled, chosen
