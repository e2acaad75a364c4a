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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .models import LoadedModel
from .warm import ByteLru, tensor_bytes
from .tracing import (
    encode_ids,
    pass_overhead_tokens,
    position_ids,
    record_attn_inputs,
    record_attn_out_ids,
    run_replacing,
    shared_prefix_length,
    token_batches,
)


@dataclass(frozen=True)
class EditConfig:
    """How the update is solved."""

    preserve_weight: float = 1.0
    """Weight of the preserved-prompt second moment in the key metric; 0 gives the paper's plain key."""
    ridge: float = 0.003
    """Identity added to the metric, relative to its mean eigenvalue; keeps it invertible. Small, so the
    preserved and counterfactual keys decide the update's direction."""
    counterfactuals_per_example: int = 48
    """Counterfactual queries preserved per patched example (half with its subject swapped, half its first hop)."""
    counterfactuals_per_job: int = 1024
    """At most this many in all: their keys enter every layer's solve, so a job of many examples takes fewer each."""
    counterfactual_weight: float = 3.0
    """Scale of the counterfactual keys (the query's template, other subjects); their moment weighs its square."""
    all_positions_weight: float = 1.0
    """Weight of the preserved prompts' all-position moment, relative to the last-token moments' scale."""
    target_scale: float = 1.0
    """Moves the query's output to o + s·(g − o); 1 is CREME's exact g, more pushes past it."""
    calibration_steps: tuple[float, ...] = (0.2, 0.35, 0.5, 0.7, 1.0)
    """Shares of the update tried per example by `calibrate`, the least that corrects its query kept."""
    off_answer_weight: float = 0.3
    """With the answer's gradients given, the part of g − o that does not move the answer (to first order) is
    kept at this weight: 0 keeps only the part along the gradient, 1 is CREME's whole g − o."""
    later_words: int = 2
    """An example the whole update leaves uncorrected gets a column for each of the next this many words of
    its answer, in a second solve (`pipeline`): its query usually gives the first word of a many-word name and
    stops, and one column at the query's last token reaches only that first word. 0 turns the second solve off."""

    def __post_init__(self) -> None:
        if self.preserve_weight < 0 or self.all_positions_weight < 0:
            raise ValueError("`preserve_weight` and `all_positions_weight` must be ≥ 0")
        if self.ridge <= 0:
            raise ValueError("`ridge` must be > 0")
        if self.target_scale <= 0:
            raise ValueError("`target_scale` must be > 0")
        if not 0 <= self.off_answer_weight <= 1:
            raise ValueError("`off_answer_weight` must be in [0, 1]")
        if self.later_words < 0:
            raise ValueError("`later_words` must be ≥ 0")

    def counterfactuals_each(self, rows: int) -> int:
        """Counterfactual queries per solved row when `rows` share the per-job cap (at least 4 each)."""
        return max(4, min(self.counterfactuals_per_example, self.counterfactuals_per_job // rows))


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

    def norm(self) -> float:
        return low_rank_norm(self.left, self.right)


def low_rank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖_F from the factors, without forming the (out, in) product: √Σ (LᵀL) ∘ (RRᵀ)."""
    left, right = left.double(), right.double()
    return float(((left.T @ left) * (right @ right.T)).sum().clamp(min=0).sqrt())


@dataclass
class EditResult:
    deltas: list[LayerDelta] = field(default_factory=list)


@dataclass
class KeyStatistics:
    """Unrelated prompts' projection inputs at one layer: what a patch is solved to leave alone."""

    last: torch.Tensor  # (N, in): each prompt's key at its last token
    moment: torch.Tensor  # (in, in): mean k kᵀ over every position after the prompts' common prefix
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    def nbytes(self) -> int:
        return tensor_bytes(self.last, self.moment, *self._factors.values())

    def base_factor(self, config: EditConfig) -> torch.Tensor:
        """L⁻¹ for B = L Lᵀ = w_A·A/mean(diag A) + ridge·(1 + w_A)·I, float64; kept, as it depends on the
        layer and the config alone (a 4096-wide factorization is most of an edit's arithmetic)."""
        key = (config.all_positions_weight, config.ridge)
        if key not in self._factors:
            A = self.moment.double()
            dim = A.shape[0]
            eye = torch.eye(dim, dtype=torch.float64, device=A.device)
            B = config.all_positions_weight / A.diagonal().mean() * A + config.ridge * (1 + config.all_positions_weight) * eye
            self._factors[key] = torch.linalg.solve_triangular(torch.linalg.cholesky(B), eye, upper=False)
        return self._factors[key]


@dataclass(frozen=True)
class KeyMetric:
    """C = scale·B + U Uᵀ, float64; B = L Lᵀ given by L⁻¹ (`base_factor`, None for B = I).

    Kept in this form, C⁻¹K costs products with the cached L⁻¹ and a solve the size of U's columns (the
    preserved and counterfactual keys), instead of factorizing an (in, in) matrix per layer and job.
    """

    base_factor: torch.Tensor | None
    scale: float
    low_rank: torch.Tensor  # U: (in, r)

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """C⁻¹K for K (in, n), by Woodbury: (tI + ŨŨᵀ)⁻¹ = (I − Ũ(tI + ŨᵀŨ)⁻¹Ũᵀ)/t in the whitened basis."""
        L_inv, U = self.base_factor, self.low_rank.to(K.device)
        K_w = K if L_inv is None else L_inv @ K
        U_w = U if L_inv is None else L_inv @ U
        capacitance = self.scale * torch.eye(U_w.shape[1], dtype=K.dtype, device=K.device) + U_w.T @ U_w
        Z = (K_w - U_w @ torch.linalg.solve(capacitance, U_w.T @ K_w)) / self.scale
        return Z if L_inv is None else L_inv.T @ Z

    def dense(self) -> torch.Tensor:
        """C itself: (in, in). For tests and inspection; the edit never forms it."""
        U = self.low_rank
        B = torch.eye(U.shape[0], dtype=U.dtype, device=U.device)
        if self.base_factor is not None:
            L = torch.linalg.inv(self.base_factor)
            B = L @ L.T
        return self.scale * B + U @ U.T


def key_metric(
    sets: Sequence[torch.Tensor], dim: int, config: EditConfig, statistics: KeyStatistics | None = None
) -> KeyMetric:
    """C = w·Σ_sets E[k kᵀ] (+ the all-position moment of `statistics`, matched in scale) + ridge·(mean eigenvalue)·I.

    Each set is (N, in) keys. With t the mean eigenvalue of the sets' part, C = t·B + U Uᵀ where U holds the
    keys scaled by √(w/N) and B = w_A·A/mean(diag A) + ridge·(1 + w_A)·I does not depend on the sets.
    """
    if not sets or config.preserve_weight == 0:
        return KeyMetric(None, 1.0, torch.zeros(dim, 0, dtype=torch.float64))
    U = torch.cat([keys.double().T * math.sqrt(config.preserve_weight / keys.shape[0]) for keys in sets], dim=1)
    mean_eigenvalue = float(U.square().sum()) / dim
    if statistics is not None and config.all_positions_weight > 0:
        return KeyMetric(statistics.base_factor(config).to(U.device), mean_eigenvalue, U)
    return KeyMetric(None, mean_eigenvalue * config.ridge, U)


def solve_update(keys: torch.Tensor, residuals: torch.Tensor, metric: KeyMetric, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-C-norm ΔW with ΔW K = R, as factors (left (out, r), right (r, in)).

    ΔW = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹ with K (in, n) the keys as columns; for C = I and n = 1 this is CREME's
    (g − Wk) kᵀ/‖k‖². More examples than `max_rank` are compressed to the best rank-`max_rank` update.
    """
    K = keys.double().T  # (in, n)
    R = residuals.double().T  # (out, n)
    whitened = metric.solve(K)  # C⁻¹K, (in, n)
    gram = K.T @ whitened  # KᵀC⁻¹K, (n, n)
    right = torch.linalg.lstsq(gram, whitened.T).solution  # (n, in)
    left = R  # (out, n)
    if left.shape[1] > max_rank:
        U, S, Vh = torch.linalg.svd(left @ right, full_matrices=False)
        left, right = U[:, :max_rank] * S[:max_rank], Vh[:max_rank]
    return left, right


def answer_part(residuals: torch.Tensor, gradients: torch.Tensor, off_weight: float) -> torch.Tensor:
    """Each row's residual split along its answer's gradient J: (r·J/‖J‖²) J, plus `off_weight` of the rest.

    To first order only the part along J moves the answer; the rest moves the output elsewhere, and every
    unrelated prompt whose key overlaps the query's moves with it.
    """
    along = (residuals * gradients).sum(-1, keepdim=True) / gradients.square().sum(-1, keepdim=True).clamp(min=1e-30) * gradients
    return along + off_weight * (residuals - along)


def apply_layer_delta(lm: LoadedModel, delta: LayerDelta, sign: float = 1.0) -> None:
    """Add (or with sign −1 subtract) a layer delta to the projection weight in place."""
    weight = lm.attn_out_weight(delta.layer)
    left, right = (f.to(weight.device, torch.float32) for f in (delta.left, delta.right))
    weight.data.add_((sign * left @ right).to(weight.dtype))


def creme_edit(
    lm: LoadedModel,
    queries: Sequence[str],
    guides: Sequence[str],
    layers: Sequence[int],
    *,
    max_rank: int,
    max_relative_norm: float,
    preserved: dict[int, KeyStatistics] | None = None,
    counterfactual_keys: Sequence[dict[int, torch.Tensor]] = (),
    answer_gradients: dict[int, torch.Tensor] | None = None,
    config: EditConfig = EditConfig(),
) -> EditResult:
    """Edit `layers` in ascending order, in place; the caller restores the base weights.

    One batched pass of [queries, guides]: at each layer's projection, in the pass's own order, the update
    is solved from the keys and outputs there, applied to the weight, and the edited projection's output is
    what the layers above see. That is the same as one pass per layer on the model edited below it, but
    each layer runs once. Every row runs its own preamble (no shared prefix), since the preamble's keys and
    values above an edited layer change with the edit.

    `preserved` holds generic unrelated prompts' key statistics per layer; each of `counterfactual_keys`
    ({layer: (N, in)}, from `last_token_keys`) is a set of keys of the queries' own template with other
    subjects, its own moment in the metric at `counterfactual_weight`, read on the unedited model (the edits
    are made to leave them alone, so the partly edited model would give nearly the same keys).
    `answer_gradients` ({layer: (n, out)}, from `tracing.attn_out_gradients` on the
    unedited model) restrict each target to the part that moves the answer (`answer_part`).
    """
    result = EditResult()
    n = len(queries)

    def edit_at(layer: int, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        keys = inputs[:n, -1].float()  # (n, in)
        outputs = output[:, -1].float()  # (2n, out)
        residuals = config.target_scale * (outputs[n:] - outputs[:n])  # s·(g − W k), (n, out)
        if answer_gradients is not None:
            residuals = answer_part(residuals, answer_gradients[layer].to(residuals.device), config.off_answer_weight)
        sets = [preserved[layer].last] if preserved else []
        sets += [config.counterfactual_weight * each[layer].to(keys.device) for each in counterfactual_keys if each]
        metric = key_metric(sets, keys.shape[1], config, preserved[layer] if preserved else None)
        left, right = solve_update(keys, residuals, metric, max_rank)
        weight_norm = torch.linalg.vector_norm(lm.attn_out_weight(layer), dtype=torch.float32).item()
        relative = low_rank_norm(left, right) / weight_norm
        scale = min(1.0, max_relative_norm / relative) if relative > 0 else 1.0
        delta = LayerDelta(
            layer=layer,
            module=lm.attn_out_name(layer),
            left=(left * scale).float(),
            right=right.float(),
            relative_norm=relative * scale,
            scaled=scale < 1.0,
        )
        apply_layer_delta(lm, delta)
        result.deltas.append(delta)
        return lm.attn_out(layer).forward(inputs)  # the edited weight's output (forward: no hooks again)

    ids = [lm.tokenizer(p)["input_ids"] for p in [*queries, *guides]]
    run_replacing(lm, encode_ids(lm, ids, share_prefix=False), sorted(layers), edit_at)
    result.deltas = [replace(d, left=d.left.cpu(), right=d.right.cpu()) for d in result.deltas]
    return result


@torch.no_grad()
def last_token_keys(
    lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], known: ByteLru | None = None, batch: int = 64
) -> dict[int, torch.Tensor]:
    """Last-token projection inputs of prompts at each layer: {layer: (N, in)}, in prompt order.

    `known` ((prompt, layer) → key, `WarmState.counterfactual_keys`) keeps them across calls on the same
    unedited model.
    """
    if not prompts:
        return {}
    found: dict[tuple[str, int], torch.Tensor | None] = {}
    for p in prompts:
        for layer in layers:
            found[p, layer] = known.get((p, layer)) if known is not None else None
    todo = list(dict.fromkeys(p for (p, _), key in found.items() if key is None))
    ids = [lm.tokenizer(p)["input_ids"] for p in todo]
    for rows in token_batches(ids, batch, pass_overhead_tokens(lm)) if todo else []:
        record = record_attn_out_ids(lm, [ids[i] for i in rows], layers)
        for layer in layers:
            for row, i in enumerate(rows):
                key = record.inputs[layer][row].clone()
                found[todo[i], layer] = known.put((todo[i], layer), key) if known is not None else key
    return {layer: torch.stack([found[p, layer] for p in prompts]) for layer in layers}


@torch.no_grad()
def key_statistics(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch: int = 64) -> dict[int, KeyStatistics]:
    """Last-token keys and the key moment over every position after the prompts' common prefix (their
    preamble, whose keys are the same in every prompt), per layer, in one pass per batch."""
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    common = shared_prefix_length(ids) if len(ids) > 1 else 0
    last: dict[int, torch.Tensor] = {}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for rows in token_batches(ids, batch, pass_overhead_tokens(lm)):
        # every position is run here, so which ones count does not depend on how the batch was cut
        encoded = encode_ids(lm, [ids[i] for i in rows], share_prefix=False)
        positions = position_ids(encoded.attention_mask)
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
