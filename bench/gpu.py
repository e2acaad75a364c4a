"""GPU benchmark: a LLaMA-2-7B-shaped and a Gemma-3-270M-shaped model with random bf16 weights (no
download): the whole job's stages (diagnose, locate, prepare, edit, calibrate, evaluate with ~10 probes)
and the edit with every input it reads (the shipped preserved prompts, the counterfactual keys and the
answer's gradients of a new example, calibration), for the engine and the authors' recipe, timed with
CUDA synchronisation.

    .venv/bin/python bench/gpu.py            # on a GPU: the real shapes
    .venv/bin/python bench/gpu.py --small    # anywhere: small shapes on the CPU (its own smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.authors_recipe import authors_edit  # noqa: E402
from hoppatch.spec import Hop, JobSpec, LabeledQuery, TwoHopExample  # noqa: E402
from hoppatch.engine.tiny_models import tiny_tokenizer  # noqa: E402
from hoppatch.engine.diagnose import diagnose  # noqa: E402
from hoppatch.engine.answers import BasePasses, answer_variants  # noqa: E402
from hoppatch.engine.calibrate import calibrate, scale_examples  # noqa: E402
from hoppatch.engine.context import RunContext, running  # noqa: E402
from hoppatch.engine.edit import EditConfig, WeightSnapshot, apply_layer_delta, creme_edit  # noqa: E402
from hoppatch.engine.evaluate import build_probes, read_probes  # noqa: E402
from hoppatch.engine.locate import locate_layers  # noqa: E402
from hoppatch.engine.models import wrap_model  # noqa: E402
from hoppatch.engine.pipeline import prepare_edit  # noqa: E402

SHAPES = {
    "llama-2-7b": dict(kind="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, band=list(range(17, 24))),
    "gemma-3-270m": dict(kind="gemma3", hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144, band=list(range(8, 14))),
}
SMALL = {
    "llama-small": dict(kind="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000, band=[3, 4, 5]),
}

EXAMPLE = TwoHopExample(
    id="dupin",
    query="The nationality of the creator of C. Auguste Dupin is",
    answer="United States",
    hop1=Hop("The creator of C. Auguste Dupin is", "Edgar Allan Poe"),
    hop2=Hop("The nationality of Edgar Allan Poe is", "United States"),
    paraphrases=["Q: the nationality of the creator of C. Auguste Dupin is ? A:", "the creator of C. Auguste Dupin was a citizen of"],
    generalization=[LabeledQuery("The city where the creator of C. Auguste Dupin was born is", "Boston")],
    specificity=[LabeledQuery(p, "Paris") for p in ("The capital of France is", "The capital of Germany is", "The currency of Japan is", "The religion of India is", "The capital of Poland is", "The city of New York is")],
)


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    params = {k: v for k, v in shape.items() if k not in ("kind", "band")}
    config = LlamaConfig(**params) if shape["kind"] == "llama" else Gemma3TextConfig(**params, sliding_window=512)
    tokenizer = tiny_tokenizer()
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model("random", model, tokenizer)


def timed(fn, device: torch.device, repeats: int = 3, total=lambda result: None) -> tuple[float, object]:
    """Best of `repeats` runs after a warm-up; `total` reads a run's own time from its result, if it reports one."""
    fn()  # warm-up (kernels, allocator)
    best, best_result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = total(result) or time.perf_counter() - started
        if seconds < best:
            best, best_result = seconds, result
    return best, best_result


