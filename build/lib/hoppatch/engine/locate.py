"""Locate: which layers' attention output carries the composition, by causal patching.

The band edited is the window of `max_layers` layers whose joint patch raises log p(answer) most; the
single-layer sweep is reported alongside (and plotted).

Per layer l, the projection output at the query's last token is replaced by the guide's (the bridge written
out), and the change in log p(answer's first token) is measured. Per example, the unpatched query, one row
per layer and one row per window go in one batched pass; since only the last token differs between rows,
the rest of the prompt runs once (see `tracing.Encoded`).
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
def patched_logprobs(
    lm: LoadedModel, query: str, guide_out: dict[int, torch.Tensor], target: int, rows: Sequence[Sequence[int]]
) -> torch.Tensor:
    """log p(target) at the query's last token, one batch row per set of layers patched with the guide's output.

    Every row is the same prompt, so all but its last token run once, as the batch's shared prefix.
    """
    patches = {}
    for layer in sorted({layer for row in rows for layer in row}):
        index = torch.tensor([r for r, row in enumerate(rows) if layer in row])
        patches[layer] = (index, guide_out[layer].expand(len(index), -1))
    logprobs = torch.log_softmax(patched_last_logits(lm, [query] * len(rows), patches), dim=-1)
    return logprobs[:, target].cpu()


def guide_outputs(lm: LoadedModel, guides: Sequence[str]) -> list[dict[int, torch.Tensor]]:
    """Each guide's projection output at its last token, per layer: [{layer: (out,)}]."""
    recorded = record_attn_out(lm, guides, range(lm.num_layers), stop_early=False).outputs
    return [{layer: out[i] for layer, out in recorded.items()} for i in range(len(guides))]


def band_windows(num_layers: int, width: int) -> list[list[int]]:
    """Every window of `width` consecutive layers, by start."""
    width = min(width, num_layers)
    return [list(range(s, s + width)) for s in range(num_layers - width + 1)]


def locate_layers(
    lm: LoadedModel, queries: Sequence[str], guides: Sequence[str], answers: Sequence[str], max_layers: int
) -> LocateResult:
    """Per example one pass: its unpatched row, a row per single layer, and a row per window of `max_layers`.

    Each example's rows are kept warm on the model (whose base weights every job restores).
    """
    L = lm.num_layers
    windows = band_windows(L, max_layers)
    rows = [[], *([layer] for layer in range(L)), *windows]
    known = lm.warm.locate_rows
    keys = [(max_layers, *key) for key in zip(queries, guides, answers)]
    found = {key: known.get(key) for key in keys}
    todo = [i for i, key in enumerate(keys) if found[key] is None]
    if todo:
        for i, guide_out in zip(todo, guide_outputs(lm, [guides[i] for i in todo])):
            found[keys[i]] = known.put(keys[i], patched_logprobs(lm, queries[i], guide_out, first_token(lm, answers[i]), rows))
    logp = torch.stack([found[key] for key in keys])  # (n, rows)
    effects, joint = logp[:, 1 : L + 1] - logp[:, :1], logp[:, L + 1 :].mean(0)
    band = windows[int(joint.argmax())]
    return LocateResult(effects.tolist(), effects.mean(0).tolist(), band, joint.tolist())
