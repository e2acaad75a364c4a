"""Locate: one sweep entry per layer, and a planted effect is found."""

import torch

from hoppatch.engine.locate import band_windows, guide_outputs, locate_layers
from hoppatch.engine.tiny_models import SPECIALS
from hoppatch.engine.tracing import patched_last_logits
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
    base = torch.log_softmax(patched_last_logits(tiny, [QUERY], {}), -1)[0]
    patched = torch.log_softmax(patched_last_logits(tiny, [QUERY], {planted: (torch.tensor([0]), guide[None])}), -1)[0]
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
