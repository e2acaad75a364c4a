"""A batch's shared prefix runs once; the rows' results are those of running every prompt whole."""

import torch

from hoppatch.engine.tracing import (
    GREEDY_VOCAB_SLICE,
    encode,
    encode_ids,
    final_hidden_states,
    forward,
    forward_at,
    greedy_next,
    greedy_tokens,
    hidden_states_last,
    layer_input,
    record_attn_out,
    recorded_layer_input,
    resumed_at,
    shared_prefix_length,
    token_batches,
)

PREAMBLE = "The capital of France is Paris.\nThe author of Hamlet is William Shakespeare.\n"
PROMPTS = [PREAMBLE + "The creator of C. Auguste Dupin is", PREAMBLE + "The capital of Lithuania is", PREAMBLE + "A"] * 4
"""Enough rows that running the preamble once saves more than a pass costs on the CPU (`PASS_OVERHEAD_TOKENS`)."""


def test_shared_prefix_leaves_every_row_a_token():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2], [3, 4]]) == 0
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]], own_tokens=3) == 1


def test_prefix_sharing_gives_the_logits_of_whole_prompts(tiny):
    shared, whole = encode(tiny, PROMPTS), encode(tiny, PROMPTS, share_prefix=False)
    assert shared.prefix_cache is not None and shared.input_ids.shape[1] < whole.input_ids.shape[1]
    # the last 3 positions are all real tokens in the first two rows of each three; the third has only its last
    kept_shared, kept_whole = forward(tiny, shared, logits_to_keep=3), forward(tiny, whole, logits_to_keep=3)
    full, short = [i for i in range(len(PROMPTS)) if i % 3 != 2], [i for i in range(len(PROMPTS)) if i % 3 == 2]
    torch.testing.assert_close(kept_shared[full], kept_whole[full], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kept_shared[short, -1], kept_whole[short, -1], atol=1e-4, rtol=1e-4)


def test_prefix_sharing_keeps_the_last_token_keys(tiny):
    """Keys read after the prefix pass (hooks registered after encoding) are the whole prompts' keys."""
    layers = range(tiny.num_layers)
    shared = record_attn_out(tiny, PROMPTS, layers)
    whole = [record_attn_out(tiny, [p], layers) for p in PROMPTS]  # batch of one: no shared prefix
    for layer in layers:
        torch.testing.assert_close(shared.inputs[layer], torch.cat([w.inputs[layer] for w in whole]), atol=1e-4, rtol=1e-4)


def test_token_batches_group_shared_prefixes_and_cover_every_sequence():
    qa = [[1, 7, 7, 7, 7, 7, 7, 2, n] for n in range(3)]
    cloze = [[1, 9, n] for n in range(3)]
    batches = token_batches([*cloze, *qa], max_rows=8)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert sorted(map(sorted, batches)) == [[0, 1, 2], [3, 4, 5]]  # the long template is not padded with the short
    assert all(len(b) <= 2 for b in token_batches([*cloze, *qa], max_rows=2))


def test_greedy_tokens_with_the_cache_match_recomputing_whole_prompts(tiny):
    batch = encode(tiny, PROMPTS)
    fast = greedy_tokens(tiny, batch, steps=3)
    for row, prompt in enumerate(PROMPTS):
        ids = tiny.tokenizer(prompt)["input_ids"]
        for step in range(3):  # the reference: no cache, no shared prefix, the whole sequence every step
            logits = forward(tiny, encode_ids(tiny, [ids], share_prefix=False))
            ids = [*ids, int(logits[0, -1].argmax())]
            assert ids[-1] == int(fast[row, step])


