"""Patch lineage on the built-in model: a patch solved on top of another records its parent, re-reads the
parent's regression suite, reports a probe that no longer holds, leaves the base weights as they were; the
chain applies only in order, and exports as one PEFT adapter that equals the merged weights."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from hoppatch.engine.delta import apply_delta, read_delta, save_delta, weight_sha256
from hoppatch.engine.edit import LayerDelta
from hoppatch.engine.errors import DeltaMismatch
from hoppatch.engine.models import BUILTIN_GEMMA
from hoppatch.engine.pipeline import base_weights_intact, patch
from hoppatch.engine.tracing import encode, forward, position_ids
from hoppatch.spec import JobSpec

from .conftest import EXAMPLES, PREAMBLE, ROOT

pytestmark = pytest.mark.builtin


@pytest.fixture(scope="module")
def chain(gemma, tmp_path_factory):
    """Patch A (the first example), then patch B (the second) on top of A."""
    root = tmp_path_factory.mktemp("chain")
    pristine = {name: weight_sha256(p) for name, p in gemma.model.named_parameters() if "o_proj" in name}
    _, metrics_a = patch(gemma, JobSpec(model=BUILTIN_GEMMA, examples=EXAMPLES[:1], preamble=PREAMBLE), root / "a")
    outcome_b, metrics_b = patch(
        gemma, JobSpec(model=BUILTIN_GEMMA, examples=EXAMPLES[1:2], preamble=PREAMBLE), root / "b",
        base_patches=[("job-a", root / "a" / "delta.safetensors")],
    )
    return root, pristine, metrics_a, outcome_b, metrics_b


def test_a_stacked_patch_records_its_parent_and_reruns_its_suite(gemma, chain):
    root, pristine, metrics_a, outcome_b, metrics_b = chain
    suite_a = json.loads(read_delta(root / "a" / "delta.safetensors").metadata["regression_suite"])
    held_a = [p for ex in metrics_a["examples"] for p in ex["probes"] if p["kind"] in ("correction", "paraphrase") and p["success"]]
    assert len(suite_a) == len(held_a) >= 1 and all(p["prompt"].startswith(PREAMBLE) for p in suite_a)
    sha_a = metrics_b["lineage"]["parents"][0]["sha256"]
    assert metrics_b["lineage"]["parents"] == [{"label": "job-a", "sha256": sha_a}]
    assert read_delta(root / "b" / "delta.safetensors").parents == [{"label": "job-a", "sha256": sha_a}]
    assert metrics_b["summary"]["regression_probes"] == len(suite_a)
    assert metrics_b["summary"]["regressions"] == len(metrics_b["lineage"]["regressions"])
    # back to base: every weight either patch touched, and the warm state is the base model's again
    assert {n: weight_sha256(p) for n, p in gemma.model.named_parameters() if "o_proj" in n} == pristine
    assert base_weights_intact(gemma) and gemma.warm.readings is not None


def test_a_chain_applies_only_in_order(gemma, chain):
    root = chain[0]
    with pytest.raises(DeltaMismatch):  # B was solved against A's weights, not the base
        apply_delta(gemma.model, root / "b" / "delta.safetensors")
    first = apply_delta(gemma.model, root / "a" / "delta.safetensors")
    second = apply_delta(gemma.model, root / "b" / "delta.safetensors")
    second.revert()
    first.revert()


def test_a_probe_that_no_longer_holds_is_a_regression(gemma, chain, tmp_path):
    """A parent whose suite holds a probe the stacked model cannot give (a wrong answer, on purpose)."""
    root = chain[0]
    delta = read_delta(root / "a" / "delta.safetensors")
    layers = json.loads(delta.metadata["layers"])
    false_probe = {"example_id": "planted", "kind": "correction", "prompt": PREAMBLE + "The capital of France is",
                   "answer": "Berlin", "aliases": []}
    planted = tmp_path / "planted.safetensors"
    save_delta(
        planted, [LayerDelta(layer, module, left, right, 0.0) for layer, (module, (left, right)) in zip(layers, delta.factors.items())],
        base_model=BUILTIN_GEMMA, base_hashes=delta.base_hashes, conv1d=False, budget={}, regression_suite=[false_probe],
    )
    outcome, document = patch(
        gemma, JobSpec(model=BUILTIN_GEMMA, examples=EXAMPLES[1:2], preamble=PREAMBLE), tmp_path / "out",
        base_patches=[("planted", planted)],
    )
    assert document["summary"]["regressions"] == 1
    assert document["lineage"]["regressions"] == [
        {"parent": "planted", "example_id": "planted", "kind": "correction", "prompt": false_probe["prompt"], "answer": "Berlin"}
    ]
    assert 'id=regressions' in (tmp_path / "out" / "report.html").read_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hoppatch.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_export_writes_a_chain_as_one_adapter_equal_to_the_merged_weights(gemma, chain, tmp_path):
    root = chain[0]
    deltas = [str(root / "a" / "delta.safetensors"), str(root / "b" / "delta.safetensors")]
    wrong = _cli("apply", "--model", BUILTIN_GEMMA, "--delta", deltas[1], "--out", str(tmp_path / "wrong"))
    assert wrong.returncode == 2 and "oldest first" in wrong.stderr and not (tmp_path / "wrong").exists()
    done = _cli("export", "--model", BUILTIN_GEMMA, "--delta", deltas[0], "--delta", deltas[1], "--out", str(tmp_path / "adapter"))
    assert done.returncode == 0, done.stderr
    ranks = [read_delta(d).factors[next(iter(read_delta(d).factors))][0].shape[1] for d in deltas]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == sum(ranks)
    queries = [PREAMBLE + EXAMPLES[0].query, PREAMBLE + EXAMPLES[1].query]
    applied = [apply_delta(gemma.model, d) for d in deltas]
    merged_logits = forward(gemma, encode(gemma, queries))
    for delta in reversed(applied):
        delta.revert()
    adapter = PeftModel.from_pretrained(gemma.model, str(tmp_path / "adapter"))
    batch = encode(gemma, queries)
    with torch.no_grad():
        adapter_logits = adapter(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch.attention_mask), logits_to_keep=1
        ).logits
    adapter.unload()
    assert (adapter_logits - merged_logits).abs().max().item() <= 1e-3
