"""Export a delta as a PEFT LoRA adapter: ΔW = B A with lora_A = right (r, in), lora_B = left (out, r).

With lora_alpha = r the LoRA scaling alpha/r is 1, so the adapter adds exactly ΔW. Layers of lower rank are
padded with zero factors to the adapter's single rank r, which changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .edit import LayerDelta
from .models import Architecture


def save_chain_adapter(directory: Path, chain: Sequence[Path], arch: Architecture, base_model: str) -> int:
    """One adapter for a chain of delta files: per module the factors side by side, so the ΔWs add up and so do
    the ranks. Returns the adapter's rank."""
    from .delta import read_delta

    merged: dict[str, LayerDelta] = {}
    for path in chain:
        delta = read_delta(path)
        layers = dict(zip(json.loads(delta.metadata["modules"]), json.loads(delta.metadata["layers"])))
        for module, (left, right) in delta.factors.items():
            earlier = merged.get(module)
            if earlier is not None:
                left, right = torch.cat([earlier.left, left.float()], dim=1), torch.cat([earlier.right, right.float()], dim=0)
            merged[module] = LayerDelta(layers[module], module, left.float(), right.float(), relative_norm=0.0)
    save_adapter(directory, list(merged.values()), arch, base_model)
    return max(d.rank for d in merged.values())


def save_adapter(directory: Path, deltas: Sequence[LayerDelta], arch: Architecture, base_model: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    r = max(d.rank for d in deltas)
    tensors: dict[str, torch.Tensor] = {}
    for d in deltas:
        A = torch.zeros(r, d.right.shape[1])
        B = torch.zeros(d.left.shape[0], r)
        A[: d.rank], B[:, : d.rank] = d.right, d.left
        tensors[f"base_model.model.{d.module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{d.module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": arch.conv1d,
        "target_modules": [arch.peft_target],
        "layers_to_transform": sorted(d.layer for d in deltas),
        "layers_pattern": arch.layers.split(".")[-1],
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
