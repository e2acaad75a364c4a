"""Locate: which layers' attention output carries the composition, by causal patching.

The band edited is the window of `max_layers` layers whose joint patch raises log p(answer) most; the
single-layer sweep is reported alongside (and plotted).

Per layer l, the projection output at the query's last token is replaced by the guide's (the bridge written
out), and the change in log p(answer's first token) is measured. All layers and examples go in one batched
pass: row (i, l) of the batch is example i's query patched at layer l; row (i, baseline) is unpatched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .lens import first_token
from .models import LoadedModel
from .tracing import patched_last_logits, record_attn_out


@dataclass(frozen=True)
class LocateResult:
    effects: list[list[float]]  # (examples, layers): Δ log p(answer) when layer l is patched
    mean_effect: list[float]  # per layer, over examples
    layers: list[int]  # the chosen band
    band_effects: list[float]  # mean log p(answer) with window s..s+max_layers-1 patched at once, per start s


@torch.no_grad()
def causal_sweep(lm: LoadedModel, queries: Sequence[str], guides: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Δ log p(answer) per example and layer: (n, L)."""
    n, L = len(queries), lm.num_layers
    guide_out = record_attn_out(lm, guides, range(L), stop_early=False).outputs  # {l: (n, out)}
    rows_per_example = L + 1  # baseline, then one row per patched layer
    prompts = [q for q in queries for _ in range(rows_per_example)]
    patches = {}
    for layer in range(L):
        rows = torch.tensor([i * rows_per_example + 1 + layer for i in range(n)])
        patches[layer] = (rows, guide_out[layer])
    logprobs = torch.log_softmax(patched_last_logits(lm, prompts, patches), dim=-1)  # (n·(L+1), V)
    targets = torch.tensor([first_token(lm, a) for a in answers]).repeat_interleave(rows_per_example)
    picked = logprobs.gather(1, targets[:, None].to(logprobs.device)).view(n, rows_per_example)
    return (picked[:, 1:] - picked[:, :1]).cpu()


@torch.no_grad()
def joint_band_effects(
    lm: LoadedModel, queries: Sequence[str], guides: Sequence[str], answers: Sequence[str], width: int
) -> list[float]:
    """Mean log p(answer) when a whole window of `width` layers is patched at once, per window start.

    All windows of all examples go in one batched pass: row (i, s) patches example i at layers s..s+width-1.
    """
    n, L = len(queries), lm.num_layers
    width = min(width, L)
    starts = range(L - width + 1)
    guide_out = record_attn_out(lm, guides, range(L), stop_early=False).outputs
    prompts = [q for q in queries for _ in starts]
    patches = {}
    for layer in range(L):
        rows = [i * len(starts) + s for i in range(n) for s in starts if s <= layer < s + width]
        if rows:
            index = torch.tensor(rows)
            patches[layer] = (index, guide_out[layer][index // len(starts)])
    logprobs = torch.log_softmax(patched_last_logits(lm, prompts, patches), dim=-1)
    targets = torch.tensor([first_token(lm, a) for a in answers]).repeat_interleave(len(starts))
    picked = logprobs.gather(1, targets[:, None].to(logprobs.device)).view(n, len(starts))
    return picked.mean(0).tolist()


def choose_band(mean_effect: Sequence[float], max_layers: int) -> list[int]:
    """The contiguous band of at most `max_layers` layers with the largest summed positive effect."""
    gains = [max(0.0, e) for e in mean_effect]
    width = min(max_layers, len(gains))
    best = max(range(len(gains) - width + 1), key=lambda s: sum(gains[s : s + width]))
    return list(range(best, best + width))


EXAMPLES_PER_PASS = 4
"""Examples per batched patching pass; each brings about L rows, so this bounds the pass's memory."""


def locate_layers(
    lm: LoadedModel, queries: Sequence[str], guides: Sequence[str], answers: Sequence[str], max_layers: int
) -> LocateResult:
    chunks = [slice(i, i + EXAMPLES_PER_PASS) for i in range(0, len(queries), EXAMPLES_PER_PASS)]
    effects = torch.cat([causal_sweep(lm, queries[c], guides[c], answers[c]) for c in chunks])
    mean = effects.mean(0).tolist()
    per_chunk = [(len(queries[c]), joint_band_effects(lm, queries[c], guides[c], answers[c], max_layers)) for c in chunks]
    joint = [sum(n * row[s] for n, row in per_chunk) / len(queries) for s in range(len(per_chunk[0][1]))]
    start = max(range(len(joint)), key=joint.__getitem__)
    band = list(range(start, start + min(max_layers, lm.num_layers)))
    return LocateResult(effects.tolist(), mean, band, joint)
