"""The edit's mechanics on tiny random models of every supported family."""

import torch

from hoppatch.engine.calibrate import mixed_deltas, scale_examples
from hoppatch.engine.warm import ByteLru, tensor_bytes
from hoppatch.engine.edit import (
    EditConfig,
    apply_layer_delta,
    KeyStatistics,
    WeightSnapshot,
    creme_edit,
    key_metric,
    key_statistics,
    last_token_keys,
    answer_part,
    low_rank_norm,
    solve_update,
)
from hoppatch.engine.tracing import attn_out_gradients, encode, forward, patched_last_states, record_attn_inputs, record_attn_out

QUERY = "The nationality of the creator of C. Auguste Dupin is"
GUIDE = "The nationality of Edgar Allan Poe is"
UNRELATED = ["The capital of France is", "The currency of Japan is", "The capital of Germany is", "The religion of India is"]


def test_edit_maps_the_query_key_to_the_guide_output(tiny):
    layer = 2
    before = record_attn_out(tiny, [QUERY, GUIDE], [layer])
    creme_edit(tiny, [QUERY], [GUIDE], [layer], max_rank=4, max_relative_norm=10.0, config=EditConfig(preserve_weight=0))
    after = record_attn_out(tiny, [QUERY], [layer])
    torch.testing.assert_close(after.outputs[layer][0], before.outputs[layer][1], atol=1e-4, rtol=1e-4)


def test_whitened_edit_is_exact_and_rank_one(tiny):
    layer = 1
    preserved = key_statistics(tiny, UNRELATED, [layer])
    target = record_attn_out(tiny, [GUIDE], [layer]).outputs[layer][0]
    result = creme_edit(tiny, [QUERY], [GUIDE], [layer], max_rank=4, max_relative_norm=10.0, preserved=preserved)
    assert result.deltas[0].rank == 1
    torch.testing.assert_close(record_attn_out(tiny, [QUERY], [layer]).outputs[layer][0], target, atol=1e-4, rtol=1e-4)


def test_plain_metric_gives_the_papers_formula():
    torch.manual_seed(0)
    k, r = torch.randn(1, 16), torch.randn(1, 8)
    left, right = solve_update(k, r, key_metric([], 16, EditConfig(preserve_weight=0)), max_rank=4)
    expected = r.T.double() @ k.double() / k.double().norm() ** 2  # (g − Wk) kᵀ / ‖k‖²
    torch.testing.assert_close(left @ right, expected)


def test_key_metric_solves_like_the_dense_metric():
    """C⁻¹K through the cached base factor and Woodbury equals solving with C formed whole."""
    torch.manual_seed(0)
    dim, config = 24, EditConfig()
    preserved, counterfactual, keys = torch.randn(40, dim), torch.randn(6, dim), torch.randn(dim, 3).double()
    positions = torch.randn(200, dim)
    stats = KeyStatistics(preserved, positions.T @ positions / 200)
    sets = [preserved, config.counterfactual_weight * counterfactual]
    moment = sum(s.double().T @ s.double() / s.shape[0] for s in sets) * config.preserve_weight
    A = stats.moment.double()
    moment = moment + config.all_positions_weight * moment.diagonal().mean() / A.diagonal().mean() * A
    dense = moment + config.ridge * moment.diagonal().mean() * torch.eye(dim, dtype=torch.float64)
    metric = key_metric(sets, dim, config, stats)
    torch.testing.assert_close(metric.dense(), dense)
    torch.testing.assert_close(metric.solve(keys), torch.linalg.solve(dense, keys))
    no_positions = key_metric(sets, dim, config)
    torch.testing.assert_close(no_positions.solve(keys), torch.linalg.solve(no_positions.dense(), keys))


def test_low_rank_norm_is_the_frobenius_norm_of_the_product():
    torch.manual_seed(0)
    left, right = torch.randn(12, 3), torch.randn(3, 20)
    assert abs(low_rank_norm(left, right) - float((left @ right).norm())) < 1e-4


def test_several_examples_share_one_update_of_rank_n(tiny):
    queries = [QUERY, "The capital of the country of Poe is"]
    guides = [GUIDE, "The capital of United States is"]
    layer = 1
    targets = record_attn_out(tiny, guides, [layer]).outputs[layer]
    result = creme_edit(tiny, queries, guides, [layer], max_rank=8, max_relative_norm=10.0, config=EditConfig(preserve_weight=0))
    assert result.deltas[0].rank == 2
    torch.testing.assert_close(record_attn_out(tiny, queries, [layer]).outputs[layer], targets, atol=1e-4, rtol=1e-4)


