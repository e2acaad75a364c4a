"""Batched forward passes that read or overwrite the attention output projection at the last token.

Every prompt batch is left-padded, so index -1 is each prompt's real last token: the place CREME reads
its key k (the projection's input) and its target g (the projection's output), and where locate patches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from transformers import Cache

from .context import checkpoint
from .models import LoadedModel


PASS_OVERHEAD_TOKENS = {"cpu": 128, "cuda": 2048}
"""What one more forward pass costs, in token positions of work: batches are cut and prefixes shared only
where that saves more. On a CPU a pass costs about its tokens; on a GPU a small pass is bound by its kernel
launches (a 7B model's 18-token pass takes as long as about a thousand tokens' arithmetic)."""


def pass_overhead_tokens(lm: LoadedModel) -> int:
    return PASS_OVERHEAD_TOKENS.get(lm.device.type, PASS_OVERHEAD_TOKENS["cuda"])


@dataclass
class Encoded:
    """A batch laid out as [shared prefix | left padding | each row's own tokens].

    The prefix's keys and values are computed once, at batch size one, when the batch is encoded: the rows
    sharing a few-shot preamble, or the rows of one prompt patched in several ways, then cost only their own
    tokens. Hooks registered after encoding see only the rows' own tokens.
    """

    input_ids: torch.Tensor  # (B, T): each row's own tokens, left-padded
    attention_mask: torch.Tensor  # (B, P + T): the prefix, then the rows
    prefix_cache: Cache | None = None  # keys and values of the P shared tokens, batch size one

    def cache(self) -> Cache | None:
        """A fresh copy of the prefix cache for the whole batch (a forward pass appends to the one it gets)."""
        if self.prefix_cache is None:
            return None
        cache = copy.deepcopy(self.prefix_cache)
        cache.batch_repeat_interleave(self.input_ids.shape[0])
        return cache


def shared_prefix_length(sequences: Sequence[Sequence[int]], own_tokens: int = 1) -> int:
    """Length of the common token prefix, leaving every sequence at least `own_tokens` tokens of its own."""
    longest = min(len(s) for s in sequences) - own_tokens
    return max(0, min([longest, *(_common_length(sequences[0], s) for s in sequences[1:])]))


def token_batches(sequences: Sequence[Sequence[int]], max_rows: int, pass_overhead: int = 0) -> list[list[int]]:
    """Indices of `sequences` grouped into batches that cost few token positions to run.

    A batch costs `pass_overhead` plus its shared prefix once plus, per row, the longest row's own tokens
    (padding included). Sequences go in token order, so rows that share a prefix (a preamble, a question
    template) sit together; a sequence joins the open batch when that costs no more than starting a new one.
    """
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    batches: list[list[int]] = []
    prefix = longest = 0
    for i in order:
        seq = sequences[i]
        if batches and len(batches[-1]) < max_rows:
            batch = batches[-1]
            shared = min(prefix, _common_length(sequences[batch[0]], seq))
            grown = shared + (len(batch) + 1) * (max(longest, len(seq)) - shared)
            if grown <= prefix + len(batch) * (longest - prefix) + pass_overhead + len(seq):
                batch.append(i)
                prefix, longest = shared, max(longest, len(seq))
                continue
        batches.append([i])
        prefix = longest = len(seq)
    return batches


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_ids(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], share_prefix: bool = True, own_tokens: int = 1
) -> Encoded:
    """Left-pad token-id sequences into one batch on the model's device, running their shared prefix once.

    Each row keeps at least `own_tokens` tokens out of the prefix: the positions whose outputs the caller reads.
    """
    P = shared_prefix_length(sequences, own_tokens) if share_prefix and len(sequences) > 1 else 0
    if P * (len(sequences) - 1) < pass_overhead_tokens(lm):
        P = 0
    rows = [s[P:] for s in sequences]
    T = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), P + T), dtype=torch.long)
    mask[:, :P] = 1
    for i, row in enumerate(rows):
        if row:
            ids[i, T - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, P + T - len(row) :] = 1
    cache = prefix_cache(lm, list(sequences[0][:P])) if P else None
    return Encoded(ids.to(lm.device), mask.to(lm.device), cache)


@torch.no_grad()
def prefix_cache(lm: LoadedModel, prefix: list[int]) -> Cache:
    checkpoint()
    ids = torch.tensor([prefix], device=lm.device)
    return lm.model(input_ids=ids, use_cache=True, logits_to_keep=_kept(lm, None)).cache


def encode(lm: LoadedModel, prompts: Sequence[str], share_prefix: bool = True) -> Encoded:
    return encode_ids(lm, [lm.tokenizer(p)["input_ids"] for p in prompts], share_prefix)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted from its row's first real token (left padding would shift it otherwise)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _kept(lm: LoadedModel, logits_to_keep: int | None) -> int | torch.Tensor:
    """transformers' `logits_to_keep` for the last `logits_to_keep` positions; for None, no position."""
    return torch.empty(0, dtype=torch.long, device=lm.device) if logits_to_keep is None else logits_to_keep


def run_model(lm: LoadedModel, batch: Encoded, logits_to_keep: int | None = 1, **kwargs):
    """The model's forward pass over the rows' own tokens; positions count from each prompt's first real token.

    `logits_to_keep=None` unembeds no position, for a pass run for what its hooks see or for its hidden
    states: the unembedding is a product with the whole vocabulary, whose weight read alone costs a small
    model's pass as much as many of its tokens."""
    checkpoint()
    # Without explicit positions a left-padded prompt would start at position = its padding, not 0.
    positions = position_ids(batch.attention_mask)[:, -batch.input_ids.shape[1] :]
    cache = batch.cache()
    kwargs.setdefault("use_cache", cache is not None)
    return lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        cache=cache,
        logits_to_keep=_kept(lm, logits_to_keep),
        **kwargs,
    )


