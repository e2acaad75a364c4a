"""GPU benchmark: a LLaMA-2-7B-shaped and a Gemma-3-270M-shaped model with random bf16 weights (no
download): the whole job's stages (diagnose, locate, edit, evaluate with ~10 probes) and the edit alone,
for the engine and the authors' recipe, timed with CUDA synchronisation.

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
from hoppatch.spec import Hop, LabeledQuery, TwoHopExample  # noqa: E402
from tests.tiny_models import tiny_tokenizer  # noqa: E402
from workers.engine.diagnose import diagnose  # noqa: E402
from workers.engine.answers import answer_variants  # noqa: E402
from workers.engine.calibrate import calibrate  # noqa: E402
from workers.engine.edit import WeightSnapshot, creme_edit, key_statistics  # noqa: E402
from workers.engine.evaluate import build_probes, read_after, read_before  # noqa: E402
from workers.engine.locate import locate_layers  # noqa: E402
from workers.engine.models import wrap_model  # noqa: E402

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


def timed(fn, device: torch.device, repeats: int = 3) -> tuple[float, object]:
    result = fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times), result


def bench_shape(name: str, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    lm = build(shape, device, dtype)
    band = shape["band"]
    query, guide = EXAMPLE.query, EXAMPLE.hop2.prompt
    preserved = key_statistics(lm, [s.prompt for s in EXAMPLE.specificity] * 8, band)
    snapshot = WeightSnapshot(lm, band)
    probes = build_probes([EXAMPLE], {})

    def engine_edit():
        result = creme_edit(lm, [query], [guide], band, max_rank=8, max_relative_norm=1.0, preserved=preserved)
        snapshot.restore()
        return result

    def authors():
        authors_edit(lm, query, guide, band)
        snapshot.restore()

    def whole_job():
        stages, values = {}, {}
        answers = [answer_variants(EXAMPLE.answer, EXAMPLE.aliases)]
        for stage, fn in (
            ("diagnose", lambda: diagnose(lm, [EXAMPLE])),
            ("locate", lambda: locate_layers(lm, [query], [guide], [EXAMPLE.answer], len(band))),
            ("evaluate_before", lambda: read_before(lm, probes, "")),
            ("edit", lambda: creme_edit(lm, [query], [guide], band, max_rank=8, max_relative_norm=1.0, preserved=preserved)),
            ("calibrate", lambda: calibrate(lm, values["edit"].deltas, snapshot, [query], answers)),
            ("evaluate_after", lambda: read_after(lm, probes, values["evaluate_before"], "")),
        ):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            values[stage] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            stages[stage] = time.perf_counter() - started
        snapshot.restore()
        lm.memo.clear()  # the next run reads the base model again, as a fresh job would
        return stages

    engine_s, _ = timed(engine_edit, device)
    authors_s, _ = timed(authors, device)
    job_s, stages = timed(lambda: sum(whole_job().values()), device, repeats=2)
    row = {"edit_engine_s": engine_s, "edit_authors_s": authors_s, "speedup": authors_s / engine_s, "whole_job_s": job_s, "layers": band}
    print(f"{name:<14} edit engine {engine_s * 1000:8.1f} ms   authors {authors_s * 1000:8.1f} ms   ({row['speedup']:.1f}x)   whole job {job_s * 1000:8.1f} ms")
    del lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
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
