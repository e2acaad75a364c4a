"""Logit lens: where in depth the bridge entity and the answer surface at the query's last token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import LoadedModel
from .tracing import hidden_states_last


@dataclass(frozen=True)
class LensCurve:
    """Per residual state (embeddings, then after each layer): probability and rank of a first token."""

    bridge_prob: list[float]
    bridge_rank: list[int]
    answer_prob: list[float]
    answer_rank: list[int]


def first_token(lm: LoadedModel, text: str) -> int:
    return lm.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def logit_lens(lm: LoadedModel, prompts: Sequence[str], bridges: Sequence[str], answers: Sequence[str]) -> list[LensCurve]:
    """Project each residual state through the final norm and the unembedding, one pass for all prompts."""
    states = hidden_states_last(lm, prompts)  # (L+1, B, D)
    # transformers already applies the final norm to the last state it returns
    normed = torch.cat([lm.final_norm(states[:-1].to(lm.model.dtype)).float(), states[-1:]])
    probs = torch.softmax(lm.unembed(normed.to(lm.model.dtype)).float(), dim=-1)  # (L+1, B, V)
    curves = []
    for b, (bridge, answer) in enumerate(zip(bridges, answers)):
        column = probs[:, b]  # (L+1, V)
        tb, ta = first_token(lm, bridge), first_token(lm, answer)
        rank = lambda t: ((column > column[:, t : t + 1]).sum(-1)).tolist()  # noqa: E731
        curves.append(LensCurve(column[:, tb].tolist(), rank(tb), column[:, ta].tolist(), rank(ta)))
    return curves
