"""Integration on the built-in Gemma 3 270M: the shipped examples are real compositional failures, the patch
corrects them, the rest is measured, and the artifacts round-trip (delta file, PEFT adapter, CLI)."""

import json
import subprocess
import sys

import msgspec
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from hoppatch.spec import JobSpec, read_examples
from hoppatch.engine.answers import BasePasses, answer_variants, greedy_answers, greedy_continuations, score_answers
from hoppatch.engine.delta import apply_delta
from hoppatch.engine.diagnose import Verdict, diagnose
from hoppatch.engine.edit import WeightSnapshot, apply_layer_delta
from hoppatch.engine.evaluate import Probe, read_probes
from hoppatch.engine.models import BUILTIN_GEMMA, builtin_model_dir, load_model
from hoppatch.engine.pipeline import run_job
from hoppatch.engine.publish import ARTIFACTS, publish
from hoppatch.engine.context import RunContext, running
from hoppatch.engine.tracing import encode, forward, greedy_tokens, position_ids

from .conftest import EXAMPLES, PREAMBLE, ROOT

pytestmark = pytest.mark.builtin


@pytest.fixture(scope="module")
def published(gemma, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "out"
    outcome = run_job(gemma, JobSpec(model=BUILTIN_GEMMA, examples=EXAMPLES, preamble=PREAMBLE))
    return outcome, publish(outcome, gemma, out), out


def test_builtin_tokenizer_gives_the_ids_of_the_models_own_tokenizer(gemma):
    own = AutoTokenizer.from_pretrained(str(builtin_model_dir()), local_files_only=True)
    texts = [PREAMBLE + ex.query for ex in EXAMPLES] + [" United States", "Ünïcödé ✓ 日本語", ""]
    for text in texts:
        assert gemma.tokenizer(text)["input_ids"] == own(text)["input_ids"]
        assert gemma.tokenizer(text, add_special_tokens=False)["input_ids"] == own(text, add_special_tokens=False)["input_ids"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(gemma.tokenizer, name) == getattr(own, name)


def _first_lines(lm, tokens) -> list[str]:
    return [lm.tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip().rstrip(".,;:").strip() for row in tokens]


def _passes(lm, run) -> tuple[object, int]:
    """What `run` returns, and how many forward passes it made (each pass is a checkpoint of the job)."""
    passes = []
    with running(RunContext(max_seconds=600, should_stop=lambda: passes.append(1) is not None)):
        return run(), len(passes)


def test_greedy_answers_that_stop_at_the_end_of_the_line_are_those_of_the_whole_decoding(gemma):
    prompts = [PREAMBLE + q.prompt for ex in EXAMPLES for q in ex.specificity]
    whole = greedy_tokens(gemma, encode(gemma, prompts), 4)
    assert greedy_answers(gemma, prompts) == _first_lines(gemma, whole)
    # prompts whose answers end their line within three tokens: decoding stops a step early, same answers
    short = [p for p, row in zip(prompts, whole) if "\n" in gemma.tokenizer.decode(row[:3], skip_special_tokens=True).lstrip()]
    assert len(short) >= 3
    whole_short, full_passes = _passes(gemma, lambda: greedy_tokens(gemma, encode(gemma, short), 4))
    answers, passes = _passes(gemma, lambda: greedy_answers(gemma, short))
    assert answers == _first_lines(gemma, whole_short) and passes < full_passes


def test_a_greedy_continuation_decides_the_answers_it_covers_as_teacher_forcing_does(gemma):
    prompts = [PREAMBLE + q.prompt for ex in EXAMPLES for q in (*ex.specificity, *ex.generalization)]
    answers = [[q.answer] for ex in EXAMPLES for q in (*ex.specificity, *ex.generalization)]
    # every other prompt accepts its own greedy first word as a second wording: the decoding must find it too
    greedy = greedy_answers(gemma, prompts)
    answers = [[a[0], greedy[i].split()[0].rstrip(".,")] if i % 2 else a for i, a in enumerate(answers)]
    forced = score_answers(gemma, prompts, answers)
    decoded = greedy_continuations(gemma, prompts, 8, answers)
    assert sum(f.gives for f in forced) >= 5 and sum(not f.gives for f in forced) >= 3
    for f, d in zip(forced, decoded):
        assert d.score is not None
        assert (d.score.gives, d.score.matched) == (f.gives, f.matched)
        assert d.score.p_first == pytest.approx(f.p_first, rel=1e-3, abs=1e-5)
    # a whole first line as the answer, one new token decoded: it starts the answer but cannot decide it
    long = [(prompt, [d.text]) for prompt, d in zip(prompts, decoded) if len(d.tokens) > 1]
    short = greedy_continuations(gemma, [prompt for prompt, _ in long], 1, [line for _, line in long])
    assert long and all(d.score is None for d in short)


def test_shipped_examples_are_compositional_failures(gemma):
    verdicts = [d.verdict for d in diagnose(gemma, EXAMPLES, PREAMBLE)]
    assert verdicts == [Verdict.COMPOSITIONAL_FAILURE] * len(EXAMPLES)


def test_patch_corrects_and_is_measured(published):
    outcome, document, _ = published
    summary = document["summary"]
    assert summary["patched"] == len(EXAMPLES)
    assert summary["correction_rate"] == 1.0
    # each rate is the fraction of its probes that succeeded, as listed per example
    probes = [p for ex in document["examples"] for p in ex["probes"]]
    for kind in ("paraphrase", "generalization", "specificity"):
        chosen = [p["success"] for p in probes if p["kind"] == kind]
        assert chosen and summary[f"{kind}_rate"] == sum(chosen) / len(chosen)
    unchanged = [p["before"]["text"] == p["after"]["text"] for p in probes if p["kind"] == "specificity"]
    assert summary["specificity_rate"] == sum(unchanged) / len(unchanged)
    assert summary["specificity_kept_or_right_rate"] >= summary["specificity_rate"]
    # an unrelated query's own answer, read before and after, as the example listing shows it
    unrelated = [p for p in probes if p["kind"] == "specificity"]
    right_before = [p["after"]["gives"] for p in unrelated if p["before"]["gives"]]
    assert summary["specificity_right_rate_before"] == len(right_before) / len(unrelated)
    assert summary["specificity_right_rate"] == sum(p["after"]["gives"] for p in unrelated) / len(unrelated)
    assert summary["specificity_right_kept_rate"] == (sum(right_before) / len(right_before) if right_before else None)
    assert summary["event_rate_after"] > summary["event_rate_before"]
    assert summary["perplexity_after"] > 0 and summary["kl_drift"] > 0
    assert len(summary["layers"]) <= 4
    assert set(summary["seconds"]) >= {"diagnose", "locate", "prepare", "edit", "calibrate", "evaluate", "publish"}
    # calibration kept every corrected example, each with at most its full share of the update
    scales = [ex["scale"] for ex in document["examples"]]
    assert all(0.0 < s <= 1.0 for s in scales) and summary["dropped"] == 0 and summary["rank"] == len(EXAMPLES)


def test_artifacts_round_trip(gemma, published):
    outcome, _, out = published
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    assert len(list((out / "report").glob("*.png"))) == len(EXAMPLES) + 1
    queries = [PREAMBLE + ex.query for ex in EXAMPLES]
    answers = [answer_variants(ex.answer, ex.aliases) for ex in EXAMPLES]
    base = {k: v.clone() for k, v in gemma.model.state_dict().items() if "self_attn.o_proj" in k}
    assert not any(s.gives for s in score_answers(gemma, queries, answers))
    applied = apply_delta(gemma.model, out / "delta.safetensors")
    assert all(s.gives for s in score_answers(gemma, queries, answers))
    patched_logits = forward(gemma, encode(gemma, queries[:1]))
    applied.revert()
    assert all(torch.equal(v, gemma.model.state_dict()[k]) for k, v in base.items())
    adapter = PeftModel.from_pretrained(gemma.model, str(out / "adapter"))
    batch = encode(gemma, queries[:1])
    positions = position_ids(batch.attention_mask)
    with torch.no_grad():
        adapter_logits = adapter(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, logits_to_keep=1).logits
    assert (adapter_logits - patched_logits).abs().max().item() <= 1e-3
    adapter.unload()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hoppatch.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_edit_writes_the_artifacts(tmp_path):
    out = tmp_path / "out"
    done = _cli("edit", "--model", BUILTIN_GEMMA, "--examples", str(ROOT / "examples" / "gemma-3-270m.json"),
                "--preamble-file", str(ROOT / "examples" / "preamble.txt"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-2])["correction_rate"] == 1.0
    # stderr is not a terminal here: one plain line per stage, no bar
    lines = done.stderr.splitlines()
    assert any("diagnosing 3 examples" in line for line in lines) and any("editing layers" in line for line in lines)
    assert "\r" not in done.stderr
    assert all((out / name).is_file() for name in ARTIFACTS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--examples", "missing.json"], "cannot read"),
        (["--examples", "README.md"], "JSON"),
        (["--examples", "examples/gemma-3-270m.json", "--model", "builtin:nope"], "unknown built-in model"),
        (["--examples", "examples/gemma-3-270m.json", "--layers", "x-y"], "--layers"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    base = {"--model": BUILTIN_GEMMA, "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    done = _cli("edit", *[x for pair in base.items() for x in pair])
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_diagnosis_reads_the_queries_as_teacher_forcing_does(gemma):
    # the shipped failures; the same queries answered by their own greedy answer (already correct); and by
    # their whole 8-token greedy line, longer than the decoding diagnosis makes (teacher-forced instead)
    lines = greedy_continuations(gemma, [PREAMBLE + ex.query for ex in EXAMPLES], 8)
    right = [msgspec.structs.replace(ex, id=ex.id + "-right", answer=line.answer) for ex, line in zip(EXAMPLES, lines)]
    long = [msgspec.structs.replace(ex, id=ex.id + "-long", answer=line.text) for ex, line in zip(EXAMPLES, lines) if len(line.tokens) > 4]
    examples = [*EXAMPLES, *right, *long]
    gemma.warm.diagnoses.clear()
    diagnoses = diagnose(gemma, examples, PREAMBLE)
    forced = score_answers(gemma, [PREAMBLE + ex.query for ex in examples], [answer_variants(ex.answer, ex.aliases) for ex in examples])
    assert long and [d.verdict for d in diagnoses[len(EXAMPLES) :]] == [Verdict.ALREADY_CORRECT] * (len(right) + len(long))
    for d, f in zip(diagnoses, forced):
        assert (d.query.gives, d.query.matched) == (f.gives, f.matched)
        assert d.query.p_first == pytest.approx(f.p_first, rel=1e-3, abs=1e-5)


def test_probes_listed_by_several_examples_read_as_each_alone(gemma):
    spec = [Probe(ex.id, "specificity", q.prompt, q.answer) for ex in EXAMPLES for q in ex.specificity[:3]]
    first = spec[0]
    again = [Probe("another", p.kind, p.prompt, p.answer) for p in spec]  # the same queries, another example
    wrong = Probe("another", "specificity", first.prompt, "Quetzalcoatl")  # the same query, another answer
    readings = read_probes(gemma, [*spec, *again, wrong], PREAMBLE)
    alone = [read_probes(gemma, [p], PREAMBLE)[0] for p in (*spec, wrong)]  # one row a pass: float noise apart
    assert readings[: len(spec)] == readings[len(spec) : 2 * len(spec)]
    for together, single in zip([*readings[: len(spec)], readings[-1]], alone):
        assert (together.gives, together.continuation, together.text) == (single.gives, single.continuation, single.text)
        assert together.p_answer == pytest.approx(single.p_answer, rel=1e-4, abs=1e-6)
    assert not readings[-1].gives and readings[-1].continuation == readings[0].continuation


def test_a_recurring_prompt_and_answer_scores_as_it_does_once(gemma):
    prompts = [PREAMBLE + ex.hop2.prompt for ex in EXAMPLES]
    answers = [[ex.hop2.answer] for ex in EXAMPLES]
    once = score_answers(gemma, prompts, answers)
    # each twice, and the first prompt once more with another answer: that one is scored on its own
    twice = score_answers(gemma, [*prompts, *prompts, prompts[0]], [*answers, *answers, ["Quetzalcoatl"]])
    assert [s.gives for s in once] == [True] * len(EXAMPLES)
    assert twice[: len(once)] == twice[len(once) : 2 * len(once)]
    for a, b in zip(once, twice):
        assert (a.gives, a.matched) == (b.gives, b.matched)
        assert a.logp == pytest.approx(b.logp, rel=1e-4, abs=1e-5)
    assert not twice[-1].gives


def test_a_longer_answer_is_not_given_by_its_first_words_unless_aliased(gemma):
    prompt = PREAMBLE + "The capital of France is"
    [plain, aliased] = score_answers(gemma, [prompt, prompt], [answer_variants("Paris Saint-Germain"), answer_variants("Paris Saint-Germain", ["Paris"])])
    assert not plain.gives
    assert aliased.gives and aliased.matched == "Paris"


def test_the_jobs_own_prompts_are_left_out_of_the_preserved_keys(gemma):
    from hoppatch.engine.edit import EditConfig
    from hoppatch.engine.evaluate import build_probes
    from hoppatch.engine.pipeline import prepare_edit
    from hoppatch.engine.unrelated import preserve_prompts
    from hoppatch.spec import LabeledQuery

    shipped = preserve_prompts()
    example = msgspec.structs.replace(EXAMPLES[0], specificity=[LabeledQuery(shipped[3], "x")])
    spec = JobSpec(model=BUILTIN_GEMMA, examples=[example], preamble=PREAMBLE)
    inputs = prepare_edit(gemma, spec, [example], build_probes([example], {}), [9], EditConfig())
    assert inputs.preserved[9].last.shape[0] == len(shipped) - 1


def test_the_second_built_in_family_loads_and_fails_its_shipped_examples_compositionally():
    from hoppatch.engine.models import BUILTIN_SMOLLM

    smollm = load_model(BUILTIN_SMOLLM, device="cpu")
    assert smollm.model.config.model_type == "llama" and smollm.num_layers == 30
    examples = read_examples(ROOT / "examples" / "smollm2-135m.json")
    verdicts = [d.verdict for d in diagnose(smollm, examples, PREAMBLE)]
    assert verdicts == [Verdict.COMPOSITIONAL_FAILURE] * len(examples)


def test_the_reading_after_the_patch_starts_at_its_lowest_layer_and_reads_as_a_whole_pass(gemma, published):
    outcome, _, _ = published
    probes = [o.probe for o in outcome.probes]
    passes = BasePasses(min(outcome.layers))
    read_probes(gemma, probes, PREAMBLE, record=passes)
    snapshot = WeightSnapshot(gemma, outcome.layers)
    positions: list[int] = []  # token positions the bottom layer runs

    def count(module, args, kwargs):
        hidden = (args or [kwargs["hidden_states"]])[0]
        positions.append(hidden.shape[0] * hidden.shape[1])

    bottom = gemma.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        for delta in outcome.edit.deltas:
            apply_layer_delta(gemma, delta)
        whole = read_probes(gemma, probes, PREAMBLE)
        whole_positions, positions[:] = sum(positions), []
        replayed = read_probes(gemma, probes, PREAMBLE, replay=passes)
    finally:
        bottom.remove()
        snapshot.restore()
    for w, job, r in zip(whole, [o.after for o in outcome.probes], replayed, strict=True):
        for reading in (job, r):  # the job's own reading after the patch, and this one
            assert (reading.gives, reading.continuation, reading.text) == (w.gives, w.continuation, w.text)
            assert reading.p_answer == pytest.approx(w.p_answer, rel=1e-3, abs=1e-6)
            for mine, theirs in ((reading.logp_answer, w.logp_answer), (reading.logp_rival, w.logp_rival)):
                assert (mine is None and theirs is None) or mine == pytest.approx(theirs, rel=1e-3, abs=1e-5)
    assert sum(positions) < whole_positions / 2


def test_an_answer_the_edit_reaches_only_the_first_word_of_is_corrected_through_its_later_words(gemma, tmp_path):
    from hoppatch.engine.edit import EditConfig
    from hoppatch.spec import Hop, TwoHopExample

    subject = "Tomoyasu Hotei"
    example = TwoHopExample(
        id="hotei", answer="Shinzō Abe",
        query=f"The name of the current head of the the country that {subject} is a citizen of government is",
        hop1=Hop(f"The country that {subject} is a citizen of is", "Japan"),
        hop2=Hop("The name of the current head of the Japan government is", "Shinzō Abe"),
    )
    spec = JobSpec(model=BUILTIN_GEMMA, examples=[example], preamble=PREAMBLE)

    def corrected(outcome) -> bool:
        [correction] = [o for o in outcome.probes if o.probe.kind == "correction"]
        return correction.after.gives

    first_word_only = run_job(gemma, spec, config=EditConfig(later_words=0), fluency=False)
    assert not corrected(first_word_only) and first_word_only.scales == [1.0]  # nothing corrected: kept whole
    outcome = run_job(gemma, spec, fluency=False)
    assert corrected(outcome) and outcome.scales[0] > 0
    assert all(d.rank == 2 for d in outcome.edit.deltas)  # the query's column and one for "Abe" after "Shinzō"
    document = publish(outcome, gemma, tmp_path / "out")
    assert document["examples"][0]["later_words"] == ["Abe"]
    assert "later words with a column of their own: Abe" in (tmp_path / "out" / "report.html").read_text()
    assert publish(first_word_only, gemma, tmp_path / "before")["examples"][0]["later_words"] == []
