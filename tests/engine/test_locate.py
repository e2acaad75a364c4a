"""Locate: one sweep entry per layer, and a planted effect is found."""

import torch

from workers.engine.locate import causal_sweep, choose_band, locate_layers
from workers.engine.lens import logit_lens

from .test_edit import GUIDE, QUERY


def test_sweep_has_one_entry_per_layer(tiny):
    effects = causal_sweep(tiny, [QUERY, QUERY], [GUIDE, GUIDE], ["France", "Paris"])
    assert effects.shape == (2, tiny.num_layers)


def test_sweep_finds_the_only_layer_whose_attention_matters(tiny):
    planted = 2
    for layer in range(tiny.num_layers):
        if layer != planted:  # a zero projection writes nothing, so patching it cannot matter
            tiny.attn_out(layer).weight.data.zero_()
    with torch.no_grad():
        tiny.attn_out_weight(planted).mul_(50.0)
    result = locate_layers(tiny, [QUERY], [GUIDE], ["Poe"], max_layers=1)
    effects = result.effects[0]
    assert all(abs(e) < 1e-5 for i, e in enumerate(effects) if i != planted)
    assert abs(effects[planted]) > 1e-3
    if effects[planted] > 0:
        assert result.layers == [planted]


def test_band_is_the_best_contiguous_window():
    assert choose_band([0.0, 0.1, 0.9, 0.8, -0.5, 0.3], 2) == [2, 3]
    assert choose_band([0.0, 0.1], 4) == [0, 1]


def test_logit_lens_has_one_point_per_residual_state(tiny):
    [curve] = logit_lens(tiny, [QUERY], ["Poe"], ["France"])
    assert len(curve.answer_prob) == tiny.num_layers + 1
    assert all(0.0 <= p <= 1.0 for p in curve.bridge_prob) and all(r >= 0 for r in curve.answer_rank)
