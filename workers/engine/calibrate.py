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

from .answers import score_answers
from .edit import LayerDelta, WeightSnapshot, apply_layer_delta
from .models import LoadedModel

SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
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
    full = delta.dense().norm().item()
    return (left @ right).norm().item() / full if full > 0 else 0.0


def calibrate(
    lm: LoadedModel,
    deltas: Sequence[LayerDelta],
    snapshot: WeightSnapshot,
    queries: Sequence[str],
    answers: Sequence[Sequence[str]],
) -> tuple[list[LayerDelta], list[float]]:
    """Per-example scales and the scaled deltas, applied to the model (which holds `deltas` on entry).

    `deltas` must have one column per query (a job of at most `max_rank` examples); `answers[i]` are the
    accepted wordings of query i's answer.
    """

    def apply(scales: Sequence[float]) -> list[LayerDelta]:
        snapshot.restore()
        scaled = scale_examples(deltas, scales)
        for delta in scaled:
            apply_layer_delta(lm, delta)
        return scaled

    def corrected() -> list[bool]:
        return [score.gives for score in score_answers(lm, queries, answers)]

    n = len(queries)
    chosen = [0.0] * n
    for step in reversed(SCALES):
        apply([step] * n)
        chosen = [step if ok else c for ok, c in zip(corrected(), chosen)]
    if not any(chosen):
        return list(apply([1.0] * n)), [1.0] * n
    scaled = apply(chosen)
    for _ in range(ROUNDS):
        short = [i for i, ok in enumerate(corrected()) if not ok and 0 < chosen[i] < 1.0]
        if not short:
            break
        for i in short:
            chosen[i] = min(s for s in SCALES if s > chosen[i])
        scaled = apply(chosen)
    return scaled, chosen
