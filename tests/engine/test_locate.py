"""Locate: one sweep entry per layer, and a planted effect is found."""

import torch

from hoppatch.engine import lens, locate
from hoppatch.engine.locate import band_windows, guide_outputs, locate_layers
from hoppatch.engine.tiny_models import SPECIALS
from hoppatch.engine.tracing import patched_last_states
from hoppatch.engine.lens import logit_lens

from .test_edit import GUIDE, QUERY


def test_sweep_has_one_entry_per_layer_and_the_band_is_the_best_window(tiny):
    result = locate_layers(tiny, [QUERY, QUERY], [GUIDE, GUIDE], ["France", "Paris"], max_layers=2)
    assert [len(row) for row in result.effects] == [tiny.num_layers] * 2
    assert len(result.band_effects) == tiny.num_layers - 1
    best = max(range(len(result.band_effects)), key=result.band_effects.__getitem__)
    assert result.layers == [best, best + 1]


def test_sweep_finds_the_only_layer_whose_attention_matters(tiny):
    planted = 2
    for layer in range(tiny.num_layers):
        if layer != planted:  # a zero projection writes nothing, so patching it cannot matter
            tiny.attn_out(layer).weight.data.zero_()
    with torch.no_grad():
        tiny.attn_out_weight(planted).mul_(50.0)
    # the answer: the word that patching the planted layer with the guide's output raises most
    guide = guide_outputs(tiny, [GUIDE])[0][planted]
    base = torch.log_softmax(tiny.logits(patched_last_states(tiny, [QUERY], {})).float(), -1)[0]
    patched = torch.log_softmax(tiny.logits(patched_last_states(tiny, [QUERY], {planted: (torch.tensor([0]), guide[None])})).float(), -1)[0]
    gain = patched - base
    gain[: len(SPECIALS)] = -torch.inf
    answer = tiny.tokenizer.decode([int(gain.argmax())])
    result = locate_layers(tiny, [QUERY], [GUIDE], [answer], max_layers=1)
    effects = result.effects[0]
    assert all(abs(e) < 1e-5 for i, e in enumerate(effects) if i != planted)
    assert effects[planted] > 1e-3
    assert result.layers == [planted]


def test_band_windows_cover_every_start():
    assert band_windows(5, 2) == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert band_windows(2, 4) == [[0, 1]]


def test_logit_lens_has_one_point_per_residual_state(tiny):
    [curve] = logit_lens(tiny, [QUERY], ["Poe"], ["France"])
    assert len(curve.answer_prob) == tiny.num_layers + 1
    assert all(0.0 <= p <= 1.0 for p in curve.bridge_prob) and all(r >= 0 for r in curve.answer_rank)


OTHER_QUERY = "The capital of the country of citizenship of the creator of C. Auguste Dupin is"
OTHER_GUIDE = "The capital of the United States is"


def test_rows_unembedded_together_read_as_each_example_alone(tiny, monkeypatch):
    monkeypatch.setattr(locate, "LOGPROB_ROWS", 7)  # blocks that split an example's rows across products
    together = locate_layers(tiny, [QUERY, OTHER_QUERY], [GUIDE, OTHER_GUIDE], ["France", "Paris"], max_layers=2)
    alone = []
    for query, guide, answer in ((QUERY, GUIDE, "France"), (OTHER_QUERY, OTHER_GUIDE, "Paris")):
        tiny.warm.locate_rows.clear()  # read anew, not from the joint call's rows
        alone.append(locate_layers(tiny, [query], [guide], [answer], max_layers=2).effects[0])
    assert torch.allclose(torch.tensor(together.effects), torch.tensor(alone), atol=1e-5)


def test_logit_lens_in_blocks_reads_as_one_prompt_at_a_time(tiny, monkeypatch):
    prompts, bridges, answers = [QUERY, OTHER_QUERY, GUIDE], ["Poe", "Poe", "Edgar"], ["France", "Paris", "United"]
    whole = logit_lens(tiny, prompts, bridges, answers)
    monkeypatch.setattr(lens, "LENS_ROWS", 1)  # one prompt's states per product
    single = logit_lens(tiny, prompts, bridges, answers)
    for a, b in zip(whole, single):
        assert a.bridge_rank == b.bridge_rank and a.answer_rank == b.answer_rank
        assert torch.allclose(torch.tensor(a.answer_prob), torch.tensor(b.answer_prob), atol=1e-6)
        assert torch.allclose(torch.tensor(a.bridge_prob), torch.tensor(b.bridge_prob), atol=1e-6)


def test_patched_rows_that_share_their_prefix_read_as_each_row_alone(tiny):
    prompt = " ".join([QUERY] * 4)  # long enough that the rows' common prefix runs once, before the patch
    rows, layer = 8, tiny.num_layers // 2
    values = guide_outputs(tiny, [GUIDE])[0][layer][None].expand(2, -1)
    together = patched_last_states(tiny, [prompt] * rows, {layer: (torch.tensor([1, 5]), values)})
    patched = patched_last_states(tiny, [prompt], {layer: (torch.tensor([0]), values[:1])})[0]
    plain = patched_last_states(tiny, [prompt], {})[0]
    for row in range(rows):
        torch.testing.assert_close(together[row], patched if row in (1, 5) else plain, atol=1e-5, rtol=1e-4)
