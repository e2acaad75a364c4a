"""Delta file and PEFT adapter: both reproduce the in-place edit; a wrong base is refused."""

import json

import pytest
import torch
from peft import PeftModel

from hoppatch.engine.adapter import save_adapter
from hoppatch.engine.delta import apply_delta, read_delta, save_delta, weight_sha256
from hoppatch.engine.edit import WeightSnapshot, creme_edit
from hoppatch.engine.errors import DeltaMismatch
from hoppatch.engine.tracing import encode, position_ids

from .test_edit import GUIDE, QUERY, UNRELATED

LAYERS = [1, 2]


def _logits(lm, model=None):
    batch = encode(lm, [QUERY, *UNRELATED])
    positions = position_ids(batch.attention_mask)
    with torch.no_grad():
        return (model or lm.model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits


def _edit(lm, tmp_path):
    """Edit in place; write the delta and adapter; return the edited logits, restoring the base."""
    hashes = {lm.attn_out_name(l): weight_sha256(lm.attn_out(l).weight) for l in LAYERS}
    snapshot = WeightSnapshot(lm, LAYERS)
    result = creme_edit(lm, [QUERY, "The capital of the country of Poe is"], [GUIDE, "The capital of United States is"], LAYERS, max_rank=4, max_relative_norm=1.0)
    edited = _logits(lm)
    snapshot.restore()
    save_delta(tmp_path / "delta.safetensors", result.deltas, base_model=lm.ref, base_hashes=hashes, conv1d=lm.arch.conv1d, budget={})
    save_adapter(tmp_path / "adapter", result.deltas, lm.arch, lm.ref)
    return edited


def test_delta_file_reproduces_the_edit_and_reverts(tiny, tmp_path):
    edited = _edit(tiny, tmp_path)
    base = _logits(tiny)
    applied = apply_delta(tiny.model, tmp_path / "delta.safetensors")
    torch.testing.assert_close(_logits(tiny), edited, atol=1e-5, rtol=1e-5)
    applied.revert()
    assert torch.equal(_logits(tiny), base)
    meta = read_delta(tmp_path / "delta.safetensors").metadata
    assert meta["format"] == "pt" and json.loads(meta["layers"]) == LAYERS


def test_peft_adapter_matches_the_edit(tiny, tmp_path):
    edited = _edit(tiny, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == LAYERS and config["lora_alpha"] == config["r"]
    peft_model = PeftModel.from_pretrained(tiny.model, str(tmp_path / "adapter"))
    assert (_logits(tiny, peft_model) - edited).abs().max().item() <= 1e-4


def test_a_different_base_is_refused(tiny, tmp_path):
    _edit(tiny, tmp_path)
    tiny.attn_out(1).weight.data[0, 0] += 1.0
    with pytest.raises(DeltaMismatch, match="sha256"):
        apply_delta(tiny.model, tmp_path / "delta.safetensors")
