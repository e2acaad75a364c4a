"""Engine vs the authors' recipe on the same cases: rates and edit time.

    .venv/bin/python bench/compare.py --examples examples/gemma-3-270m.json --preamble-file examples/preamble.txt [--joint]

By default each example is its own job (the paper's protocol). With --joint all of them form one job, as
`hoppatch edit` makes of a file: the engine solves them together, and the authors' recipe edits them one
after another on the same model (its updates add up). Only the examples the engine diagnoses as
compositional failures are counted. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.authors_recipe import AUTHORS_BAND_GEMMA_270M, authors_edit  # noqa: E402
from hoppatch.spec import JobSpec, read_examples, read_preamble  # noqa: E402
from hoppatch.engine.diagnose import diagnose  # noqa: E402
from hoppatch.engine.edit import WeightSnapshot  # noqa: E402
from hoppatch.engine.evaluate import ProbeOutcome, build_probes, rate, read_after, read_before  # noqa: E402
from hoppatch.engine.models import load_model  # noqa: E402
from hoppatch.engine.pipeline import run_job  # noqa: E402

KINDS = ("correction", "paraphrase", "generalization", "specificity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--examples", required=True)
    parser.add_argument("--preamble-file")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--authors-layers", default=",".join(map(str, AUTHORS_BAND_GEMMA_270M)))
    parser.add_argument("--joint", action="store_true", help="all examples in one job")
    parser.add_argument("--json", default="bench/results/compare.json")
    args = parser.parse_args()

    lm = load_model(args.model)
    preamble = read_preamble(args.preamble_file) if args.preamble_file else ""
    examples = read_examples(args.examples)
    failures = [e for e, d in zip(examples, diagnose(lm, examples, preamble)) if d.patchable]
    if args.limit:
        failures = failures[: args.limit]
    band = [int(x) for x in args.authors_layers.split(",")]
    outcomes: dict[str, list[ProbeOutcome]] = {"engine": [], "authors": []}
    seconds: dict[str, float] = {"engine": 0.0, "authors": 0.0}
    jobs = [failures] if args.joint else [[example] for example in failures]
    for i, job in enumerate(jobs, 1):
        result = run_job(lm, JobSpec(model=args.model, examples=job, preamble=preamble))
        outcomes["engine"] += result.probes
        seconds["engine"] += result.seconds["edit"] + result.seconds.get("calibrate", 0.0)

        predictions = {d.example_id: d.prediction for d in result.diagnoses}
        probes = build_probes(job, predictions)
        before = read_before(lm, probes, preamble)
        snapshot = WeightSnapshot(lm, band)
        started = time.perf_counter()
        for example in job:
            authors_edit(lm, example.query, example.hop2.prompt, band, preamble)
        seconds["authors"] += time.perf_counter() - started
        after = read_after(lm, probes, before, preamble)
        snapshot.restore()
        outcomes["authors"] += [ProbeOutcome(p, b, a) for p, b, a in zip(probes, before, after)]
        print(f"[{i}/{len(jobs)}] {len(job)} example(s), engine layers {result.layers}", file=sys.stderr, flush=True)

    n = max(1, len(failures))
    rows = {m: {k: rate(o, k) for k in KINDS} | {"edit_seconds_per_example": seconds[m] / n} for m, o in outcomes.items()}
    mode = "all in one job" if args.joint else "one job per example"
    print(f"{len(failures)} compositional failures of {len(examples)} examples ({args.model}), {mode}")
    print(f"{'method':<10}" + "".join(f"{k:>16}" for k in KINDS) + f"{'edit s/example':>16}")
    for method, row in rows.items():
        cells = "".join(f"{(row[k] if row[k] is not None else float('nan')):>16.3f}" for k in KINDS)
        print(f"{method:<10}{cells}{row['edit_seconds_per_example']:>16.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    document = {"model": args.model, "cases": len(failures), "joint": args.joint, "results": rows}
    Path(args.json).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
