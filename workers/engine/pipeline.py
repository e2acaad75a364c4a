"""One edit job, stage by stage: diagnose → locate → edit → calibrate → evaluate. `publish` writes what it found.

The model is edited in place and its touched weights are restored, bit-identical, before `run_job` returns.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from hoppatch.spec import JobSpec, TwoHopExample

from .answers import answer_variants
from .calibrate import calibrate
from .delta import weight_sha256
from .diagnose import Diagnosis, diagnose
from .edit import EditConfig, EditResult, KeyStatistics, WeightSnapshot, creme_edit, key_statistics, last_token_keys
from .errors import BudgetExceeded, Cancelled, InvalidJob, NoCompositionFailure
from .evaluate import ProbeOutcome, base_perplexity, build_probes, perplexity, read_after, read_before
from .lens import LensCurve, first_token, logit_lens
from .locate import LocateResult, locate_layers
from .models import LoadedModel, cache_root
from .tracing import attn_out_gradients
from .unrelated import COUNTERFACTUALS_PER_EXAMPLE, COUNTERFACTUALS_PER_JOB, counterfactual_queries, preserve_prompts

ProgressFn = Callable[[str, float, str], None]
"""Called with (stage, fraction of the whole job done, message)."""


@dataclass
class JobOutcome:
    spec: JobSpec
    diagnoses: list[Diagnosis]
    patched: list[TwoHopExample]
    lens: dict[str, LensCurve] = field(default_factory=dict)
    located: LocateResult | None = None
    layers: list[int] = field(default_factory=list)
    edit: EditResult | None = None
    probes: list[ProbeOutcome] = field(default_factory=list)
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    base_hashes: dict[str, str] = field(default_factory=dict)
    scales: list[float] | None = None  # per patched example, its share of the update after calibration
    seconds: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Stage timer that also enforces the budget and checks for cancellation between steps."""

    def __init__(self, outcome: JobOutcome, max_seconds: float, progress: ProgressFn | None, should_stop):
        self.outcome, self.progress, self.should_stop = outcome, progress, should_stop
        self.deadline = time.perf_counter() + max_seconds
        self.stage_name = "start"

    def check(self, where: str) -> None:
        if self.should_stop and self.should_stop():
            raise Cancelled(f"cancelled during {where}")
        if time.perf_counter() > self.deadline:
            raise BudgetExceeded(f"the job ran past budget.max_seconds during {where}")

    @contextmanager
    def stage(self, name: str, fraction: float, message: str) -> Iterator[None]:
        """Time a stage (adding up when it comes back: evaluate runs before and after the edit)."""
        self.check(name)
        self.stage_name = name
        if self.progress:
            self.progress(name, fraction, message)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.outcome.seconds[name] = self.outcome.seconds.get(name, 0.0) + time.perf_counter() - started


KEY_STATISTICS_FORMAT = "last-token keys + moment after the common prefix, v1"
"""Part of the statistics' cache key: change it whenever `key_statistics` computes something else."""


def preserved_statistics(lm: LoadedModel, preamble: str, layers: Sequence[int]) -> dict[int, KeyStatistics]:
    """Key statistics of the shipped unrelated prompts at `layers`: kept warm on the model, cached on disk.

    One file per layer (a 7B model's all-position moment is 64 MB a layer, so only edited layers are kept),
    keyed by what the statistics are, the model's first attention weight, the preamble and the prompts: a
    changed definition, model or prompt set never reuses stale statistics.
    """
    memo: dict[int, KeyStatistics] = lm.memo.setdefault(("preserved", preamble), {})
    prompts = [preamble + p for p in preserve_prompts()]
    digest = hashlib.sha256(KEY_STATISTICS_FORMAT.encode())
    digest.update(weight_sha256(lm.attn_out(0).weight).encode())
    digest.update("\x00".join(prompts).encode())
    directory = cache_root() / "preserved-keys" / digest.hexdigest()[:32]
    for layer in layers:
        path = directory / f"layer-{layer}.safetensors"
        if layer not in memo and path.exists():
            tensors = load_file(str(path), device=str(lm.device))
            memo[layer] = KeyStatistics(tensors["last"], tensors["moment"])
    missing = [layer for layer in layers if layer not in memo]
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        for layer, stats in key_statistics(lm, prompts, missing).items():
            staging = directory / f".layer-{layer}.{os.getpid()}.partial"
            save_file({"last": stats.last.cpu().contiguous(), "moment": stats.moment.cpu().contiguous()}, str(staging))
            staging.rename(directory / f"layer-{layer}.safetensors")
            memo[layer] = stats
    return {layer: memo[layer] for layer in layers}


