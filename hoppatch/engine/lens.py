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


LENS_ROWS = 256
"""Residual states unembedded at a time: a whole job's (layers + 1) × prompts at once would hold gigabytes of
logits for a file of a few hundred failures on a large vocabulary."""


@torch.no_grad()
def logit_lens(lm: LoadedModel, prompts: Sequence[str], bridges: Sequence[str], answers: Sequence[str]) -> list[LensCurve]:
    """Project each residual state through the final norm and the unembedding; one pass for all prompts."""
    states = hidden_states_last(lm, prompts)  # (L+1, B, D)
    # transformers already applies the final norm to the last state it returns
    normed = torch.cat([lm.final_norm(states[:-1].to(lm.model.dtype)).float(), states[-1:]])
    by_prompt = normed.transpose(0, 1).contiguous()  # (B, L+1, D)
    per_block = max(1, LENS_ROWS // by_prompt.shape[1])
    curves = []
    for at in range(0, len(prompts), per_block):
        block = by_prompt[at : at + per_block]
        probs = torch.softmax(lm.logits(block.flatten(0, 1)).float(), dim=-1).view(*block.shape[:2], -1)  # (b, L+1, V)
        for column, bridge, answer in zip(probs, bridges[at : at + per_block], answers[at : at + per_block]):
            curves.append(_curve(column, first_token(lm, bridge), first_token(lm, answer)))
    return curves


def _curve(probs: torch.Tensor, bridge: int, answer: int) -> LensCurve:
    """One prompt's curves from its per-state probabilities (L+1, V)."""

    def rank(token: int) -> list[int]:
        return (probs > probs[:, token : token + 1]).sum(-1).tolist()

    return LensCurve(probs[:, bridge].tolist(), rank(bridge), probs[:, answer].tolist(), rank(answer))
