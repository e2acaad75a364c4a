"""`hoppatch submit` against a live API and worker: every exit code a CI pipeline gates on.

The model is a tiny random LLaMA under the model roots; its example is built from its own greedy answers,
so that it is a compositional failure of that model and the job runs every stage in seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hoppatch.engine.answers import greedy_answers
from hoppatch.engine.tiny_models import tiny_model
from hoppatch.engine.models import load_model
from tests.conftest import free_port, live_service

ROOT = Path(__file__).resolve().parents[2]
HOPPATCH = [sys.executable, "-m", "hoppatch.cli"]
HOP1, HOP2 = "The creator of C. Auguste Dupin is", "The nationality of Edgar Allan Poe is"
QUERY = "The nationality of the creator of C. Auguste Dupin is"
UNRELATED = "The capital of the country that Jovanotti is a citizen of is"


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    """A tiny model saved under a model root, and an example file it fails compositionally."""
    root = tmp_path_factory.mktemp("models")
    for seed in range(50):  # the first seed whose model answers the hops one way and the query another
        lm = tiny_model("llama", seed=seed)
        hop1, hop2, query, unrelated = greedy_answers(lm, [HOP1, HOP2, QUERY, UNRELATED], max_new_tokens=1)
        if query != hop2:
            break
    else:
        pytest.fail("no tiny model fails the composed query")
    lm.model.save_pretrained(root / "tiny")
    lm.tokenizer.save_pretrained(root / "tiny")
    example = {"id": "tiny", "query": QUERY, "answer": hop2, "hop1": {"prompt": HOP1, "answer": hop1}, "hop2": {"prompt": HOP2, "answer": hop2},
               "specificity": [{"prompt": UNRELATED, "answer": unrelated}]}  # the model's own answer: right before the patch
    examples = root / "examples.json"
    examples.write_text(json.dumps([example]))
    return root, examples


@pytest.fixture(scope="module")
def live(redis_url, tiny_case, tmp_path_factory):
    """`hoppatch serve` and `hoppatch worker` as processes, on the test Redis."""
    root, _ = tiny_case
    work = tmp_path_factory.mktemp("live")
    env = {
        **os.environ, "HOPPATCH_REDIS_URL": redis_url, "HOPPATCH_AUTH": "off", "HOPPATCH_MODEL_ROOTS": str(root),
        "HOPPATCH_ARTIFACT_DIR": str(work / "artifacts"), "HOPPATCH_WORKER_METRICS_PORT": "0", "HOPPATCH_CACHE": str(work / "cache"),
    }
    with live_service(env, work, timeout=120) as url:
        yield url, env


def _submit(url: str, examples: Path, *options: str, model: str | None = None, env=None) -> subprocess.CompletedProcess:
    args = ["submit", "--server", url, "--model", model or str(examples.parent / "tiny"), "--examples", str(examples), *options]
    return subprocess.run([*HOPPATCH, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_a_job_that_ran_and_meets_its_thresholds_exits_0_and_downloads_verified_artifacts(live, tiny_case, tmp_path):
    url, env = live
    _, examples = tiny_case
    done = _submit(url, examples, "--wait", "--fail-under", "correction=0", "--download", str(tmp_path / "a"), "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["status"] == "succeeded" and result["summary"]["patched"] == 1
    assert (tmp_path / "a" / "delta.safetensors").is_file() and (tmp_path / "a" / "metrics.json").is_file()
    # stderr is not a terminal here: progress comes as plain lines, not a bar
    assert "\r" not in done.stderr and "succeeded" in done.stderr


def test_a_missed_threshold_exits_1_and_says_which(live, tiny_case):
    url, env = live
    _, examples = tiny_case
    done = _submit(url, examples, "--fail-under", "correction=1.01", env=env)
    assert done.returncode == 1
    assert "patch does not hold: correction_rate=" in done.stderr


def test_the_gate_reads_every_specificity_rate_by_name(live, tiny_case):
    url, env = live
    _, examples = tiny_case
    done = _submit(url, examples, "--json", "--fail-under", "specificity_right_kept=1.01", "--fail-under", "specificity_kept_or_right=0", env=env)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{") :])["summary"]
    assert summary["specificity_right_rate_before"] == 1.0  # the unrelated query's answer is the model's own
    assert f"patch does not hold: specificity_right_kept_rate={summary['specificity_right_kept_rate']} < 1.01" in done.stderr
    assert "specificity_kept_or_right_rate" not in done.stderr  # met: a threshold of 0 and a measured rate


def test_a_failed_job_exits_1_with_its_error_code(live, tiny_case, tmp_path):
    url, env = live
    root, examples = tiny_case
    (root / "not-a-model").mkdir(exist_ok=True)
    done = _submit(url, examples, "--wait", model=str(root / "not-a-model"), env=env)
    assert done.returncode == 1
    assert "failed: model_not_found" in done.stderr


@pytest.mark.parametrize(
    ("options", "model", "message"),
    [
        (["--fail-under", "beauty=0.5"], None, "--fail-under 'beauty=0.5'"),
        ([], "/etc", "outside the configured model roots"),
    ],
)
def test_bad_input_exits_2_with_one_line(live, tiny_case, options, model, message):
    url, env = live
    _, examples = tiny_case
    done = _submit(url, examples, *options, model=model, env=env)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_job_stacked_on_an_earlier_one_reruns_its_probes_and_gates_on_regressions(live, tiny_case, tmp_path):
    """Job B is asked on top of job A, for the same query but through another second hop with another answer:
    where B corrects its query, A's correction probe no longer holds, and --fail-on-regression exits 1."""
    url, env = live
    root, examples = tiny_case
    first = _submit(url, examples, "--wait", "--json", env=env)
    assert first.returncode == 0, first.stderr
    job_a = json.loads(first.stdout[first.stdout.index("{") :])
    [example] = json.loads(examples.read_text())
    lm = tiny_model_from(root / "tiny")
    prompts = ["The country of Edgar Allan Poe is", "Edgar Allan Poe was born in", "The home of Poe is", "Poe lived in", "Poe was from"]
    answers = [a.strip() for a in greedy_answers(lm, prompts, max_new_tokens=1)]
    other_hop2 = next((p, a) for p, a in zip(prompts, answers) if a and a != example["answer"])
    conflicting = {**example, "id": "conflicting", "answer": other_hop2[1], "hop2": {"prompt": other_hop2[0], "answer": other_hop2[1]}}
    (tmp_path / "b.json").write_text(json.dumps([conflicting]))
    second = _submit(
        url, tmp_path / "b.json", "--base-patch", job_a["id"], "--fail-on-regression", "--json", model=str(root / "tiny"), env=env
    )
    assert "{" in second.stdout, second.stderr
    job_b = json.loads(second.stdout[second.stdout.index("{") :])
    assert job_b["status"] == "succeeded", second.stderr
    summary = job_b["summary"]
    assert summary["regression_probes"] == (1 if job_a["summary"]["correction_rate"] == 1.0 else 0)  # A's held probe
    if summary["correction_rate"] == 1.0:  # the query now gives B's answer: A's cannot hold any more
        assert summary["regressions"] == summary["regression_probes"]
    assert (second.returncode == 1) is (summary["regressions"] > 0)
    if summary["regressions"]:
        assert "regressions=" in second.stderr
    print("stacked on a tiny model:", summary["correction_rate"], summary["regressions"], summary["regression_probes"])