def run_job(
    lm: LoadedModel,
    spec: JobSpec,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    config: EditConfig = EditConfig(),
) -> JobOutcome:
    """Diagnose, locate, edit and evaluate; the model is back to its base weights on return."""
    if spec.layers and max(spec.layers) >= lm.num_layers:
        raise InvalidJob(f"layers {spec.layers} asked for, but {lm.ref} has {lm.num_layers} layers (0..{lm.num_layers - 1})")
    outcome = JobOutcome(spec, [], [])
    clock = _Clock(outcome, spec.budget.max_seconds, progress, should_stop)
    lm.before_pass = lambda: clock.check(clock.stage_name)  # every forward pass is a stop point
    try:
        return _run_stages(lm, spec, outcome, clock, config)
    finally:
        lm.before_pass = None


def _run_stages(lm: LoadedModel, spec: JobSpec, outcome: JobOutcome, clock: _Clock, config: EditConfig) -> JobOutcome:
    pre = spec.preamble

    with clock.stage("diagnose", 0.0, f"diagnosing {len(spec.examples)} examples"):
        outcome.diagnoses = diagnose(lm, spec.examples, pre)
    outcome.patched = [ex for ex, d in zip(spec.examples, outcome.diagnoses) if d.patchable]
    if not outcome.patched:
        counts = dict(Counter(d.verdict.value for d in outcome.diagnoses))
        raise NoCompositionFailure(f"no example is a compositional failure of {lm.ref}: {counts}")
    queries = [pre + ex.query for ex in outcome.patched]
    guides = [pre + ex.hop2.prompt for ex in outcome.patched]
    answers = [ex.answer for ex in outcome.patched]

    with clock.stage("locate", 0.15, f"locating layers for {len(queries)} compositional failures"):
        curves = logit_lens(lm, queries, [ex.hop1.answer for ex in outcome.patched], answers)
        outcome.lens = {ex.id: c for ex, c in zip(outcome.patched, curves)}
        outcome.located = locate_layers(lm, queries, guides, answers, spec.budget.max_layers)
        outcome.layers = sorted(spec.layers) if spec.layers else outcome.located.layers
        preserved = preserved_statistics(lm, pre, outcome.layers)
        each = max(4, min(COUNTERFACTUALS_PER_EXAMPLE, COUNTERFACTUALS_PER_JOB // len(outcome.patched)))
        counterfactuals = [pre + c for ex in outcome.patched for c in counterfactual_queries(ex, each)]
        counterfactual_keys = last_token_keys(lm, counterfactuals, outcome.layers, memo=lm.memo.setdefault("keys", {}))
        # which way each query's answer moves at the edited layers: read on the unedited model, like the sweep
        targets = [first_token(lm, answer) for answer in answers]
        gradients = attn_out_gradients(lm, queries, targets, outcome.layers) if config.off_answer_weight < 1 else None

    predictions = {d.example_id: d.prediction for d in outcome.diagnoses if d.patchable}
    probes = build_probes(outcome.patched, predictions)
    outcome.base_hashes = {lm.attn_out_name(l): weight_sha256(lm.attn_out(l).weight) for l in outcome.layers}
    snapshot = WeightSnapshot(lm, outcome.layers)
    try:
        with clock.stage("evaluate", 0.35, "scoring the probes before the edit"):
            before = read_before(lm, probes, pre)
            outcome.perplexity_before = base_perplexity(lm)
        with clock.stage("edit", 0.5, f"editing layers {outcome.layers}"):
            outcome.edit = creme_edit(
                lm, queries, guides, outcome.layers,
                max_rank=spec.budget.max_rank,
                max_relative_norm=spec.budget.max_relative_norm,
                preserved=preserved,
                counterfactual_keys=counterfactual_keys,
                answer_gradients=gradients,
                config=config,
            )
        if all(d.rank == len(queries) for d in outcome.edit.deltas):  # one column per example: not compressed
            with clock.stage("calibrate", 0.6, "scaling each example's share to the least that corrects it"):
                variants = [answer_variants(ex.answer, ex.aliases) for ex in outcome.patched]
                outcome.edit.deltas, outcome.scales = calibrate(lm, outcome.edit.deltas, snapshot, queries, variants)
        with clock.stage("evaluate", 0.7, "scoring the probes after the edit"):
            after = read_after(lm, probes, before, pre)
            outcome.perplexity_after = perplexity(lm)
    finally:
        snapshot.restore()
    outcome.probes = [ProbeOutcome(p, b, a) for p, b, a in zip(probes, before, after)]
    return outcome