def test_layers_are_edited_ascending_on_the_partly_edited_model(tiny):
    snapshot = WeightSnapshot(tiny, [1, 2])
    together = creme_edit(tiny, [QUERY], [GUIDE], [2, 1], max_rank=4, max_relative_norm=10.0)
    snapshot.restore()
    first = creme_edit(tiny, [QUERY], [GUIDE], [1], max_rank=4, max_relative_norm=10.0)
    second = creme_edit(tiny, [QUERY], [GUIDE], [2], max_rank=4, max_relative_norm=10.0)
    assert [d.layer for d in together.deltas] == [1, 2]
    for joint, alone in zip(together.deltas, first.deltas + second.deltas):
        torch.testing.assert_close(joint.dense(), alone.dense(), atol=1e-5, rtol=1e-4)


def test_restore_is_bit_identical(tiny):
    base = {name: tensor.clone() for name, tensor in tiny.model.state_dict().items()}
    snapshot = WeightSnapshot(tiny, [0, 1, 2, 3])
    creme_edit(tiny, [QUERY], [GUIDE], [0, 1, 2, 3], max_rank=4, max_relative_norm=1.0)
    assert not torch.equal(tiny.attn_out(2).weight, base[tiny.attn_out_name(2) + ".weight"])
    snapshot.restore()
    for name, tensor in tiny.model.state_dict().items():
        assert torch.equal(tensor, base[name]), name


def test_norm_budget_caps_the_update(tiny):
    result = creme_edit(tiny, [QUERY], [GUIDE], [1], max_rank=4, max_relative_norm=1e-3, config=EditConfig(preserve_weight=0))
    delta = result.deltas[0]
    assert delta.scaled
    weight_norm = tiny.attn_out_weight(1).norm().item()
    assert abs(delta.dense().norm().item() / weight_norm - 1e-3) < 1e-5


def test_key_statistics_are_the_prompts_keys(tiny):
    layer = 2
    stats = key_statistics(tiny, UNRELATED, [layer])[layer]
    torch.testing.assert_close(stats.last, record_attn_out(tiny, UNRELATED, [layer]).inputs[layer], atol=1e-5, rtol=1e-4)
    assert stats.moment.shape == (stats.last.shape[1],) * 2
    torch.testing.assert_close(stats.moment, stats.moment.T)
    # the moment counts every position after the prompts' common prefix ("The"), whatever the batching
    whole = [record_attn_inputs(tiny, encode(tiny, [p]), [layer])[layer][0] for p in UNRELATED]  # (T, in) each
    common = len(tiny.tokenizer("The")["input_ids"])
    x = torch.cat([w[common:] for w in whole])
    for batch in (1, 64):
        stats = key_statistics(tiny, UNRELATED, [layer], batch=batch)[layer]
        torch.testing.assert_close(stats.moment, x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4)


def test_scaling_examples_scales_their_columns_and_drops_zeros(tiny):
    queries = [QUERY, "The capital of the country of Poe is", "The currency of Japan is"]
    guides = [GUIDE, "The capital of United States is", "The currency of the yen is"]
    [delta] = creme_edit(tiny, queries, guides, [1], max_rank=8, max_relative_norm=10.0).deltas
    [scaled] = scale_examples([delta], [0.5, 0.0, 1.0])
    assert scaled.rank == 2
    expected = 0.5 * delta.left[:, :1] @ delta.right[:1] + delta.left[:, 2:] @ delta.right[2:]
    torch.testing.assert_close(scaled.dense(), expected)
    assert abs(scaled.relative_norm / delta.relative_norm - expected.norm().item() / delta.dense().norm().item()) < 1e-5


def test_scaling_examples_scales_every_column_an_example_owns(tiny):
    queries = [QUERY, "The capital of the country of Poe is", f"{QUERY} Edgar"]
    guides = [GUIDE, "The capital of United States is", f"{GUIDE} Edgar"]
    [delta] = creme_edit(tiny, queries, guides, [1], max_rank=8, max_relative_norm=10.0).deltas
    [scaled] = scale_examples([delta], [0.5, 0.0], owners=[0, 1, 0])  # column 2 is example 0's later word
    assert scaled.rank == 2
    expected = 0.5 * (delta.left[:, :1] @ delta.right[:1] + delta.left[:, 2:] @ delta.right[2:])
    torch.testing.assert_close(scaled.dense(), expected)


