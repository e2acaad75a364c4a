"""Engine benchmark on the built-in model (CPU here): per-stage times and peak memory of one job, cold and
warm, and the edit of the authors' recipe on the same examples in the same process (so the ratio holds).

    .venv/bin/python bench/engine.py [--cold]

Four runs in one process: the first job; the same job again on the warm model (a resubmission: the base
model's readings of those examples are kept warm); the job on a warm model that has not read these examples
(its fluency reading and preserved-key statistics kept, as a worker keeps them); and the job with the whole
warm state cleared (every input read anew, which the comparison with the authors' recipe uses). --cold first
empties a private cache directory, so the GGUF conversion, the preserved-key statistics and the base fluency
reading are paid again (they are cached under HOPPATCH_CACHE afterwards).

--work also counts, in a second run of the job with the same warm state, the floating-point operations of
each stage's matrix products, and divides them by this machine's best fp32 matrix-product rate, measured in
the same process: the seconds no scheduling of the same arithmetic can beat here. Attention's score products
run inside one fused kernel on a CPU and are not counted, so the floor is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--json", default="bench/results/engine.json")
    parser.add_argument(
        "--file-cases", type=int, default=0, metavar="N",
        help="instead: one job over N dev cases drawn from bench/results/<model>-all.json (bench/dataset.py builds "
        "it), as `hoppatch edit` runs a user's file, on a model warmed by one job of the shipped examples",
    )
    parser.add_argument("--work", action="store_true", help="also count each stage's arithmetic against this machine's rate")
    args = parser.parse_args()
    if args.file_cases:
        file_job(args.file_cases, args.work)
        return
    if args.cold:
        os.environ["HOPPATCH_CACHE"] = tempfile.mkdtemp(prefix="hoppatch-cold-")

    from bench.authors_recipe import AUTHORS_BANDS, authors_edit
    from hoppatch.spec import JobSpec, read_examples, read_preamble
    from hoppatch.engine.edit import WeightSnapshot
    from hoppatch.engine.models import BUILTIN_GEMMA, load_model
    from hoppatch.engine.pipeline import run_job
    from hoppatch.engine.publish import publish

    examples = read_examples(EXAMPLES / "gemma-3-270m.json")
    preamble = read_preamble(EXAMPLES / "preamble.txt")
    spec = JobSpec(model=BUILTIN_GEMMA, examples=examples, preamble=preamble)
    started = time.perf_counter()
    lm = load_model(BUILTIN_GEMMA)
    load_seconds = time.perf_counter() - started
    runs = {}
    for label in ("first job", "warm job", "new examples, warm model", "new examples"):
        if label == "new examples, warm model":  # what a warm worker keeps across examples: fluency, statistics
            forget_examples(lm)
        if label == "new examples":  # every input read anew: the edit's honest cost against the authors' recipe
            lm.warm.clear()
        out = Path(tempfile.mkdtemp()) / "out"
        started = time.perf_counter()
        outcome = run_job(lm, spec)
        document = publish(outcome, lm, out)
        total = time.perf_counter() - started
        runs[label] = {"seconds": outcome.seconds, "total": total, "layers": outcome.layers, "summary": document["summary"]}
        shutil.rmtree(out.parent)
        if args.work and label == "new examples, warm model":
            forget_examples(lm)
            work = stage_work(lm, spec)
    new = runs["new examples"]["seconds"]  # the edit with every input it needs read anew
    engine_edit = new["prepare"] + new["edit"] + new.get("calibrate", 0.0)
    started = time.perf_counter()
    for ex in examples:
        snapshot = WeightSnapshot(lm, AUTHORS_BANDS[BUILTIN_GEMMA])
        authors_edit(lm, ex.query, ex.hop2.prompt, AUTHORS_BANDS[BUILTIN_GEMMA], preamble)
        snapshot.restore()
    authors_total = time.perf_counter() - started
    result = {
        "cold": args.cold,
        "model_load_seconds": load_seconds,
        "runs": runs,
        "edit_seconds": {"engine_all_examples_together": engine_edit, "authors_one_at_a_time": authors_total},
        "edit_speedup": authors_total / engine_edit,
        "peak_rss_mb": peak_rss_mb(),
        "examples": len(examples),
        "torch_threads": __import__("torch").get_num_threads(),
    }
    if args.work:
        rate = matmul_rate()
        result["work"] = {"run": "new examples, warm model", "flops": work, "matmul_gflops": rate}
        print_work(runs["new examples, warm model"]["seconds"], work, rate)
    print(f"model load: {load_seconds:.2f} s ({'cold: GGUF conversion' if args.cold else 'from the converted cache'})")
    print(f"{'stage':<12}" + "".join(f"{label:>26}" for label in runs))
    for stage in ("diagnose", "locate", "prepare", "edit", "calibrate", "evaluate", "publish"):
        print(f"{stage:<12}" + "".join(f"{run['seconds'].get(stage, 0):>26.3f}" for run in runs.values()))
    print(f"{'total':<12}" + "".join(f"{run['total']:>26.3f}" for run in runs.values()))
    print(f"edit of {len(examples)} new examples, inputs included: engine {engine_edit:.3f} s, authors' recipe {authors_total:.3f} s "
          f"({result['edit_speedup']:.1f}x); peak RSS {result['peak_rss_mb']:.0f} MB")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


def forget_examples(lm) -> None:
    """Clear what the warm model knows of examples (readings, diagnoses, locate rows, counterfactual keys),
    keeping what a worker keeps across them (the fluency reading, the preserved-key statistics)."""
    for cache in (lm.warm.diagnoses, lm.warm.readings, lm.warm.locate_rows, lm.warm.counterfactual_keys):
        cache.clear()


def file_job(count: int, count_work: bool) -> None:
    """Stage seconds of one job over `count` dev cases (diagnosed, the failures patched) on a warm model."""
    import random

    from hoppatch.engine.models import BUILTIN_GEMMA, load_model
    from hoppatch.engine.pipeline import run_job
    from hoppatch.spec import JobSpec, read_examples, read_preamble

    preamble = read_preamble(EXAMPLES / "preamble.txt")
    cases = read_examples(Path(__file__).resolve().parent / "results" / "gemma-3-270m-all.json")
    cases = random.Random(0).sample(cases, count)
    lm = load_model(BUILTIN_GEMMA)
    run_job(lm, JobSpec(model=BUILTIN_GEMMA, examples=read_examples(EXAMPLES / "gemma-3-270m.json"), preamble=preamble))
    forget_examples(lm)  # a warm worker that has not seen these cases
    started = time.perf_counter()
    spec = JobSpec(model=BUILTIN_GEMMA, examples=cases, preamble=preamble)
    outcome = run_job(lm, spec)
    total = time.perf_counter() - started
    print(f"{count} cases, {len(outcome.patched)} compositional failures patched, layers {outcome.layers}")
    for stage, seconds in outcome.seconds.items():
        print(f"{stage:<12}{seconds:>10.2f}")
    print(f"{'total':<12}{total:>10.2f}")
    if count_work:
        forget_examples(lm)
        print_work(outcome.seconds, stage_work(lm, spec), matmul_rate())


def stage_work(lm, spec) -> dict[str, float]:
    """Floating-point operations of each stage's matrix products in one run of `spec` (evaluate's two parts
    added up, as its seconds are)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hoppatch.engine.pipeline import run_job

    flops: dict[str, float] = {}
    stage, counted = "diagnose", 0
    with FlopCounterMode(display=False) as counter:

        def at_stage(name: str, fraction: float, message: str) -> None:
            nonlocal stage, counted
            total = counter.get_total_flops()
            flops[stage] = flops.get(stage, 0) + total - counted
            stage, counted = name, total

        run_job(lm, spec, progress=at_stage)
        flops[stage] = flops.get(stage, 0) + counter.get_total_flops() - counted
    return flops


