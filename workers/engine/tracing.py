"""Batched forward passes that read or overwrite the attention output projection at the last token.

Every prompt batch is left-padded, so index -1 is each prompt's real last token: the place CREME reads
its key k (the projection's input) and its target g (the projection's output), and where locate patches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from .models import LoadedModel


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)


def encode_ids(lm: LoadedModel, sequences: Sequence[Sequence[int]]) -> Encoded:
    """Left-pad token-id sequences into one batch on the model's device."""
    T = max(len(s) for s in sequences)
    pad = lm.tokenizer.pad_token_id
    ids = torch.full((len(sequences), T), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, T - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, T - len(seq) :] = 1
    return Encoded(ids.to(lm.device), mask.to(lm.device))


def encode(lm: LoadedModel, prompts: Sequence[str]) -> Encoded:
    return encode_ids(lm, [lm.tokenizer(p)["input_ids"] for p in prompts])


def run_model(lm: LoadedModel, batch: Encoded, logits_to_keep: int = 1, **kwargs):
    """The model's forward pass; positions count from each prompt's first real token."""
    if lm.before_pass:
        lm.before_pass()
    # Without explicit positions a left-padded prompt would start at position = its padding, not 0.
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        logits_to_keep=logits_to_keep,
        use_cache=False,
        **kwargs,
    )


def forward(lm: LoadedModel, batch: Encoded, logits_to_keep: int = 1) -> torch.Tensor:
    """Logits of the last `logits_to_keep` positions: (B, K, V)."""
    return run_model(lm, batch, logits_to_keep).logits


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layers it needs have run."""


@dataclass
class AttnOutRecord:
    """Projection inputs (keys) and outputs at the last token, per layer: (B, D_in) and (B, D_out)."""

    inputs: dict[int, torch.Tensor]
    outputs: dict[int, torch.Tensor]


@contextmanager
def _hooks(lm: LoadedModel, layers: Sequence[int], hook_for) -> Iterator[None]:
    with ExitStack() as stack:
        for layer in layers:
            handle = lm.attn_out(layer).register_forward_hook(hook_for(layer))
            stack.callback(handle.remove)
        yield


@torch.no_grad()
def record_attn_out(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], stop_early: bool = True) -> AttnOutRecord:
    """One batched pass; the pass stops after the highest requested layer when `stop_early`."""
    record = AttnOutRecord({}, {})
    last = max(layers)

    def hook_for(layer: int):
        def hook(module, args, output):
            record.inputs[layer] = args[0][:, -1].detach().float()
            record.outputs[layer] = output[:, -1].detach().float()
            if stop_early and layer == last:
                raise _StopForward

        return hook

    batch = encode(lm, prompts)
    with _hooks(lm, layers, hook_for):
        try:
            forward(lm, batch)
        except _StopForward:
            pass
    return record


@torch.no_grad()
def patched_last_logits(
    lm: LoadedModel, prompts: Sequence[str], patches: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Last-token logits (B, V) with the projection output of some rows overwritten.

    `patches[layer] = (rows, values)`: at `layer`, rows `rows` (R,) get `values` (R, D_out) at the last token.
    """

    def hook_for(layer: int):
        rows, values = patches[layer]

        def hook(module, args, output):
            output = output.clone()
            output[rows, -1] = values.to(output.dtype)
            return output

        return hook

    with _hooks(lm, list(patches), hook_for):
        return forward(lm, encode(lm, prompts))[:, -1].float()


@torch.no_grad()
def hidden_states_last(lm: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """Residual stream at the last token after the embeddings and each layer: (L+1, B, D)."""
    out = run_model(lm, encode(lm, prompts), output_hidden_states=True)
    return torch.stack([h[:, -1].float() for h in out.hidden_states])
