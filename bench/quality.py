"""Patch quality on a half of the dev set, in the two job shapes, for the engine and the authors' recipe.

    .venv/bin/python bench/dataset.py                       # once: builds bench/results/<model>-{tune,validation}.json
    .venv/bin/python bench/quality.py --split validation    # engine, all failures in one job and jobs of 10
    .venv/bin/python bench/quality.py --split tune --shape all --set ridge=0.01   # a tuning run
    .venv/bin/python bench/quality.py --split validation --authors                # the authors' recipe too

Every row is counted strictly (see hoppatch.engine.evaluate): correction, paraphrase and generalization
give the answer or a user's alias as the greedy continuation; specificity is an unchanged continuation,
kept-or-right the looser rule, and right-kept the unrelated queries answered right before the patch that still
are. Perplexity increase and KL drift are on the shipped fluency text, averaged
over the jobs of a shape. Edit seconds per example count prepare, edit and calibrate (all the edit needs).
Prints a markdown table and writes bench/results/quality-<model>-<split>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.authors_recipe import AUTHORS_BANDS, authors_edit  # noqa: E402
from hoppatch.engine.delta import save_delta  # noqa: E402
from hoppatch.engine.diagnose import diagnose  # noqa: E402
from hoppatch.engine.edit import EditConfig, WeightSnapshot  # noqa: E402
from hoppatch.engine.errors import NoCompositionFailure  # noqa: E402
from hoppatch.engine.lineage import stacked  # noqa: E402
from hoppatch.engine.evaluate import ProbeOutcome, build_probes, kl_drift, rates, read_fluency, read_probes  # noqa: E402
from hoppatch.engine.models import LoadedModel, load_model  # noqa: E402
from hoppatch.engine.pipeline import base_fluency, run_job  # noqa: E402
from hoppatch.spec import Budget, JobSpec, TwoHopExample, read_examples, read_preamble  # noqa: E402

COLUMNS = ("correction", "paraphrase", "generalization", "specificity", "specificity_kept_or_right", "specificity_right_kept")


@dataclass
class Row:
    method: str
    shape: str
    examples: int
    correction: float | None
    paraphrase: float | None
    generalization: float | None
    specificity: float | None
    specificity_kept_or_right: float | None
    specificity_right_kept: float | None
    perplexity_increase: float | None
    kl_drift: float | None
    edit_seconds_per_example: float
    dropped: int = 0


def jobs_of(examples: list[TwoHopExample], shape: str) -> list[list[TwoHopExample]]:
    if shape == "all":
        return [examples]
    size = int(shape)
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def engine_row(
    lm: LoadedModel, examples: list[TwoHopExample], preamble: str, shape: str, config: EditConfig, model: str, fluency: bool,
    budget: Budget = Budget(), layers: tuple[int, ...] = (),
) -> Row:
    probes: list[ProbeOutcome] = []
    ppl, kl, seconds, dropped = [], [], 0.0, 0
    for job in jobs_of(examples, shape):
        spec = JobSpec(model=model, examples=job, preamble=preamble, budget=budget, layers=list(layers) or None)
        outcome = run_job(lm, spec, config=config, fluency=fluency)
        probes += outcome.probes
        if fluency:
            ppl.append(outcome.perplexity_after / outcome.perplexity_before - 1)
            kl.append(outcome.kl_drift)
        seconds += sum(outcome.seconds.get(s, 0.0) for s in ("prepare", "edit", "calibrate"))
        dropped += sum(s == 0 for s in outcome.scales or [])
        print(f"  engine job of {len(job)}: layers {outcome.layers}, {outcome.seconds}", file=sys.stderr, flush=True)
    return _row("engine", shape, examples, probes, ppl, kl, seconds, dropped)


def stacked_row(
    lm: LoadedModel, examples: list[TwoHopExample], preamble: str, size: int, config: EditConfig, model: str, budget: Budget = Budget(),
) -> Row:
    """One job's failures solved in rounds of `size`, each round on top of the rounds before it (as jobs with
    `base_patches` are); every probe of every example read on the base and with the whole chain applied."""
    work = Path(tempfile.mkdtemp(prefix="rounds-"))
    chain: list[tuple[str, Path]] = []
    seconds, dropped = 0.0, 0
    for k, job in enumerate(jobs_of(examples, str(size))):
        with stacked(lm, chain) as parents:
            try:
                outcome = run_job(lm, JobSpec(model=model, examples=job, preamble=preamble, budget=budget), config=config, fluency=False, parents=parents)
            except NoCompositionFailure:  # earlier rounds corrected these already
                continue
        path = work / f"round-{k}.safetensors"
        save_delta(path, outcome.edit.deltas, base_model=model, base_hashes=outcome.base_hashes, conv1d=lm.arch.conv1d, budget={})
        chain.append((f"round-{k}", path))
        seconds += sum(outcome.seconds.get(s, 0.0) for s in ("prepare", "edit", "calibrate"))
        dropped += sum(s == 0 for s in outcome.scales or [])
        print(f"  round {k}: {len(outcome.patched)} patched, layers {outcome.layers}", file=sys.stderr, flush=True)
    predictions = {ex.id: d.prediction for ex, d in zip(examples, diagnose(lm, examples, preamble))}
    probes = build_probes(examples, predictions)
    before = read_probes(lm, probes, preamble, lm.warm.readings)
    with stacked(lm, chain):
        after = read_probes(lm, probes, preamble)
    outcomes = [ProbeOutcome(p, b, a) for p, b, a in zip(probes, before, after)]
    return _row("engine", f"rounds of {size}", examples, outcomes, [], [], seconds, dropped)


def authors_row(lm: LoadedModel, examples: list[TwoHopExample], preamble: str, shape: str, band: list[int]) -> Row:
    """The authors' recipe: each example's rank-one updates, one example after another within a job."""
    probes: list[ProbeOutcome] = []
    ppl, kl, seconds = [], [], 0.0
    base = base_fluency(lm)
    for job in jobs_of(examples, shape):
        job_probes = build_probes(job, {})
        before = read_probes(lm, job_probes, preamble, lm.warm.readings)
        snapshot = WeightSnapshot(lm, band)
        started = time.perf_counter()
        try:
            for example in job:
                authors_edit(lm, example.query, example.hop2.prompt, band, preamble)
            seconds += time.perf_counter() - started
            after = read_probes(lm, job_probes, preamble)
            fluency = read_fluency(lm, base)
        finally:
            snapshot.restore()
        probes += [ProbeOutcome(p, b, a) for p, b, a in zip(job_probes, before, after)]
        ppl.append(fluency.perplexity / base.perplexity - 1)
        kl.append(kl_drift(base, fluency))
    return _row("authors", shape, examples, probes, ppl, kl, seconds, 0)


def _row(method, shape, examples, probes, ppl, kl, seconds, dropped) -> Row:
    r = rates(probes)
    return Row(
        method, shape, len(examples), r.correction, r.paraphrase, r.generalization, r.specificity,
        r.specificity_kept_or_right, r.specificity_right_kept, _mean(ppl), _mean(kl), seconds / len(examples), dropped,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:+.1f} %"


def print_table(split: str, rows: list[Row]) -> None:
    print(f"| split | method | job shape | failures | {' | '.join(COLUMNS)} | perplexity Δ | KL drift | edit s/example | dropped |")
    print("|" + " --- |" * (len(COLUMNS) + 9))
    for row in rows:
        cells = " | ".join(_cell(getattr(row, c)) for c in COLUMNS)
        shape = {"all": "all in one job", "10": "jobs of 10"}.get(row.shape, row.shape)
        print(
            f"| {split} | {row.method} | {shape} | {row.examples} | {cells} | {_percent(row.perplexity_increase)} | "
            f"{_cell(row.kl_drift)} | {row.edit_seconds_per_example:.2f} | {row.dropped} |"
        )


def parse_config(items: list[str]) -> tuple[EditConfig, Budget, tuple[int, ...]]:
    """EditConfig overrides (FIELD=VALUE, a tuple as comma-separated numbers), budget fields (`max_layers=N`,
    `max_rank=N`, `max_relative_norm=X`), and `layers=A,B,...` for a fixed band."""
    config, budget, layers = EditConfig(), Budget(), ()
    types = {f.name: f.type for f in fields(EditConfig)}
    for item in items:
        name, _, value = item.partition("=")
        if name in Budget.__struct_fields__:
            budget = msgspec.convert({**msgspec.to_builtins(budget), name: float(value)}, Budget, strict=False)
            continue
        if name == "layers":  # a fixed band instead of the located one
            layers = tuple(int(v) for v in value.split(","))
            continue
        if name not in types:
            raise SystemExit(f"--set {item}: no EditConfig field {name!r}")
        kind = str(types[name])
        parsed = tuple(float(v) for v in value.split(",")) if "tuple" in kind else int(value) if kind == "int" else float(value)
        config = replace(config, **{name: parsed})
    return config, budget, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--split", choices=("tune", "validation"), required=True)
    parser.add_argument("--shape", action="append", choices=("all", "10", "rounds"), help="job shapes (default: all and 10); "
                        "rounds: one job solved in rounds of 10, each on top of the ones before")
    parser.add_argument("--authors", action="store_true", help="also run the authors' recipe")
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="an EditConfig override, or a budget field (max_layers=N, max_rank=N, max_relative_norm=X)")
    parser.add_argument(
        "--try", dest="tries", action="append", default=[], metavar="'FIELD=VALUE ...'",
        help="another config to run in the same process (warm readings shared); repeatable",
    )
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--no-fluency", action="store_true", help="leave out the fluency text (tuning runs)")
    parser.add_argument("--preamble-file", default=str(ROOT / "examples" / "preamble.txt"))
    args = parser.parse_args()

    stem = args.model.removeprefix("builtin:")
    examples = read_examples(ROOT / "bench" / "results" / f"{stem}-{args.split}.json")
    if args.limit:
        examples = examples[: args.limit]
    preamble = read_preamble(args.preamble_file)
    configs = {" ".join(args.set) or "defaults": parse_config(args.set)}
    for extra in args.tries:
        configs[" ".join([*args.set, extra])] = parse_config([*args.set, *extra.split()])
    lm = load_model(args.model)
    rows = []
    for shape in args.shape or ["all", "10"]:
        if args.authors:
            rows.append(authors_row(lm, examples, preamble, shape, AUTHORS_BANDS[args.model]))
        for label, (config, budget, layers) in configs.items() if not args.no_engine else ():
            if shape == "rounds":
                row = stacked_row(lm, examples, preamble, 10, config, args.model, budget)
            else:
                row = engine_row(lm, examples, preamble, shape, config, args.model, not args.no_fluency, budget, layers)
            row.method = f"engine ({label})" if len(configs) > 1 else "engine"
            rows.append(row)
            print_table(args.split, [row])
    print(f"{args.model}, {args.split} half, {len(examples)} compositional failures; EditConfig overrides: {args.set or 'none'}")
    print_table(args.split, rows)
    out = ROOT / "bench" / "results" / f"quality-{stem}-{args.split}.json"
    document = {"model": args.model, "split": args.split, "configs": list(configs), "rows": [asdict(r) for r in rows]}
    out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
