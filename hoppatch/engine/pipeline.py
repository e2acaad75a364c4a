"""One edit job, stage by stage: diagnose → locate → prepare → evaluate → edit → calibrate → evaluate.

- diagnose: which examples are compositional failures (only those are patched);
- locate: the logit lens and the causal sweep, which choose the band of layers;
- prepare: everything the edit reads besides the examples' own prompts (preserved-key statistics,
  counterfactual keys, the answers' gradients), timed on its own;
- edit: the update, solved and applied layer by layer; calibrate: each example's share of it; an example
  still uncorrected gets columns for its answer's later words in a second solve and calibration;
- evaluate: the probes and the fluency text, before and after.

The model is edited in place and its touched weights are restored, bit-identical, before `run_job` returns.
`patch` is the whole job as a user runs it, publishing included: the CLI and the worker both call it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hoppatch.spec import JobSpec, TwoHopExample

from .answers import BasePasses, answer_variants
from .calibrate import calibrate, scale_examples
from .context import ProgressFn, RunContext, running
from .delta import weight_sha256
from .diagnose import Diagnosis, diagnose
from .edit import (
    EditConfig,
    EditResult,
    KeyStatistics,
    WeightSnapshot,
    apply_layer_delta,
    creme_edit,
    key_statistics,
    last_token_keys,
)
from .errors import InvalidJob, NoCompositionFailure
from .evaluate import (
    FluencyReading,
    Probe,
    ProbeOutcome,
    build_probes,
    fluency_layer_input,
    fluency_text,
    kl_drift,
    read_fluency,
    read_probes,
)
from .lens import LensCurve, first_token, logit_lens
from .lineage import BasePatch, stacked
from .locate import LocateResult, locate_layers
from .models import LoadedModel, cache_root
from .tracing import attn_out_gradients, encode, recorded_layer_input
from .unrelated import counterfactual_queries, preserve_prompts


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
    kl_drift: float | None = None
    base_hashes: dict[str, str] = field(default_factory=dict)
    scales: list[float] | None = None  # per patched example, its share of the update after calibration
    later_words: LaterWords | None = None  # the later-word rows of the update, when its second solve is kept
    seconds: dict[str, float] = field(default_factory=dict)
    parents: list[BasePatch] = field(default_factory=list)
    """The earlier patches this one was solved on top of, oldest first."""
    regression_held: list[bool] = field(default_factory=list)
    """Per probe of the parents' suites, in order: whether it still holds with this patch applied."""

    @property
    def suite(self) -> list[tuple[BasePatch, Probe]]:
        """The parents' regression suites, in order, each probe with the patch it belongs to."""
        return [(parent, probe) for parent in self.parents for probe in parent.suite]

    @property
    def regressions(self) -> list[tuple[BasePatch, Probe]]:
        return [entry for entry, held in zip(self.suite, self.regression_held) if not held]


@dataclass
class EditInputs:
    """What the edit reads besides the queries and guides: the `prepare` stage's product."""

    preserved: dict[int, KeyStatistics]
    counterfactual_keys: list[dict[int, torch.Tensor]]  # sets, each its own moment in the key metric
    answer_gradients: dict[int, torch.Tensor] | None  # a row per solved prompt


KEY_STATISTICS_FORMAT = "last-token keys + moment after the common prefix, v1"
"""Part of the statistics' cache key: change it whenever `key_statistics` computes something else."""


def preserved_prompts(preamble: str, excluded: set[str]) -> list[str]:
    """The shipped unrelated prompts behind `preamble`, less any that is one of the job's own prompts."""
    return [preamble + p for p in preserve_prompts() if p not in excluded]