def forward(lm: LoadedModel, batch: Encoded, logits_to_keep: int = 1) -> torch.Tensor:
    """Logits of the last `logits_to_keep` positions: (B, K, V)."""
    return run_model(lm, batch, logits_to_keep).logits


def forward_at(lm: LoadedModel, batch: Encoded, keep: torch.Tensor) -> torch.Tensor:
    """Logits only where `keep` (B, K: the last K positions) is True, row by row: (M, V).

    The unembedding is a vocabulary-wide product per position (most of a small model's arithmetic when
    answers are teacher-forced), so only the positions read are passed to it; anything the model applies
    after it (a logit soft-cap) still applies.
    """
    mask = keep.to(lm.device)

    def only_kept(module, args):
        return (args[0][mask][None],)

    handle = lm.unembed.register_forward_pre_hook(only_kept)
    try:
        return run_model(lm, batch, keep.shape[1]).logits[0]
    finally:
        handle.remove()


GREEDY_VOCAB_SLICE = {"cpu": 4096}
"""Tokens of the vocabulary unembedded at a time to pick a greedy token, per device type. On a CPU a batch's
rows against slices run the product 15–30 % faster than against the whole vocabulary at once, which writes
logits far past the caches; on a GPU the whole vocabulary is one kernel."""


def greedy_next(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token (B, 1) from its final-normed state (B, D): the first of equal maxima, as `argmax`."""
    step = GREEDY_VOCAB_SLICE.get(lm.device.type, lm.vocab_size)
    best, token = lm.logits(hidden, slice(0, step)).max(-1)
    for start in range(step, lm.vocab_size, step):
        value, index = lm.logits(hidden, slice(start, start + step)).max(-1)
        better = value > best
        best, token = torch.where(better, value, best), torch.where(better, index + start, token)
    return token[:, None]


@contextmanager
def unembedding_inputs(lm: LoadedModel) -> Iterator[list[torch.Tensor]]:
    """Passes made inside append their unembedding's input (the final-normed states of the positions whose
    logits they keep) to the list yielded, and unembed nothing."""
    seen: list[torch.Tensor] = []

    def capture(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],)

    handle = lm.unembed.register_forward_pre_hook(capture)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def greedy_tokens(
    lm: LoadedModel,
    batch: Encoded,
    steps: int,
    done: Callable[[torch.Tensor], bool] | None = None,
    first_logits: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The next greedy tokens of every row, decoded with the key/value cache: (B, ≤ steps).

    `done(tokens)`, given the (B, t) tokens so far, may end the decoding early (every row has said enough).
    `first_logits`, if given, is called with the first step's logits (B, V): the prompts' next-token view.
    """
    with unembedding_inputs(lm) as seen:
        out = run_model(lm, batch, use_cache=True)
        positions = position_ids(batch.attention_mask)[:, -1:]
        mask, tokens = batch.attention_mask, []
        if first_logits is not None:  # the whole first step is unembedded anyway: its argmax is the first token
            logits = lm.logits(seen[-1][:, -1])
            first_logits(logits)
            tokens.append(logits.argmax(-1, keepdim=True))
        while len(tokens) < steps:
            if tokens:
                if done is not None and done(torch.cat(tokens, dim=1)):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions + 1
                checkpoint()
                out = lm.model(input_ids=tokens[-1], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True, logits_to_keep=1)
            tokens.append(greedy_next(lm, seen[-1][:, -1]))
    return torch.cat(tokens, dim=1)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layers it needs have run."""


@dataclass
class AttnOutRecord:
    """Projection inputs (keys) and outputs at the last token, per layer: (B, D_in) and (B, D_out)."""

    inputs: dict[int, torch.Tensor]
    outputs: dict[int, torch.Tensor]


@contextmanager
def projection_hooks(lm: LoadedModel, layers: Sequence[int], hook_for) -> Iterator[None]:
    """Forward hooks `hook_for(layer)` on the attention output projections of `layers`, removed on exit."""
    with ExitStack() as stack:
        for layer in layers:
            handle = lm.attn_out(layer).register_forward_hook(hook_for(layer))
            stack.callback(handle.remove)
        yield


def record_attn_out(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], stop_early: bool = True) -> AttnOutRecord:
    """One batched pass; the pass stops after the highest requested layer when `stop_early`."""
    return record_attn_out_ids(lm, [lm.tokenizer(p)["input_ids"] for p in prompts], layers, stop_early)


@torch.no_grad()
def record_attn_out_ids(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], layers: Sequence[int], stop_early: bool = True
) -> AttnOutRecord:
    """`record_attn_out` for prompts already tokenized."""
    record = AttnOutRecord({}, {})

    def capture(layer: int, inputs: torch.Tensor, output: torch.Tensor) -> None:
        record.inputs[layer] = inputs[:, -1].detach().float()
        record.outputs[layer] = output[:, -1].detach().float()

    run_replacing(lm, encode_ids(lm, sequences), layers, capture, stop_early)
    return record


@torch.no_grad()
def record_attn_inputs(lm: LoadedModel, batch: Encoded, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The projection's inputs at every position of the rows' own tokens: {layer: (B, T, in)}.

    The pass stops after the highest requested layer. Padding positions are included; mask them with
    the last T columns of `batch.attention_mask` (all of it, for a batch encoded without a shared prefix).
    """
    inputs: dict[int, torch.Tensor] = {}
    run_replacing(lm, batch, layers, lambda layer, x, _: inputs.__setitem__(layer, x.detach().float()))
    return inputs