def test_greedy_tokens_picked_slice_by_slice_are_the_argmax_of_the_whole_vocabulary(tiny, monkeypatch):
    monkeypatch.setitem(GREEDY_VOCAB_SLICE, "cpu", 5)  # the tiny vocabulary in many slices, the last one short
    weight = tiny.unembed.weight
    assert tiny.vocab_size % 5 != 0
    with torch.no_grad():
        weight[9] = weight[2]  # two tokens in different slices tie: the first one wins, as with `argmax`
        hidden = torch.cat([torch.randn(6, weight.shape[1]), 50 * weight[2:3]])
    torch.testing.assert_close(greedy_next(tiny, hidden)[:, 0], tiny.logits(hidden).argmax(-1), atol=0, rtol=0)
    assert int(greedy_next(tiny, hidden)[-1]) == 2
    # decoding picks the same tokens as the whole vocabulary's argmax at every step
    batch = encode(tiny, PROMPTS[:3])
    ids = [tiny.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    for _ in range(3):
        logits = forward(tiny, encode_ids(tiny, ids))[:, -1]
        ids = [[*row, int(token)] for row, token in zip(ids, logits.argmax(-1))]
    reference = torch.tensor([row[-3:] for row in ids])
    first: list[torch.Tensor] = []
    assert torch.equal(greedy_tokens(tiny, batch, steps=3, first_logits=first.append), reference)
    torch.testing.assert_close(first[0], forward(tiny, batch)[:, -1], atol=1e-5, rtol=1e-5)


def test_logits_at_kept_positions_are_those_of_the_whole_forward(tiny):
    batch = encode(tiny, PROMPTS[:3])
    keep = torch.tensor([[True, False, True], [False, False, True], [False, True, False]])
    torch.testing.assert_close(forward_at(tiny, batch, keep), forward(tiny, batch, logits_to_keep=3)[keep], atol=1e-5, rtol=1e-5)


def test_passes_read_for_hooks_caches_or_hidden_states_unembed_no_position(tiny):
    """The unembedding, a product with the whole vocabulary, runs only where logits are read."""
    unembedded: list[int] = []
    handle = tiny.unembed.register_forward_hook(lambda module, args, out: unembedded.append(out.shape[:-1].numel()))
    try:
        batch = encode(tiny, PROMPTS)  # the shared preamble runs once, for its keys and values
        record_attn_out(tiny, PROMPTS[:3], [0, tiny.num_layers - 1], stop_early=False)
        hidden = final_hidden_states(tiny, batch)
        states = hidden_states_last(tiny, PROMPTS)
    finally:
        handle.remove()
    assert batch.prefix_cache is not None and unembedded and set(unembedded) == {0}
    # what those passes return is still the model's: their last states give the logits of a whole pass
    logits = forward(tiny, batch)[:, -1]
    torch.testing.assert_close(tiny.logits(hidden[:, -1]), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.logits(states[-1]), logits, atol=1e-5, rtol=1e-5)


def test_a_pass_resumed_above_the_unedited_layers_is_the_whole_pass(tiny):
    """The layers below the lowest edited one are skipped and their output given instead: same logits."""
    batch = encode(tiny, PROMPTS[:3], share_prefix=False)
    edited = tiny.num_layers - 1
    hidden = layer_input(tiny, batch, edited)
    with recorded_layer_input(tiny, edited) as seen:  # a whole pass records the same input on its way
        forward(tiny, batch, logits_to_keep=batch.input_ids.shape[1])
    torch.testing.assert_close(seen[0], hidden, atol=0, rtol=0)
    weight = tiny.attn_out_weight(edited)
    saved = weight.detach().clone()
    try:
        weight.data.add_(0.05 * torch.randn_like(weight))
        whole = forward(tiny, batch, logits_to_keep=batch.input_ids.shape[1])
        calls = []
        handle = tiny.layers[0].register_forward_hook(lambda *_: calls.append(1))
        try:
            with resumed_at(tiny, edited, hidden):
                resumed = forward(tiny, batch, logits_to_keep=batch.input_ids.shape[1])
        finally:
            handle.remove()
    finally:
        weight.data.copy_(saved)
    assert edited > 0 and calls == []
    torch.testing.assert_close(resumed, whole, atol=1e-5, rtol=1e-5)
    # the skipped layers are back in place
    assert all(type(layer).__name__ != "_Passthrough" for layer in tiny.layers)
