"""The authors' CREME recipe, re-implemented for comparison (creme/fastedit_comp, commit fcb11de).

Per layer of a fixed band, ascending, on the model edited below it: three batched passes over 22 context
variants of the prompt (the prompt itself and 21 short prefixes) — keys of the composed query (u), guide
outputs (g), keys and outputs of the query again (k̄, ō) — then W ← W + (ḡ − ō) k̄ᵀ / ‖k̄‖². One example at a time.
"""

from __future__ import annotations

import torch

from hoppatch.engine.edit import LayerDelta, apply_layer_delta
from hoppatch.engine.models import LoadedModel
from hoppatch.engine.tracing import record_attn_out

CONTEXT_PREFIXES = [
    "",
    "Human: ",
    "Hello world. ",
    "The following is a fact. ",
    "I was wondering. ",
    "Here is a sentence. ",
    "Answer the question. ",
    "Note: ",
    "Today is a good day. ",
    "Let me tell you. ",
    "Once upon a time. ",
    "In my opinion, ",
    "It is known that ",
    "According to the book, ",
    "Fact check: ",
    "Question: ",
    "As everyone knows, ",
    "Read this. ",
    "A quick note. ",
    "From the encyclopedia: ",
    "He said that ",
    "We learned that ",
]
"""22 context variants, as in the authors' code (the prompt itself plus 21 short prefixes)."""

AUTHORS_BAND_GEMMA_270M = [8, 9, 10, 11, 12, 13]
"""The fixed band used for the built-in model, the counterpart of LLaMA-2-7B's 17–23."""


@torch.no_grad()
def authors_edit(lm: LoadedModel, query: str, guide: str, layers: list[int], preamble: str = "") -> list[LayerDelta]:
    deltas = []
    queries = [preamble + p + query for p in CONTEXT_PREFIXES]
    guides = [preamble + p + guide for p in CONTEXT_PREFIXES]
    for layer in sorted(layers):
        u = record_attn_out(lm, queries, [layer]).inputs[layer].mean(0)  # pass 1: (in,)
        g = record_attn_out(lm, guides, [layer]).outputs[layer].mean(0)  # pass 2: (out,)
        again = record_attn_out(lm, queries, [layer])  # pass 3
        k, o = again.inputs[layer].mean(0), again.outputs[layer].mean(0)
        assert torch.allclose(u, k, atol=1e-4)  # u and k̄ are the same quantity, computed twice
        left = ((g - o) / k.norm())[:, None]  # (out, 1)
        right = (k / k.norm())[None, :]  # (1, in)
        weight = lm.attn_out_weight(layer)
        delta = LayerDelta(layer, lm.attn_out_name(layer), left.cpu(), right.cpu(), (left @ right).norm().item() / weight.norm().item())
        apply_layer_delta(lm, delta)
        deltas.append(delta)
    return deltas