@contextmanager
def recorded_layer_input(lm: LoadedModel, layer: int, stop: bool = False) -> Iterator[list[torch.Tensor]]:
    """Passes made inside append the residual stream entering decoder layer `layer`, (B, T, D), to the list
    yielded; with `stop`, each pass ends there (raising `_StopForward`)."""
    seen: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        if stop:
            raise _StopForward

    handle = lm.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def layer_input(lm: LoadedModel, batch: Encoded, layer: int) -> torch.Tensor:
    """The residual stream entering decoder layer `layer` at every position of the rows' own tokens: (B, T, D).
    The pass stops there."""
    with recorded_layer_input(lm, layer, stop=True) as seen:
        try:
            run_model(lm, batch, None)
        except _StopForward:
            pass
    return seen[0]


class _Passthrough(torch.nn.Module):
    """A decoder layer that returns its input: the layers below a resumed pass's first layer."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def resumed_at(lm: LoadedModel, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Passes made inside skip the layers below `layer` and give it `hidden` (from `layer_input`) instead.

    For a model that differs from the one `hidden` was read on only from `layer` up, and the same batch,
    the pass is the same as a whole one; the layers below cost nothing.
    """
    layers = lm.layers
    below = [layers[i] for i in range(layer)]

    def give(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer].register_forward_pre_hook(give, with_kwargs=True)
    try:
        for i in range(layer):
            layers[i] = _Passthrough()
        yield
    finally:
        for i, module in enumerate(below):
            layers[i] = module
        handle.remove()