def test_last_token_keys_are_read_once_and_kept_in_order(tiny):
    layers, known = [1, 2], ByteLru("keys", 1 << 20, tensor_bytes)
    first = last_token_keys(tiny, UNRELATED[:2], layers, known)
    both = last_token_keys(tiny, UNRELATED[::-1], layers, known)  # two kept, two read now
    assert len(known) == len(UNRELATED) * len(layers)
    fresh = record_attn_out(tiny, UNRELATED[::-1], layers)
    for layer in layers:
        torch.testing.assert_close(both[layer], fresh.inputs[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(first[layer], both[layer][[3, 2]])


def test_mixed_deltas_run_each_row_with_its_own_scales(tiny):
    """A row's mix of example shares, added in hooks, gives the logits of those shares added to the weights."""
    queries = [QUERY, "The capital of the country of Poe is"]
    guides = [GUIDE, "The capital of United States is"]
    snapshot = WeightSnapshot(tiny, [1, 2])
    deltas = creme_edit(tiny, queries, guides, [1, 2], max_rank=8, max_relative_norm=10.0).deltas
    snapshot.restore()
    mixes = [[0.0, 0.0], [1.0, 1.0], [0.3, 0.0], [0.5, 1.0]]
    batch = encode(tiny, [QUERY] * len(mixes), share_prefix=False)
    with mixed_deltas(tiny, deltas, torch.tensor(mixes)):
        mixed = forward(tiny, batch)[:, -1]
    for row, mix in enumerate(mixes):
        for delta in scale_examples(deltas, mix):
            apply_layer_delta(tiny, delta)
        torch.testing.assert_close(mixed[row], forward(tiny, encode(tiny, [QUERY]))[0, -1], atol=1e-4, rtol=1e-4)
        snapshot.restore()


def test_mixed_deltas_scale_each_column_by_its_owners_share(tiny):
    queries = [QUERY, "The capital of the country of Poe is", f"{QUERY} Edgar"]
    guides = [GUIDE, "The capital of United States is", f"{GUIDE} Edgar"]
    snapshot = WeightSnapshot(tiny, [1, 2])
    deltas = creme_edit(tiny, queries, guides, [1, 2], max_rank=8, max_relative_norm=10.0).deltas
    snapshot.restore()
    owners, mixes = [0, 1, 0], [[0.0, 1.0], [0.5, 0.2]]
    with mixed_deltas(tiny, deltas, torch.tensor(mixes), owners):
        mixed = forward(tiny, encode(tiny, [queries[2]] * len(mixes), share_prefix=False))[:, -1]
    for row, mix in enumerate(mixes):
        for delta in scale_examples(deltas, mix, owners):
            apply_layer_delta(tiny, delta)
        torch.testing.assert_close(mixed[row], forward(tiny, encode(tiny, [queries[2]]))[0, -1], atol=1e-4, rtol=1e-4)
        snapshot.restore()


def test_answer_part_keeps_the_component_along_the_gradient_and_a_share_of_the_rest():
    torch.manual_seed(0)
    residuals, gradients = torch.randn(3, 8), torch.randn(3, 8)
    along = answer_part(residuals, gradients, 0.0)
    # parallel to the gradient, with the same first-order effect r·J
    torch.testing.assert_close(torch.linalg.matrix_rank(torch.stack([along[0], gradients[0]])), torch.tensor(1))
    torch.testing.assert_close((along * gradients).sum(-1), (residuals * gradients).sum(-1))
    torch.testing.assert_close(answer_part(residuals, gradients, 1.0), residuals)
    torch.testing.assert_close(answer_part(residuals, gradients, 0.3), along + 0.3 * (residuals - along))


def test_attn_out_gradients_match_finite_differences(tiny):
    prompts, layers = [QUERY, UNRELATED[0]], [1, 2]
    targets = [tiny.tokenizer(" Poe", add_special_tokens=False)["input_ids"][0]] * 2
    gradients = attn_out_gradients(tiny, prompts, targets, layers)
    torch.manual_seed(0)
    for layer in layers:
        outputs = record_attn_out(tiny, prompts, [layer]).outputs[layer]
        assert gradients[layer].shape == outputs.shape
        direction = torch.randn_like(outputs)
        direction /= direction.norm(dim=-1, keepdim=True)
        rows = torch.arange(len(prompts))

        def shifted(eps: float) -> torch.Tensor:
            logits = tiny.logits(patched_last_states(tiny, prompts, {layer: (rows, outputs + eps * direction)})).float()
            return torch.log_softmax(logits.double(), -1)[rows, torch.tensor(targets)]

        numeric = (shifted(1e-3) - shifted(-1e-3)) / 2e-3
        torch.testing.assert_close(numeric.float(), (gradients[layer] * direction).sum(-1), atol=2e-3, rtol=2e-2)
