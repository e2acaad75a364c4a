"""CREME: rank-one (per example) updates of the attention output projection in a band of layers.

Paper: Li et al., "Understanding and Patching Compositional Reasoning in LLMs", Findings of ACL 2024, §4.
For one example at layer l, with k the projection's input at the composed query's last token and g its
output at the guide's last token (the second hop with the bridge entity written out):

    W ← W + (g − W k) kᵀ / ‖k‖²

so that W_new k = g: the query behaves as if the bridge were written out. Layers go in ascending order,
each measured on the model already edited below it (creme/fastedit_comp/rome/rome_main.py::execute_rome).

Two generalisations, both reducing to the formula above when their knobs are off:
- several examples at one layer are solved together, ΔW K = R exactly (K: keys, R = G − W K), with the
  minimum-norm update instead of updates that overwrite one another;
- the norm is measured in the metric of `C`, the second moment of the projection's inputs over a sample of
  unrelated cloze prompts (ROME's C⁻¹k key): among all updates with ΔW K = R it changes those prompts' outputs
  least. The plain key kᵀ/‖k‖² overlaps with every prompt that ends like the query, and moves them all.
  C counts the prompts' keys at their last token (where an answer is read) and at every position (an edit
  there moves what later tokens attend to; ROME's statistics are all-position too).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .models import LoadedModel
from .tracing import encode_ids, record_attn_inputs, record_attn_out, record_attn_out_ids, shared_prefix_length, token_batches


@dataclass(frozen=True)
class EditConfig:
    """How the update is solved."""

    preserve_weight: float = 1.0
    """Weight of the preserved-prompt second moment in the key metric; 0 gives the paper's plain key."""
    ridge: float = 0.05
    """Identity added to the metric, relative to its mean eigenvalue; keeps it invertible and the update small."""
    counterfactual_weight: float = 3.0
    """Scale of the counterfactual keys (the query's template, other subjects); their moment weighs its square."""
    all_positions_weight: float = 1.0
    """Weight of the preserved prompts' all-position moment, relative to the last-token moments' scale."""
    target_scale: float = 1.0
    """Moves the query's output to o + s·(g − o); 1 is CREME's exact g, more pushes past it."""

    def __post_init__(self) -> None:
        if self.preserve_weight < 0 or self.all_positions_weight < 0:
            raise ValueError("`preserve_weight` and `all_positions_weight` must be ≥ 0")
        if self.ridge <= 0:
            raise ValueError("`ridge` must be > 0")
        if self.target_scale <= 0:
            raise ValueError("`target_scale` must be > 0")


@dataclass(frozen=True)
class LayerDelta:
    """ΔW = left @ right for one layer's attention output projection, in (out, in) orientation."""

    layer: int
    module: str  # dotted path of the projection in the model
    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)
    relative_norm: float  # ‖ΔW‖ / ‖W‖, Frobenius
    scaled: bool = False  # True when the budget's norm cap shrank it

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right  # (out, in)


@dataclass
class EditResult:
    deltas: list[LayerDelta] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class KeyStatistics:
    """Unrelated prompts' projection inputs at one layer: what a patch is solved to leave alone."""

    last: torch.Tensor  # (N, in): each prompt's key at its last token
    moment: torch.Tensor  # (in, in): mean k kᵀ over every position after the prompts' common prefix


