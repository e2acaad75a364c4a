"""The delta file: low-rank factors of every edited weight, and applying or reverting it on a model.

`delta.safetensors` holds, per edited projection `<module>`, the tensors `<module>.delta_left` (out, r) and
`<module>.delta_right` (r, in), so that ΔW = left @ right in (out, in) orientation. Its metadata records the
base model, the sha256 of each touched weight it was solved against (as stored, with its dtype), layers,
method and budget, its parents (earlier deltas it was solved on top of) and its regression suite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hoppatch import __version__

from .edit import LayerDelta
from .errors import DeltaMismatch

METHOD = "creme-whitened"
"""Recorded in the metadata: CREME's last-token update, with keys whitened by preserved-prompt statistics."""


def weight_sha256(weight: torch.Tensor) -> str:
    """sha256 of a weight's bytes as stored (dtype included), in the (out, in) or storage layout given."""
    data = weight.detach().contiguous().cpu()
    digest = hashlib.sha256(str(data.dtype).encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_delta(
    path: Path,
    deltas: Sequence[LayerDelta],
    *,
    base_model: str,
    base_hashes: dict[str, str],
    conv1d: bool,
    budget: dict,
    parents: Sequence[dict] = (),
    regression_suite: Sequence[dict] = (),
) -> None:
    """`parents`: the deltas it was solved on top of ({label, sha256}, oldest first); `regression_suite`: the
    probes it must keep holding when later patches stack on it (see `lineage`)."""
    tensors: dict[str, torch.Tensor] = {}
    for d in deltas:
        tensors[f"{d.module}.delta_left"] = d.left.contiguous()
        tensors[f"{d.module}.delta_right"] = d.right.contiguous()
    metadata = {
        "format": "pt",
        "hoppatch_version": __version__,
        "base_model": base_model,
        "method": METHOD,
        "orientation": "out_in",
        "storage": "conv1d_in_out" if conv1d else "linear_out_in",
        "layers": json.dumps([d.layer for d in deltas]),
        "modules": json.dumps([d.module for d in deltas]),
        "base_sha256": json.dumps(base_hashes),
        "budget": json.dumps(budget),
        "parents": json.dumps(list(parents)),
        "regression_suite": json.dumps(list(regression_suite)),
    }
    save_file(tensors, str(path), metadata=metadata)


@dataclass(frozen=True)
class DeltaFile:
    metadata: dict[str, str]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (left, right)

    @property
    def base_hashes(self) -> dict[str, str]:
        return json.loads(self.metadata["base_sha256"])

    @property
    def conv1d(self) -> bool:
        return self.metadata.get("storage") == "conv1d_in_out"

    @property
    def parents(self) -> list[dict]:
        return json.loads(self.metadata.get("parents", "[]"))


def read_delta(path: str | Path) -> DeltaFile:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except (OSError, ValueError) as exc:
        raise DeltaMismatch(f"{path}: not a readable safetensors delta ({exc})") from None
    if "modules" not in metadata or "base_sha256" not in metadata:
        raise DeltaMismatch(f"{path}: not a hoppatch delta (no modules/base_sha256 metadata)")
    modules = json.loads(metadata["modules"])
    factors = {m: (tensors[f"{m}.delta_left"], tensors[f"{m}.delta_right"]) for m in modules}
    return DeltaFile(metadata, factors)


class AppliedDelta:
    """A delta applied in place; `revert()` copies the saved base weights back, bit-identical."""

    def __init__(self, model: nn.Module, saved: dict[str, torch.Tensor]):
        self._model = model
        self._saved = saved

    def revert(self) -> None:
        for module, weight in self._saved.items():
            self._model.get_submodule(module).weight.data.copy_(weight)
        self._saved = {}


def apply_delta(model: nn.Module, path: str | Path, *, verify: bool = True) -> AppliedDelta:
    """Add a delta file to a model (a transformers causal LM, as the delta's base) in place.

    Refuses a model whose touched weights do not match the hashes recorded in the file.
    """
    delta = read_delta(path)
    hashes = delta.base_hashes
    saved: dict[str, torch.Tensor] = {}
    for module_name, (left, right) in delta.factors.items():
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            raise DeltaMismatch(f"the model has no module {module_name!r} that the delta edits") from None
        if verify and weight_sha256(weight) != hashes.get(module_name):
            raise DeltaMismatch(
                f"base weight {module_name} does not match the delta's recorded sha256 "
                f"(a different model, revision or dtype than {delta.metadata.get('base_model')!r})"
            )
        update = (left.float() @ right.float()).to(weight.device)  # (out, in)
        if delta.conv1d:
            update = update.T
        if update.shape != weight.shape:
            raise DeltaMismatch(f"{module_name}: delta shape {tuple(update.shape)} ≠ weight shape {tuple(weight.shape)}")
        saved[module_name] = weight.detach().clone()
        weight.data.add_(update.to(weight.dtype))
    return AppliedDelta(model, saved)
