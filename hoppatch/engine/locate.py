"""Locate: which layers' attention output carries the composition, by causal patching.

The band edited is the window of `max_layers` layers whose joint patch raises log p(answer) most; the
single-layer sweep is reported alongside (and plotted).

Per layer l, the projection output at the query's last token is replaced by the guide's (the bridge written
out), and the change in log p(answer's first token) is measured. Per example, the unpatched query, one row
per layer and one row per window go in one batched pass; since only the last token differs between rows,
the rest of the prompt runs once (see `tracing.Encoded`). Every example's rows are then unembedded together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .lens import first_token
from .models import LoadedModel
from .tracing import patched_last_states, record_attn_out


@dataclass(frozen=True)
class LocateResult:
    effects: list[list[float]]  # (examples, layers): Δ log p(answer) when layer l is patched
    mean_effect: list[float]  # per layer, over examples
    layers: list[int]  # the chosen band
    band_effects: list[float]  # mean log p(answer) with window s..s+max_layers-1 patched at once, per start s


LOGPROB_ROWS = 256
"""Rows unembedded together when the sweep's log-probabilities are read: many examples' rows fill one large
product (a small model's vocabulary-wide product runs about twice as fast on 256 rows as on one example's
34), while a block's logits stay a few hundred MB."""


@torch.no_grad()
def patched_states(lm: LoadedModel, query: str, guide_out: dict[int, torch.Tensor], rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """The final state at the query's last token (R, D), one batch row per set of layers patched with the
    guide's output.

    Every row is the same prompt, so all but its last token run once, as the batch's shared prefix.
    """
    patches = {}
    for layer in sorted({layer for row in rows for layer in row}):
        index = torch.tensor([r for r, row in enumerate(rows) if layer in row])
        patches[layer] = (index, guide_out[layer].expand(len(index), -1))
    return patched_last_states(lm, [query] * len(rows), patches)


@torch.no_grad()
def target_logprobs(lm: LoadedModel, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of final states (N, D), for its token in `targets` (N,): (N,) on the CPU."""
    out = []
    for at in range(0, states.shape[0], LOGPROB_ROWS):
        logits = lm.logits(states[at : at + LOGPROB_ROWS]).float()
        chosen = logits.gather(1, targets[at : at + LOGPROB_ROWS, None].to(logits.device))[:, 0]
        out.append((chosen - torch.logsumexp(logits, -1)).cpu())
    return torch.cat(out)


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
        outputs = guide_outputs(lm, [guides[i] for i in todo])
        states = [patched_states(lm, queries[i], guide_out, rows) for i, guide_out in zip(todo, outputs)]
        targets = torch.tensor([first_token(lm, answers[i]) for i in todo]).repeat_interleave(len(rows))
        for i, logp in zip(todo, target_logprobs(lm, torch.cat(states), targets).split(len(rows))):
            found[keys[i]] = known.put(keys[i], logp.clone())  # its own storage, sized as it is
    logp = torch.stack([found[key] for key in keys])  # (n, rows)
    effects, joint = logp[:, 1 : L + 1] - logp[:, :1], logp[:, L + 1 :].mean(0)
    band = windows[int(joint.argmax())]
    return LocateResult(effects.tolist(), effects.mean(0).tolist(), band, joint.tolist())