def key_metric(
    preserved: Sequence[torch.Tensor], dim: int, config: EditConfig, all_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """C = w·Σ_sets E[k kᵀ] (+ the all-position moment, matched in scale) + ridge·(mean eigenvalue)·I: (in, in), float64."""
    if not preserved or config.preserve_weight == 0:
        return torch.eye(dim, dtype=torch.float64)
    moment = config.preserve_weight * sum(keys.double().T @ keys.double() / keys.shape[0] for keys in preserved)
    if all_positions is not None and config.all_positions_weight > 0:
        all_positions = all_positions.double().to(moment.device)
        moment = moment + config.all_positions_weight * moment.diagonal().mean() / all_positions.diagonal().mean() * all_positions
    scale = moment.diagonal().mean()
    return moment + config.ridge * scale * torch.eye(dim, dtype=torch.float64, device=moment.device)


def solve_update(keys: torch.Tensor, residuals: torch.Tensor, metric: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-C-norm ΔW with ΔW K = R, as factors (left (out, r), right (r, in)).

    ΔW = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹ with K (in, n) the keys as columns; for C = I and n = 1 this is CREME's
    (g − Wk) kᵀ/‖k‖². More examples than `max_rank` are compressed to the best rank-`max_rank` update.
    """
    K = keys.double().T  # (in, n)
    R = residuals.double().T  # (out, n)
    whitened = torch.linalg.solve(metric, K)  # C⁻¹K, (in, n)
    gram = K.T @ whitened  # KᵀC⁻¹K, (n, n)
    right = torch.linalg.lstsq(gram, whitened.T).solution  # (n, in)
    left = R  # (out, n)
    if left.shape[1] > max_rank:
        U, S, Vh = torch.linalg.svd(left @ right, full_matrices=False)
        left, right = U[:, :max_rank] * S[:max_rank], Vh[:max_rank]
    return left, right


def apply_layer_delta(lm: LoadedModel, delta: LayerDelta, sign: float = 1.0) -> None:
    """Add (or with sign −1 subtract) a layer delta to the projection weight in place."""
    weight = lm.attn_out_weight(delta.layer)
    update = delta.dense().to(weight.device, torch.float32)
    weight.data.add_((sign * update).to(weight.dtype))


def creme_edit(
    lm: LoadedModel,
    queries: Sequence[str],
    guides: Sequence[str],
    layers: Sequence[int],
    *,
    max_rank: int,
    max_relative_norm: float,
    preserved: dict[int, KeyStatistics] | None = None,
    counterfactuals: Sequence[str] = (),
    config: EditConfig = EditConfig(),
) -> EditResult:
    """Edit `layers` in ascending order, in place; the caller restores the base weights.

    Per layer one batched pass of [queries, guides], stopped right after that layer's projection.
    `preserved` holds generic unrelated prompts' key statistics per layer; `counterfactuals` are the query's own
    template with other subjects, whose keys are read in one pass on the unedited model (the edits are made
    to leave them alone, so the partly edited model would give nearly the same keys).
    """
    started = time.perf_counter()
    result = EditResult()
    n = len(queries)
    counterfactual_keys = preserved_key_sample(lm, counterfactuals, layers) if counterfactuals else {}
    for layer in sorted(layers):
        record = record_attn_out(lm, [*queries, *guides], [layer])
        keys = record.inputs[layer][:n]  # (n, in)
        outputs = record.outputs[layer]  # (2n, out)
        residuals = config.target_scale * (outputs[n:] - outputs[:n])  # s·(g − W k), (n, out)
        sets = [preserved[layer].last] if preserved else []
        if counterfactuals:
            sets.append(config.counterfactual_weight * counterfactual_keys[layer])
        metric = key_metric(sets, keys.shape[1], config, preserved[layer].moment if preserved else None)
        left, right = solve_update(keys, residuals, metric.to(keys.device), max_rank)
        weight = lm.attn_out_weight(layer)
        relative = (left @ right).norm().item() / weight.float().norm().item()
        scale = min(1.0, max_relative_norm / relative) if relative > 0 else 1.0
        delta = LayerDelta(
            layer=layer,
            module=lm.attn_out_name(layer),
            left=(left * scale).float().cpu(),
            right=right.float().cpu(),
            relative_norm=relative * scale,
            scaled=scale < 1.0,
        )
        apply_layer_delta(lm, delta)
        result.deltas.append(delta)
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def preserved_key_sample(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch: int = 64) -> dict[int, torch.Tensor]:
    """Last-token projection inputs of unrelated prompts at each layer: {layer: (N, in)}, in prompt order."""
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    keys: dict[int, torch.Tensor] = {}
    for rows in token_batches(ids, batch):
        record = record_attn_out_ids(lm, [ids[i] for i in rows], layers)
        for layer in layers:
            inputs = record.inputs[layer]
            keys.setdefault(layer, inputs.new_empty(len(prompts), inputs.shape[1]))[rows] = inputs
    return keys


@torch.no_grad()
def key_statistics(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch: int = 64) -> dict[int, KeyStatistics]:
    """Last-token keys and the key moment over every position after the prompts' common prefix (their
    preamble, whose keys are the same in every prompt), per layer, in one pass per batch."""
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    common = shared_prefix_length(ids) if len(ids) > 1 else 0
    last: dict[int, torch.Tensor] = {}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for rows in token_batches(ids, batch):
        # every position is run here, so which ones count does not depend on how the batch was cut
        encoded = encode_ids(lm, [ids[i] for i in rows], share_prefix=False)
        positions = encoded.attention_mask.cumsum(-1) - 1
        counted = encoded.attention_mask.bool() & (positions >= common)
        count += int(counted.sum())
        for layer, inputs in record_attn_inputs(lm, encoded, layers).items():
            last.setdefault(layer, inputs.new_empty(len(prompts), inputs.shape[-1]))[rows] = inputs[:, -1]
            x = inputs[counted].double()
            sums[layer] = sums.get(layer, 0) + x.T @ x
    return {layer: KeyStatistics(last[layer], (sums[layer] / count).float()) for layer in layers}


class WeightSnapshot:
    """The touched projection weights, copied before an edit and copied back after: bit-identical, no model copy."""

    def __init__(self, lm: LoadedModel, layers: Sequence[int]):
        self._saved = {layer: lm.attn_out(layer).weight.detach().clone() for layer in layers}
        self._lm = lm

    def restore(self) -> None:
        for layer, weight in self._saved.items():
            self._lm.attn_out(layer).weight.data.copy_(weight)