def preserved_statistics(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], config: EditConfig) -> dict[int, KeyStatistics]:
    """Key statistics of `prompts` at `layers`: kept warm on the model, cached on disk.

    One file per layer (a 7B model's all-position moment is 64 MB a layer, so only edited layers are kept),
    keyed by what the statistics are, the projection they are the inputs of, every weight up to it (through
    their hashes) and the prompts: a changed definition, projection, model or prompt set never reuses stale
    statistics.
    """
    digest = hashlib.sha256(KEY_STATISTICS_FORMAT.encode())
    digest.update("\x00".join(prompts).encode())
    prompts_id = digest.hexdigest()[:32]
    found: dict[int, KeyStatistics] = {}
    missing: dict[int, Path] = {}  # layer → its disk-cache directory
    for layer in layers:
        stats = lm.warm.key_statistics.get((prompts_id, layer))
        if stats is None:
            directory = _statistics_dir(lm, layer, prompts_id)
            if (directory / "statistics.safetensors").exists():
                os.utime(directory / "statistics.safetensors")  # recently used: trimmed last
                tensors = load_file(str(directory / "statistics.safetensors"), device=str(lm.device))
                stats = KeyStatistics(tensors["last"], tensors["moment"])
            else:
                missing[layer] = directory
        if stats is not None:
            found[layer] = stats
    for layer, stats in (key_statistics(lm, prompts, list(missing)).items() if missing else ()):
        _store(missing[layer] / "statistics.safetensors", {"last": stats.last, "moment": stats.moment})
        found[layer] = stats
    for layer, stats in found.items():
        stats.base_factor(config)  # computed before it is sized and kept
        lm.warm.key_statistics.put((prompts_id, layer), stats)
    return {layer: found[layer] for layer in layers}