def matmul_rate() -> float:
    """This machine's best fp32 matrix-product rate in GFLOPS, over the large shapes the engine's passes use
    (a layer's projections over 2,048 positions; 512 positions against a 4,096-token slice of the vocabulary)."""
    import torch

    best = 0.0
    for rows, inner, outer in ((2048, 640, 2048), (2048, 2048, 640), (2048, 640, 1024), (512, 640, 4096)):
        x, w = torch.randn(rows, inner), torch.randn(outer, inner)
        torch.nn.functional.linear(x, w)
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(x, w)
            best = max(best, 10 * 2 * rows * inner * outer / (time.perf_counter() - started) / 1e9)
    return best


def print_work(seconds: dict[str, float], flops: dict[str, float], rate: float) -> None:
    print(f"matrix products per stage; this machine's best fp32 rate {rate:.0f} GFLOPS")
    print(f"{'stage':<12}{'seconds':>10}{'TFLOP':>10}{'GFLOPS':>10}{'floor s':>10}")
    for stage, run_seconds in seconds.items():
        work = flops.get(stage, 0.0)
        print(f"{stage:<12}{run_seconds:>10.2f}{work / 1e12:>10.3f}{work / 1e9 / run_seconds:>10.0f}{work / 1e9 / rate:>10.2f}")
    total_seconds, total_work = sum(seconds.values()), sum(flops.values())
    print(f"{'total':<12}{total_seconds:>10.2f}{total_work / 1e12:>10.3f}{total_work / 1e9 / total_seconds:>10.0f}"
          f"{total_work / 1e9 / rate:>10.2f}")


if __name__ == "__main__":
    main()