def bench_shape(name: str, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    lm = build(shape, device, dtype)
    band = shape["band"]
    config = EditConfig()
    spec = JobSpec(model="random", examples=[EXAMPLE])
    query, guide = EXAMPLE.query, EXAMPLE.hop2.prompt
    snapshot = WeightSnapshot(lm, band)
    probes = build_probes([EXAMPLE], {})
    answers = [answer_variants(EXAMPLE.answer, EXAMPLE.aliases)]
    # the shipped preserved prompts' statistics are per model and kept warm: computed once, as a warm worker has them
    preserved = prepare_edit(lm, spec, [EXAMPLE], probes, band, config).preserved

    def edit(inputs):
        return creme_edit(
            lm, [query], [guide], band, max_rank=8, max_relative_norm=1.0, preserved=inputs.preserved,
            counterfactual_keys=inputs.counterfactual_keys, answer_gradients=inputs.answer_gradients, config=config,
        )

    def edit_with_inputs():
        """What a job with a new example spends on its patch: prepare (counterfactual keys and answer
        gradients read anew, the warm statistics reused), the edit, and calibration."""
        lm.warm.counterfactual_keys.clear()
        result = edit(prepare_edit(lm, spec, [EXAMPLE], probes, band, config))
        snapshot.restore()
        calibrate(lm, result.deltas, [query], answers, config.calibration_steps)
        return result

    # a job of 8 examples solves one rank-8 update per layer in the same single pass
    queries8 = [query, guide, *(q.prompt for q in EXAMPLE.specificity)]
    guides8 = [*(q.prompt for q in EXAMPLE.specificity), query, guide]

    def engine_edit_8():
        result = creme_edit(lm, queries8, guides8, band, max_rank=8, max_relative_norm=1.0, preserved=preserved)
        snapshot.restore()
        return result

    def authors():
        authors_edit(lm, query, guide, band)
        snapshot.restore()

    passes, pass_counts = [0], {}

    def whole_job():
        """Every stage of a job with a new example, its forward passes counted."""
        lm.warm.clear()  # a new example; the preserved statistics come back from the disk cache
        stages, values, counts = {}, {}, {}
        base_passes = BasePasses(min(band))  # the pipeline's reading after the edit starts at its lowest layer

        def evaluate_after():
            for delta in scale_examples(values["edit"].deltas, values["calibrate"][1]):
                apply_layer_delta(lm, delta)
            return read_probes(lm, probes, "", replay=base_passes)

        for stage, fn in (
            ("diagnose", lambda: diagnose(lm, [EXAMPLE])),
            ("locate", lambda: locate_layers(lm, [query], [guide], [EXAMPLE.answer], len(band))),
            ("prepare", lambda: prepare_edit(lm, spec, [EXAMPLE], probes, band, config)),
            ("evaluate_before", lambda: read_probes(lm, probes, "", lm.warm.readings, record=base_passes)),
            ("edit", lambda: edit(values["prepare"])),
            ("calibrate", lambda: (snapshot.restore(), calibrate(lm, values["edit"].deltas, [query], answers, config.calibration_steps))),
            ("evaluate_after", evaluate_after),
        ):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            before = passes[0]
            with running(RunContext(max_seconds=3600, should_stop=lambda: passes.__setitem__(0, passes[0] + 1))):
                values[stage] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            stages[stage] = time.perf_counter() - started
            counts[stage] = passes[0] - before
        pass_counts.update(counts)
        snapshot.restore()
        return stages

    before = {layer: lm.attn_out_weight(layer).clone() for layer in band}
    engine_s, _ = timed(edit_with_inputs, device)
    authors_s, _ = timed(authors, device)
    engine_8_s, _ = timed(engine_edit_8, device)
    job_s, stages = timed(lambda: whole_job(), device, repeats=2, total=lambda stages: sum(stages.values()))
    restored = all(torch.equal(lm.attn_out_weight(layer), weight) for layer, weight in before.items())
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    row = {
        "edit_engine_s": engine_s,
        "edit_authors_s": authors_s,
        "edit_engine_8_examples_s": engine_8_s,
        "speedup": authors_s / engine_s,
        "whole_job_s": job_s,
        "stages_s": stages,
        "forward_passes": pass_counts,
        "weights_restored_bit_identical": restored,
        "peak_gpu_memory_gib": peak_gib,
        "layers": band,
    }
    print(f"{name:<14} edit with inputs, engine {engine_s * 1000:8.1f} ms   authors {authors_s * 1000:8.1f} ms   ({row['speedup']:.1f}x)   whole job {job_s * 1000:8.1f} ms")
    print(" " * 15 + f"edit of 8 examples at once (engine) {engine_8_s * 1000:.1f} ms")
    print(" " * 15 + "   ".join(f"{stage} {seconds * 1000:.1f} ms ({pass_counts[stage]} passes)" for stage, seconds in stages.items()))
    print(" " * 15 + f"base weights restored bit-identical: {restored}" + (f"   peak GPU memory {peak_gib:.1f} GiB" if peak_gib else ""))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes on the CPU")
    parser.add_argument("--json", default="bench/results/gpu.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES if cuda else SMALL
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, dtype {dtype}")
    rows = {name: bench_shape(name, shape, device, dtype) for name, shape in shapes.items()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
