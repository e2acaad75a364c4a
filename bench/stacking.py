"""Patch lineage: how the first patches hold as later ones stack on them, against one joint patch.

    .venv/bin/python bench/dataset.py             # once: builds bench/results/<model>-{tune,validation}.json
    .venv/bin/python bench/stacking.py [--split validation] [--per-patch 2] [--patches 20]

Takes the split's compositional failures in order, `--per-patch` examples a patch, and solves patch k on top
of patches 1..k-1 (as a job with `base_patches` does). After 1, 5 and 20 patches it reads, with the whole
chain applied, the strict correction of the first patch's examples and of every example patched so far; then
solves one joint patch of the same examples and reads the same. Also reports the regressions each stacked
job found in its parents' suites. Writes bench/results/stacking-<model>-<split>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hoppatch.engine.errors import NoCompositionFailure  # noqa: E402
from hoppatch.engine.evaluate import Probe, read_probes  # noqa: E402
from hoppatch.engine.lineage import stacked  # noqa: E402
from hoppatch.engine.models import LoadedModel, load_model  # noqa: E402
from hoppatch.engine.pipeline import patch  # noqa: E402
from hoppatch.spec import JobSpec, TwoHopExample, read_examples, read_preamble  # noqa: E402

CHECKPOINTS = (1, 5, 20)


def corrected(lm: LoadedModel, chain: list[tuple[str, Path]], examples: list[TwoHopExample], preamble: str) -> float:
    """Share of `examples` whose query gives the answer (or an alias) with `chain` applied."""
    probes = [Probe(ex.id, "correction", ex.query, ex.answer, tuple(ex.aliases)) for ex in examples]
    with stacked(lm, chain):
        readings = read_probes(lm, probes, preamble)
    return sum(r.gives for r in readings) / len(readings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--split", default="validation", choices=["tune", "validation"])
    parser.add_argument("--per-patch", type=int, default=2)
    parser.add_argument("--patches", type=int, default=20)
    args = parser.parse_args()
    name = args.model.removeprefix("builtin:")
    examples = read_examples(ROOT / "bench" / "results" / f"{name}-{args.split}.json")
    preamble = read_preamble(ROOT / "examples" / "preamble.txt")
    groups = [examples[i : i + args.per_patch] for i in range(0, args.per_patch * args.patches, args.per_patch)]
    groups = [g for g in groups if g]
    lm = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="stacking-"))
    chain: list[tuple[str, Path]] = []
    steps = []
    rows = []
    for k, group in enumerate(groups, start=1):
        started = time.perf_counter()
        spec = JobSpec(model=args.model, examples=group, preamble=preamble)
        try:
            _, document = patch(lm, spec, work / f"patch-{k}", base_patches=chain)
            chain.append((f"patch-{k}", work / f"patch-{k}" / "delta.safetensors"))
            summary = document["summary"]
            steps.append({"patch": k, "patched": summary["patched"], "correction": summary["correction_rate"],
                          "regressions": summary["regressions"], "regression_probes": summary["regression_probes"],
                          "seconds": round(time.perf_counter() - started, 1)})
        except NoCompositionFailure:  # earlier patches already corrected these: nothing to add
            steps.append({"patch": k, "patched": 0, "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(steps[-1]), flush=True)
        if k in CHECKPOINTS:
            so_far = [ex for g in groups[:k] for ex in g]
            joint_dir = work / f"joint-{k}"
            patch(lm, JobSpec(model=args.model, examples=so_far, preamble=preamble), joint_dir)
            joint = [("joint", joint_dir / "delta.safetensors")]
            rows.append({
                "patches": k, "examples": len(so_far),
                "stacked_first_patch": corrected(lm, chain, groups[0], preamble),
                "stacked_all": corrected(lm, chain, so_far, preamble),
                "joint_first_patch": corrected(lm, joint, groups[0], preamble),
                "joint_all": corrected(lm, joint, so_far, preamble),
                "regressions_found": sum(s.get("regressions", 0) for s in steps),
            })
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, {args.split} half, {args.per_patch} examples a patch (strict greedy correction, chain applied)\n")
    print("| patches stacked | examples | first patch's examples, stacked | all, stacked | first patch's, one joint patch | all, one joint patch | regressions the stacked jobs reported |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['patches']} | {r['examples']} | {r['stacked_first_patch']:.2f} | {r['stacked_all']:.2f} | "
              f"{r['joint_first_patch']:.2f} | {r['joint_all']:.2f} | {r['regressions_found']} |")
    out = ROOT / "bench" / "results" / f"stacking-{name}-{args.split}.json"
    out.write_text(json.dumps({"steps": steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