def _store(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a disk-cache file atomically: a concurrent reader finds the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{os.getpid()}.partial"
    save_file({name: t.cpu().contiguous() for name, t in tensors.items()}, str(staging), metadata)
    staging.rename(path)


DISK_CACHES = ("preserved-keys", "fluency")
"""The engine's disk caches under `cache_root()`: preserved-key statistics and base fluency readings."""


def trim_disk_caches(budget: int) -> list[Path]:
    """Delete the least recently used disk-cache files until the caches hold at most `budget` bytes together."""
    files = []
    for path in (p for cache in DISK_CACHES for p in (cache_root() / cache).rglob("*.safetensors")):
        try:
            info = path.stat()
        except FileNotFoundError:  # another worker sharing the cache trimmed it
            continue
        files.append((info.st_mtime, info.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in files:
        if total <= budget:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def _statistics_dir(lm: LoadedModel, layer: int, prompts_id: str) -> Path:
    """Statistics at `layer` are of the edited projection's inputs, and depend on the weights of the layers
    below and of the layer itself."""
    weights = hashlib.sha256(lm.attn_out_name(layer).encode())
    for name, parameter in lm.model.named_parameters():
        if _below_or_at(lm, name, layer):
            weights.update(name.encode())
            weights.update(_parameter_hash(lm, name, parameter).encode())
    return cache_root() / "preserved-keys" / weights.hexdigest()[:32] / f"layer-{layer}" / prompts_id


def _below_or_at(lm: LoadedModel, name: str, layer: int) -> bool:
    prefix = lm.arch.layers + "."
    if not name.startswith(prefix):
        return "embed" in name or "wte" in name or "wpe" in name
    return int(name[len(prefix) :].split(".")[0]) <= layer


def _parameter_hash(lm: LoadedModel, name: str, parameter: torch.Tensor) -> str:
    hashes = lm.warm.weight_hashes
    if name not in hashes:
        hashes[name] = weight_sha256(parameter)
    return hashes[name]


GENERATED_TOKENS = 16
"""Room left after the longest prompt for the answers the engine scores and the continuations it reads."""


def check_lengths(lm: LoadedModel, spec: JobSpec) -> None:
    """Every prompt, behind the preamble, fits the model's context with room to answer: checked in tokens
    before any forward pass, because a position past the context is a device-side assert on a GPU."""
    limit = lm.context_length
    if limit is None:
        return
    for ex in spec.examples:
        texts = [ex.query, ex.hop1.prompt, ex.hop2.prompt, *ex.paraphrases]
        texts += [q.prompt for q in (*ex.generalization, *ex.specificity)]
        ids = lm.tokenizer([spec.preamble + text for text in texts])["input_ids"]
        tokens = max(len(row) for row in ids) + GENERATED_TOKENS
        if tokens > limit:
            raise InvalidJob(
                f"example {ex.id!r}: the preamble and its longest prompt take {tokens - GENERATED_TOKENS} tokens; "
                f"{lm.ref} takes {limit}, less {GENERATED_TOKENS} for the answer"
            )


def base_weights_intact(lm: LoadedModel) -> bool:
    """Whether every weight an edit touched is back to its base value (hash-checked), so the model can serve
    the next job. An interrupted restore is the one way it is not."""
    for name, digest in list(lm.warm.unverified.items()):
        if weight_sha256(lm.model.get_parameter(name)) != digest:
            return False
        del lm.warm.unverified[name]
    return True


def run_job(
    lm: LoadedModel,
    spec: JobSpec,
    *,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    config: EditConfig = EditConfig(),
    fluency: bool = True,
    parents: Sequence[BasePatch] = (),
) -> JobOutcome:
    """Diagnose, locate, prepare, edit and evaluate; the model is back to its base weights on return.

    `fluency=False` leaves out the fluency text (perplexity and KL drift stay None): for tuning runs, where
    only the probes are compared. `parents` are the patches already applied (see `lineage.stacked`): their
    suites are re-read with this edit applied.
    """
    if spec.layers and max(spec.layers) >= lm.num_layers:
        raise InvalidJob(f"layers {spec.layers} asked for, but {lm.ref} has {lm.num_layers} layers (0..{lm.num_layers - 1})")
    check_lengths(lm, spec)
    context = RunContext(spec.budget.max_seconds, should_stop, progress)
    outcome = JobOutcome(spec, [], [], seconds=context.seconds, parents=list(parents))
    with running(context):
        return _run_stages(lm, spec, outcome, context, config, fluency)


def _run_stages(
    lm: LoadedModel, spec: JobSpec, outcome: JobOutcome, run: RunContext, config: EditConfig, measure_fluency: bool
) -> JobOutcome:
    pre = spec.preamble

    with run.stage("diagnose", 0.0, f"diagnosing {len(spec.examples)} examples"):
        outcome.diagnoses = diagnose(lm, spec.examples, pre)
    outcome.patched = [ex for ex, d in zip(spec.examples, outcome.diagnoses) if d.patchable]
    if not outcome.patched:
        counts = dict(Counter(d.verdict.value for d in outcome.diagnoses))
        raise NoCompositionFailure(f"no example is a compositional failure of {lm.ref}: {counts}")
    queries = [pre + ex.query for ex in outcome.patched]
    guides = [pre + ex.hop2.prompt for ex in outcome.patched]
    answers = [ex.answer for ex in outcome.patched]

    with run.stage("locate", 0.15, f"locating layers for {len(queries)} compositional failures"):
        curves = logit_lens(lm, queries, [ex.hop1.answer for ex in outcome.patched], answers)
        outcome.lens = {ex.id: c for ex, c in zip(outcome.patched, curves)}
        outcome.located = locate_layers(lm, queries, guides, answers, spec.budget.max_layers)
        outcome.layers = sorted(spec.layers) if spec.layers else outcome.located.layers

    predictions = {d.example_id: d.prediction for d in outcome.diagnoses if d.patchable}
    probes = build_probes(outcome.patched, predictions)
    with run.stage("prepare", 0.25, "reading what the edit must leave alone"):
        inputs = prepare_edit(lm, spec, outcome.patched, probes, outcome.layers, config)

    with run.stage("evaluate", 0.35, "scoring the probes before the edit"):
        lowest = min(outcome.layers)
        base_passes = BasePasses(lowest)  # the reading after the edit starts at the lowest edited layer
        before = read_probes(lm, probes, pre, lm.warm.readings, record=base_passes)
        fluency = base_fluency(lm, lowest) if measure_fluency else None
        resume = (lowest, base_fluency_input(lm, lowest)) if measure_fluency else None
    outcome.base_hashes = {lm.attn_out_name(l): weight_sha256(lm.attn_out(l).weight) for l in outcome.layers}
    lm.warm.unverified.update({f"{name}.weight": digest for name, digest in outcome.base_hashes.items()})
    snapshot = WeightSnapshot(lm, outcome.layers)
    try:
        _edit_and_calibrate(lm, spec, outcome, run, probes, inputs, snapshot, config)
        for delta in outcome.edit.deltas:
            apply_layer_delta(lm, delta)
        with run.stage("evaluate", 0.7, "scoring the probes after the edit"):
            after = read_probes(lm, probes, pre, replay=base_passes)
            suite = [probe for _, probe in outcome.suite]
            outcome.regression_held = [reading.gives for reading in read_probes(lm, suite, "")] if suite else []
            if fluency is not None:
                patched = read_fluency(lm, fluency, resume=resume)
                outcome.perplexity_before, outcome.perplexity_after = fluency.perplexity, patched.perplexity
                outcome.kl_drift = kl_drift(fluency, patched)
    finally:
        snapshot.restore()
    outcome.probes = [ProbeOutcome(p, b, a) for p, b, a in zip(probes, before, after)]
    return outcome


def _edit_and_calibrate(
    lm: LoadedModel, spec: JobSpec, outcome: JobOutcome, run: RunContext, probes: Sequence[Probe], inputs: EditInputs,
    snapshot: WeightSnapshot, config: EditConfig,
) -> None:
    """Solve and calibrate; then, if calibration leaves examples with many-word answers uncorrected, solve again
    with their answers' later words (`EditConfig.later_words`), kept if it corrects more. Leaves the scaled
    deltas in `outcome.edit` (uncorrected examples dropped, or the update kept whole when no example is
    corrected, for the job's correction rate to say what happened) and the model at its base weights."""
    pre = spec.preamble
    queries = [pre + ex.query for ex in outcome.patched]
    guides = [pre + ex.hop2.prompt for ex in outcome.patched]

    def solve(rows: LaterWords, inputs: EditInputs) -> EditResult:
        with run.stage("edit", 0.5, f"editing layers {outcome.layers}"):
            result = creme_edit(
                lm, queries + rows.prompts(queries), guides + rows.prompts(guides), outcome.layers,
                max_rank=spec.budget.max_rank,
                max_relative_norm=spec.budget.max_relative_norm,
                preserved=inputs.preserved,
                counterfactual_keys=inputs.counterfactual_keys,
                answer_gradients=inputs.answer_gradients,
                config=config,
            )
        snapshot.restore()
        return result

    outcome.edit = solve(LaterWords([], [], []), inputs)
    if any(d.rank != len(queries) for d in outcome.edit.deltas):  # compressed: no column per example to scale
        return
    variants = [answer_variants(ex.answer, ex.aliases) for ex in outcome.patched]
    with run.stage("calibrate", 0.6, "scaling each example's share to the least that corrects it"):
        outcome.scales = calibrate(lm, outcome.edit.deltas, queries, variants, config.calibration_steps)
    rows = later_words(outcome.patched, outcome.scales, config.later_words, spec.budget.max_rank - len(queries))
    if rows.owners:
        with run.stage("prepare", 0.62, "reading the later words of the answers the edit left uncorrected"):
            extended = prepare_later_words(lm, spec, outcome.patched, rows, probes, outcome.layers, inputs, config)
        second = solve(rows, extended)
        with run.stage("calibrate", 0.65, f"scaling the shares again with {len(rows.owners)} later-word columns"):
            scales = calibrate(lm, second.deltas, queries, variants, config.calibration_steps, rows.column_owners(len(queries)))
        if sum(s > 0 for s in scales) > sum(s > 0 for s in outcome.scales):
            outcome.edit, outcome.scales, outcome.later_words = second, scales, rows
    if not any(outcome.scales):
        outcome.scales = [1.0] * len(queries)
    later = outcome.later_words
    owners = later.column_owners(len(queries)) if later else None
    outcome.edit.deltas = scale_examples(outcome.edit.deltas, outcome.scales, owners)


@dataclass(frozen=True)
class LaterWords:
    """Rows for a second solve: an uncorrected example's query and guide, each followed by the first words of
    its answer, whose target is the answer's next word."""

    owners: list[int]  # the patched example each row belongs to
    said: list[str]  # the answer's words already given, appended to the prompts
    next_words: list[str]

    def column_owners(self, examples: int) -> list[int]:
        """The example each column of a solve over `examples` queries and these rows belongs to, in order."""
        return list(range(examples)) + self.owners

    def words_of(self, example: int) -> list[str]:
        """The later words that have a column of their own for the patched example `example`."""
        return [word for i, word in zip(self.owners, self.next_words) if i == example]

    def prompts(self, of: Sequence[str]) -> list[str]:
        """Each row's prompt: its owner's prompt in `of` followed by the words already given."""
        return [f"{of[i]} {said}" for i, said in zip(self.owners, self.said)]


def later_words(patched: Sequence[TwoHopExample], scales: Sequence[float], count: int, room: int) -> LaterWords:
    """Rows for up to `count` later words of each dropped example's answer, whole examples only, at most `room`."""
    owners, said, next_words = [], [], []
    for i, (example, scale) in enumerate(zip(patched, scales)):
        words = example.answer.split()
        ahead = range(1, min(len(words), count + 1)) if scale == 0 else range(0)
        if len(owners) + len(ahead) > room:
            continue
        owners += [i] * len(ahead)
        said += [" ".join(words[:j]) for j in ahead]
        next_words += [words[j] for j in ahead]
    return LaterWords(owners, said, next_words)


def job_prompts(patched: Sequence[TwoHopExample], probes: Sequence[Probe]) -> set[str]:
    """The job's own prompts (its examples' and its probes'): never among the keys the edit preserves."""
    return {p.prompt for p in probes} | {prompt for ex in patched for prompt in (ex.query, ex.hop1.prompt, ex.hop2.prompt)}


def prepare_later_words(
    lm: LoadedModel, spec: JobSpec, patched: Sequence[TwoHopExample], rows: LaterWords, probes: Sequence[Probe],
    layers: Sequence[int], inputs: EditInputs, config: EditConfig
) -> EditInputs:
    """`inputs` extended to the later-word rows: their counterfactuals' keys (each row's counterfactual
    queries followed by the same words) as a set of their own, and their next words' gradients."""
    pre = spec.preamble
    excluded = job_prompts(patched, probes)
    each = config.counterfactuals_each(len(rows.owners))
    counterfactuals = [
        f"{pre}{query} {said}"
        for i, said in zip(rows.owners, rows.said)
        for query in counterfactual_queries(patched[i], each)
        if query not in excluded
    ]
    keys = last_token_keys(lm, counterfactuals, layers, known=lm.warm.counterfactual_keys)
    gradients = inputs.answer_gradients
    if gradients is not None:
        targets = [first_token(lm, word) for word in rows.next_words]
        more = attn_out_gradients(lm, rows.prompts([pre + ex.query for ex in patched]), targets, layers)
        gradients = {layer: torch.cat([gradients[layer], more[layer]]) for layer in layers}
    return EditInputs(inputs.preserved, [*inputs.counterfactual_keys, keys], gradients)


def prepare_edit(
    lm: LoadedModel, spec: JobSpec, patched: Sequence[TwoHopExample], probes: Sequence[Probe], layers: Sequence[int], config: EditConfig
) -> EditInputs:
    """Preserved-prompt statistics and counterfactual keys at `layers`, never from the job's own probe
    prompts, and the answers' gradients there."""
    pre = spec.preamble
    excluded = job_prompts(patched, probes)
    preserved = preserved_statistics(lm, preserved_prompts(pre, excluded), layers, config)
    each = config.counterfactuals_each(len(patched))
    counterfactuals = [pre + c for ex in patched for c in counterfactual_queries(ex, each) if c not in excluded]
    counterfactual_keys = last_token_keys(lm, counterfactuals, layers, known=lm.warm.counterfactual_keys)
    # which way each query's answer moves at the edited layers: read on the unedited model, like the sweep
    gradients = None
    if config.off_answer_weight < 1:
        targets = [first_token(lm, ex.answer) for ex in patched]
        gradients = attn_out_gradients(lm, [pre + ex.query for ex in patched], targets, layers)
    return EditInputs(preserved, [counterfactual_keys], gradients)


FLUENCY_READING_FORMAT = "fluency-reading/3"
"""Version of the stored base fluency reading; a changed definition never reuses a stored one."""


def base_fluency(lm: LoadedModel, record_layer: int | None = None) -> FluencyReading:
    """The unedited model's fluency reading, kept warm (every job restores the base weights) and on disk (a
    new process reads it there instead of unembedding the whole text). When it is read anew, the same pass
    also keeps the text's input to `record_layer` (see `base_fluency_input`)."""
    if lm.warm.fluency is not None:
        return lm.warm.fluency
    path = _fluency_path(lm)
    if path.exists():
        os.utime(path)  # recently used: trimmed last
        with safe_open(str(path), "pt") as stored:
            perplexity = float(stored.metadata()["perplexity"])
            lm.warm.fluency = FluencyReading(perplexity, stored.get_tensor("top_ids"), stored.get_tensor("logprobs"))
        return lm.warm.fluency
    with recorded_layer_input(lm, record_layer) if record_layer is not None else nullcontext([]) as seen:
        reading = read_fluency(lm)
    if seen:
        lm.warm.fluency_inputs[record_layer] = seen[0]
    _store(path, {"top_ids": reading.top_ids, "logprobs": reading.logprobs}, {"perplexity": repr(reading.perplexity)})
    lm.warm.fluency = reading
    return reading


def _fluency_path(lm: LoadedModel) -> Path:
    """The base reading depends on the text's token ids, every weight (through their hashes) and the kind of
    device it ran on."""
    digest = hashlib.sha256(FLUENCY_READING_FORMAT.encode())
    digest.update(lm.device.type.encode())
    digest.update(encode(lm, [fluency_text()]).input_ids.cpu().numpy().tobytes())
    for name, parameter in lm.model.named_parameters():
        digest.update(name.encode())
        digest.update(_parameter_hash(lm, name, parameter).encode())
    return cache_root() / "fluency" / digest.hexdigest()[:32] / "reading.safetensors"


def base_fluency_input(lm: LoadedModel, layer: int) -> torch.Tensor:
    """The fluency text's input to `layer` on the unedited model, kept warm: an edit from `layer` up leaves it
    as it is, so the edited model's reading starts there."""
    if layer not in lm.warm.fluency_inputs:
        lm.warm.fluency_inputs[layer] = fluency_layer_input(lm, layer)
    return lm.warm.fluency_inputs[layer]


def patch(lm: LoadedModel, spec: JobSpec, out_dir: Path, *, progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None, base_patches: Sequence[tuple[str, Path]] = ()) -> tuple[JobOutcome, dict]:
    """The whole job as a user runs it: `run_job`, then `publish` into `out_dir`. Returns the outcome and metrics.

    `base_patches` ((label, delta file), oldest first) are applied before the job and removed after it: the new
    patch is solved on top of them, and their regression suites are re-read."""
    from .publish import publish

    with stacked(lm, base_patches) as parents:
        outcome = run_job(lm, spec, progress=progress, should_stop=should_stop, parents=parents)
    if progress:
        progress("publish", 0.8, "writing artifacts")
    return outcome, publish(outcome, lm, out_dir)