@torch.no_grad()
def run_replacing(lm: LoadedModel, batch: Encoded, layers: Sequence[int], visit, stop_early: bool = True) -> None:
    """One pass calling `visit(layer, inputs, output)` at each requested projection, in the pass's order;
    what it returns, if not None, replaces the projection's output for the layers above. The pass stops
    after the highest one when `stop_early` (the layers above cannot change what was visited)."""
    last = max(layers)

    def hook_for(layer: int):
        def hook(module, args, output):
            replaced = visit(layer, args[0], output)
            if stop_early and layer == last:
                raise _StopForward
            return replaced

        return hook

    with projection_hooks(lm, layers, hook_for):
        try:
            run_model(lm, batch, None)
        except _StopForward:
            pass


def attn_out_gradients(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[int], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """d log p(target token) / d(the projection's output at the last token), per layer: {layer: (B, out)}.

    One forward and one backward pass: a zero added to each layer's output at the last token is the
    variable differentiated, so the gradient reaches every layer through all the layers above it.
    """
    added: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            zero = output.new_zeros(output.shape[0], output.shape[-1], requires_grad=True)
            added[layer] = zero
            output = output.clone()
            output[:, -1] = output[:, -1] + zero
            return output

        return hook

    batch = encode(lm, prompts, share_prefix=False)
    with torch.enable_grad(), projection_hooks(lm, layers, hook_for):
        logprobs = torch.log_softmax(forward(lm, batch)[:, -1].float(), -1)
        chosen = logprobs[torch.arange(len(prompts)), torch.tensor(list(targets), device=logprobs.device)]
        gradients = torch.autograd.grad(chosen.sum(), [added[layer] for layer in layers])
    return {layer: g.detach().float() for layer, g in zip(layers, gradients)}


@torch.no_grad()
def patched_last_states(
    lm: LoadedModel, prompts: Sequence[str], patches: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The unembedding's input at the last token (B, D), with the projection output of some rows overwritten;
    nothing is unembedded, so the caller can unembed many such passes' rows in one product.

    `patches[layer] = (rows, values)`: at `layer`, rows `rows` (R,) get `values` (R, D_out) at the last token.
    """

    def hook_for(layer: int):
        rows, values = patches[layer]

        def hook(module, args, output):
            output = output.clone()
            output[rows, -1] = values.to(output.dtype)
            return output

        return hook

    batch = encode(lm, prompts)  # before the hooks: the shared prefix runs unpatched
    with projection_hooks(lm, list(patches), hook_for):
        return final_hidden_states(lm, batch)[:, -1]


@torch.no_grad()
def final_hidden_states(lm: LoadedModel, batch: Encoded) -> torch.Tensor:
    """The unembedding's input (the final-normed residual stream) at every position of the rows' own tokens:
    (B, T, D). The unembedding itself runs on no position; `LoadedModel.logits` finishes the job."""
    with unembedding_inputs(lm) as seen:
        run_model(lm, batch, batch.input_ids.shape[1])
    return seen[0]


@torch.no_grad()
def hidden_states_last(lm: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """Residual stream at the last token after the embeddings and each layer: (L+1, B, D)."""
    out = run_model(lm, encode(lm, prompts), None, output_hidden_states=True)
    return torch.stack([h[:, -1].float() for h in out.hidden_states])
