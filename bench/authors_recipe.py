"""The authors' CREME recipe, re-implemented for comparison (creme/fastedit_comp, commit fcb11de).

Per layer of a fixed band, ascending, on the model edited below it: batched passes over 22 context variants
of the prompt (the prompt itself and 21 short prefixes) give the composed query's keys and outputs (k̄, ō)
and the guide's outputs (ḡ), then W ← W + (ḡ − ō) k̄ᵀ / ‖k̄‖². One example at a time.
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

AUTHORS_BANDS = {
    "builtin:gemma-3-270m": [8, 9, 10, 11, 12, 13],
    "builtin:smollm2-135m": [13, 14, 15, 16, 17, 18, 19],
}
"""The fixed band per built-in model: the counterpart of LLaMA-2-7B's 17–23 of 32 (the same share of depth)."""


@torch.no_grad()
def authors_edit(lm: LoadedModel, query: str, guide: str, layers: list[int], preamble: str = "") -> list[LayerDelta]:
    deltas = []
    queries = [preamble + p + query for p in CONTEXT_PREFIXES]
    guides = [preamble + p + guide for p in CONTEXT_PREFIXES]
    for layer in sorted(layers):
        # The authors' code reads the query's keys in a pass of their own and again with its outputs; one
        # pass gives both, so it is timed with the two passes it needs.
        query = record_attn_out(lm, queries, [layer])
        k, o = query.inputs[layer].mean(0), query.outputs[layer].mean(0)  # (in,), (out,)
        g = record_attn_out(lm, guides, [layer]).outputs[layer].mean(0)  # (out,)
        left = ((g - o) / k.norm())[:, None]  # (out, 1)
        right = (k / k.norm())[None, :]  # (1, in)
        weight = lm.attn_out_weight(layer)
        delta = LayerDelta(layer, lm.attn_out_name(layer), left.cpu(), right.cpu(), (left @ right).norm().item() / weight.norm().item())
        apply_layer_delta(lm, delta)
        deltas.append(delta)
    return deltas
