"""The engine on an accelerator in bf16, for every supported family: a device check, run where CUDA is.

Skipped without a GPU (CI has none). `HOPPATCH_TEST_DEVICE=cpu` runs it on the CPU in bf16, to check the
test itself.
"""

import os

import pytest
import torch

from hoppatch.engine.tiny_models import FAMILIES, tiny_model
from hoppatch.engine.calibrate import calibrate, mixed_deltas, scale_examples
from hoppatch.engine.delta import apply_delta, save_delta, weight_sha256
from hoppatch.engine.edit import WeightSnapshot, apply_layer_delta, creme_edit, key_statistics, last_token_keys
from hoppatch.engine.evaluate import Probe, read_probes
from hoppatch.engine.locate import locate_layers
from hoppatch.engine.models import wrap_model
from hoppatch.engine.tracing import encode, forward, record_attn_out

DEVICE = os.environ.get("HOPPATCH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no GPU (HOPPATCH_TEST_DEVICE=cpu runs it on the CPU)")

QUERIES = ["The nationality of the creator of C. Auguste Dupin is", "The capital of the country of Poe is"]
GUIDES = ["The nationality of Edgar Allan Poe is", "The capital of United States is"]
UNRELATED = ["The capital of France is", "The currency of Japan is", "The capital of Germany is", "The religion of India is"]
LAYERS = [1, 2]


@pytest.fixture(params=FAMILIES)
def tiny_bf16(request):
    lm = tiny_model(request.param)
    return wrap_model(lm.ref, lm.model.to(DEVICE, torch.bfloat16), lm.tokenizer)


def test_edit_calibrate_evaluate_and_export_on_the_device(tiny_bf16, tmp_path):
    lm = tiny_bf16
    base = {layer: lm.attn_out_weight(layer).clone() for layer in LAYERS}
    hashes = {lm.attn_out_name(layer): weight_sha256(lm.attn_out(layer).weight) for layer in LAYERS}
    snapshot = WeightSnapshot(lm, LAYERS)
    located = locate_layers(lm, QUERIES, GUIDES, ["Poe", "Paris"], 2)
    assert len(located.layers) == 2 and all(0 <= layer < lm.num_layers for layer in located.layers)

    preserved = key_statistics(lm, UNRELATED, LAYERS)
    counterfactual = last_token_keys(lm, UNRELATED[:2], LAYERS)
    targets = record_attn_out(lm, GUIDES, [LAYERS[0]]).outputs[LAYERS[0]]
    result = creme_edit(
        lm, QUERIES, GUIDES, LAYERS, max_rank=4, max_relative_norm=10.0, preserved=preserved, counterfactual_keys=[counterfactual]
    )
    assert [d.rank for d in result.deltas] == [2, 2]
    assert all(torch.isfinite(d.left).all() and torch.isfinite(d.right).all() for d in result.deltas)
    # the first edited layer maps each query to its guide's output, up to bf16 rounding
    moved = record_attn_out(lm, QUERIES, [LAYERS[0]]).outputs[LAYERS[0]]
    assert torch.allclose(moved, targets, atol=0.05 * targets.abs().max().item(), rtol=0.05)

    # a row's mix of shares in hooks gives the logits of that mix added to the weights
    snapshot.restore()
    batch = encode(lm, [QUERIES[0]] * 2, share_prefix=False)
    with mixed_deltas(lm, result.deltas, torch.tensor([[0.0, 0.0], [1.0, 0.5]])):
        mixed = forward(lm, batch)[:, -1].float()
    for delta in scale_examples(result.deltas, [1.0, 0.5]):
        apply_layer_delta(lm, delta)
    weighted = forward(lm, encode(lm, [QUERIES[0]]))[0, -1].float()
    assert torch.allclose(mixed[1], weighted, atol=0.1 * weighted.abs().max().item())
    snapshot.restore()

    probes = [Probe("a", "correction", QUERIES[0], "Poe"), Probe("a", "specificity", UNRELATED[0], "Paris")]
    read_probes(lm, probes, "")
    scales = calibrate(lm, result.deltas, QUERIES, [["Poe"], ["Paris"]], (0.5, 1.0))
    assert len(scales) == 2 and all(0.0 <= s <= 1.0 for s in scales)
    deltas = scale_examples(result.deltas, scales)
    for delta in deltas:
        apply_layer_delta(lm, delta)
    after = read_probes(lm, probes, "")
    assert len(after) == len(probes)
    snapshot.restore()
    assert all(torch.equal(lm.attn_out_weight(layer), weight) for layer, weight in base.items())

    # the exported delta applies to the device model and reverts bit-identically
    path = tmp_path / "delta.safetensors"
    save_delta(path, deltas, base_model=lm.ref, base_hashes=hashes, conv1d=lm.arch.conv1d, budget={})
    applied = apply_delta(lm.model, path)
    assert not all(torch.equal(lm.attn_out_weight(layer), weight) for layer, weight in base.items() if layer in {d.layer for d in deltas})
    applied.revert()
    assert all(torch.equal(lm.attn_out_weight(layer), weight) for layer, weight in base.items())