def test_a_missing_examples_file_exits_2(tiny_case, tmp_path):
    done = _submit("http://127.0.0.1:9", tmp_path / "missing.json")
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_an_unreachable_server_exits_3(tiny_case):
    _, examples = tiny_case
    done = _submit(f"http://127.0.0.1:{free_port()}", examples)
    assert done.returncode == 3 and "cannot reach the server" in done.stderr


def test_the_client_waits_out_a_rate_limit_and_one_submission_makes_one_job(redis_url, tiny_case, tmp_path):
    import time

    from hoppatch.client import Client
    from hoppatch.spec import read_examples

    root, examples = tiny_case
    env = {
        **os.environ, "HOPPATCH_REDIS_URL": redis_url, "HOPPATCH_AUTH": "off", "HOPPATCH_MODEL_ROOTS": str(root),
        "HOPPATCH_ARTIFACT_DIR": str(tmp_path / "artifacts"), "HOPPATCH_WORKER_METRICS_PORT": "0",
        "HOPPATCH_TENANT_RATE": "0.5", "HOPPATCH_TENANT_BURST": "1",
    }
    spec = {"model": str(root / "tiny"), "examples": [msgspec_builtins(e) for e in read_examples(examples)]}
    with live_service(env, tmp_path, timeout=120) as url, Client(url) as client:
        earlier = {j["id"] for j in client.request("GET", "/v1/jobs", params={"limit": 100}).json()["data"]}
        first = client.submit(spec)
        started = time.monotonic()
        second = client.submit(spec)  # 429 with Retry-After: 2, waited out
        assert time.monotonic() - started >= 1.5
        assert first["id"] != second["id"]
        ids = [j["id"] for j in client.request("GET", "/v1/jobs", params={"limit": 100}).json()["data"]]
        assert sorted(set(ids) - earlier) == sorted([first["id"], second["id"]])  # the 429 left no job behind


def tiny_model_from(path: Path):
    return load_model(str(path), device="cpu", model_roots=[path.parent])


def msgspec_builtins(value):
    import msgspec

    return msgspec.to_builtins(value)
