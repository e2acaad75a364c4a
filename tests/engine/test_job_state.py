"""A job's state: the warm caches' budgets, the run context's stops, calibration, and what the edit preserves."""

import pytest
import torch

from hoppatch.engine.answers import REPLAY_MARGIN, BasePasses, answer_variants, score_answers
from hoppatch.engine.calibrate import calibrate, mixed_deltas
from hoppatch.engine.context import RunContext, checkpoint, running
from hoppatch.engine.edit import EditConfig, LayerDelta, WeightSnapshot, key_statistics
from hoppatch.engine.errors import BudgetExceeded, Cancelled
from hoppatch.engine.evaluate import Probe, ProbeOutcome, Reading, rates, read_probes
from hoppatch.engine.lens import first_token
from hoppatch.engine.pipeline import later_words, prepare_edit, prepare_later_words, preserved_prompts
from hoppatch.engine.tracing import attn_out_gradients, record_attn_out
from hoppatch.engine.unrelated import counterfactual_queries, preserve_prompts
from hoppatch.engine.warm import ENTRY_BYTES, ByteLru
from hoppatch.spec import Hop, JobSpec, LabeledQuery, TwoHopExample, read_examples

QUERY = "The nationality of the creator of C. Auguste Dupin is"
OTHER = "The capital of the country that Poe was born in is"


def test_byte_lru_evicts_the_least_recently_used_within_its_budget():
    entry = ENTRY_BYTES  # every entry's own cost, besides its value
    cache: ByteLru[str, int] = ByteLru("test", budget=2 * entry + 10, size_of=lambda v: v)
    cache.put("a", 4)
    cache.put("b", 4)
    assert cache.get("a") == 4  # a is now the most recent
    cache.put("c", 4)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 2 * entry + 8 and cache.evictions == 1
    cache.put("huge", 5000)  # larger than the budget: kept alone
    assert len(cache) == 1 and cache.bytes == entry + 5000 and cache.evictions == 3


def test_many_small_entries_are_held_to_the_budget_by_their_entry_cost():
    cache: ByteLru[int, int] = ByteLru("test", budget=100 * ENTRY_BYTES, size_of=lambda v: 0)
    for key in range(1000):
        cache.put(key, key)
    assert len(cache) == 100 and cache.bytes <= cache.budget


def test_checkpoints_stop_a_cancelled_or_late_job_and_pass_outside_one():
    checkpoint()
    with running(RunContext(max_seconds=600, should_stop=lambda: True)):
        with pytest.raises(Cancelled):
            checkpoint()
    with running(RunContext(max_seconds=-1)) as late:
        late.stage_name = "edit"
        with pytest.raises(BudgetExceeded, match="during edit"):
            checkpoint()
    checkpoint()


def test_a_job_past_its_budget_fails_with_budget_exceeded(tiny):
    from hoppatch.engine.pipeline import run_job
    from hoppatch.spec import Budget

    example = TwoHopExample(
        id="a", query=QUERY, answer="America",
        hop1=Hop("The creator of C. Auguste Dupin is", "Edgar Allan Poe"), hop2=Hop("The nationality of Edgar Allan Poe is", "America"),
    )
    spec = JobSpec(model="tiny", examples=[example], budget=Budget(max_seconds=1e-9))
    with pytest.raises(BudgetExceeded, match="during diagnose"):
        run_job(tiny, spec)


def test_answers_count_only_as_written_or_as_an_alias():
    assert answer_variants("Peter the Great") == ["Peter the Great"]
    assert answer_variants("United States of America", ["USA", " United States "]) == ["United States of America", "USA", "United States"]


def _reading(continuation: tuple[int, ...], gives: bool = False) -> Reading:
    return Reading(gives, 0.1, -2.0, continuation, "text")


def test_specificity_is_an_unchanged_continuation_and_kept_or_right_is_looser():
    probe = Probe("a", "specificity", "The capital of France is", "Paris")
    same = ProbeOutcome(probe, _reading((1, 2, 3, 4, 5, 6, 7, 8)), _reading((1, 2, 3, 4, 5, 6, 7, 8)))
    tail_changed = ProbeOutcome(probe, _reading((1, 2, 3, 4, 5, 6, 7, 8)), _reading((1, 2, 3, 4, 9, 9, 9, 9)))
    right_now = ProbeOutcome(probe, _reading((5, 5)), _reading((7, 7), gives=True))
    damaged = ProbeOutcome(probe, _reading((1, 2, 3)), _reading((1, 2, 9)))
    r = rates([same, tail_changed, right_now, damaged])
    assert r.specificity == 0.25
    assert r.specificity_kept_or_right == 0.75
    assert r.correction is None and r.paraphrase is None


def test_right_answers_kept_counts_only_the_unrelated_queries_answered_right_before():
    probe = Probe("a", "specificity", "The capital of France is", "Paris")
    kept = ProbeOutcome(probe, _reading((1, 2), gives=True), _reading((1, 2), gives=True))
    lost = ProbeOutcome(probe, _reading((1, 2), gives=True), _reading((3, 4)))
    now_right = ProbeOutcome(probe, _reading((5, 5)), _reading((7, 7), gives=True))
    still_wrong = ProbeOutcome(probe, _reading((5, 5)), _reading((6, 6)))
    r = rates([kept, lost, now_right, now_right, still_wrong])
    assert (r.specificity_right_before, r.specificity_right) == (0.4, 0.6)
    assert r.specificity_right_kept == 0.5  # of `kept` and `lost`: queries turned right do not make up for `lost`
    assert rates([now_right, still_wrong]).specificity_right_kept is None  # nothing was right to keep


def test_rates_before_and_after_come_from_the_same_outcomes():
    probe = Probe("a", "correction", QUERY, "American", rival="French")
    fixed = ProbeOutcome(probe, Reading(False, 0.1, -3.0, logp_rival=-1.0), Reading(True, 0.9, -0.1, logp_rival=-4.0))
    missed = ProbeOutcome(probe, Reading(False, 0.1, -3.0, logp_rival=-1.0), Reading(False, 0.2, -2.0, logp_rival=-1.5))
    r = rates([fixed, missed])
    assert (r.correction, r.correction_before, r.event_before, r.event_after) == (0.5, 0.0, 0.0, 0.5)


def _forcing_delta(lm, layer: int, query: str, answer: str, strength: float) -> torch.Tensor:
    """A left factor column that, fed the query's key, writes the answer's unembedding row at `layer`."""
    direction = lm.unembed.weight[first_token(lm, answer)].float()
    return strength * direction / direction.norm()


def test_calibrate_keeps_the_least_share_that_corrects_and_drops_what_cannot_be_corrected(tiny):
    layer = tiny.num_layers - 1
    queries = [QUERY, OTHER]
    keys = record_attn_out(tiny, queries, [layer]).inputs[layer]  # (2, in)
    right = torch.linalg.pinv(keys.double().T).float()  # (2, in): right @ keys.T = I, so column i acts on query i alone
    left = torch.stack([_forcing_delta(tiny, layer, QUERY, "Poe", 200.0), torch.zeros(tiny.unembed.weight.shape[1])], 1)
    delta = LayerDelta(layer, tiny.attn_out_name(layer), left, right, relative_norm=1.0)
    base = tiny.attn_out_weight(layer).clone()
    scales = calibrate(tiny, [delta], queries, [["Poe"], ["Paris"]], steps=(0.5, 1.0))
    assert scales == [0.5, 0.0]
    assert torch.equal(tiny.attn_out_weight(layer), base)  # trials never touch the weights


def test_calibrate_gives_every_query_zero_when_no_step_corrects_any(tiny):
    layer = tiny.num_layers - 1
    right = torch.zeros(2, tiny.attn_out_weight(layer).shape[1])
    delta = LayerDelta(layer, tiny.attn_out_name(layer), torch.zeros(tiny.unembed.weight.shape[1], 2), right, relative_norm=0.0)
    assert calibrate(tiny, [delta], [QUERY, OTHER], [["Poe"], ["Paris"]], steps=(0.5, 1.0)) == [0.0, 0.0]


def _example(id: str, answer: str) -> TwoHopExample:
    return TwoHopExample(
        id=id, query=QUERY, answer=answer,
        hop1=Hop("The creator of C. Auguste Dupin is", "Edgar Allan Poe"), hop2=Hop("The nationality of Edgar Allan Poe is", answer),
    )


def test_later_words_come_for_uncorrected_many_word_answers_whole_examples_within_room():
    patched = [_example("a", "Shinzo Abe"), _example("b", "Peter the Great"), _example("c", "France"), _example("d", "New Delhi")]
    rows = later_words(patched, [0.0, 0.0, 0.0, 0.5], count=2, room=8)
    assert (rows.owners, rows.said, rows.next_words) == ([0, 1, 1], ["Shinzo", "Peter", "Peter the"], ["Abe", "the", "Great"])
    assert rows.prompts(["Q0", "Q1", "Q2", "Q3"]) == ["Q0 Shinzo", "Q1 Peter", "Q1 Peter the"]
    assert later_words(patched, [0.0] * 4, count=1, room=8).said == ["Shinzo", "Peter", "New"]
    assert later_words(patched, [0.0] * 4, count=2, room=2).owners == [0, 3]  # the second example's two rows do not fit
    assert later_words(patched, [0.0] * 4, count=0, room=8).owners == []


def test_the_later_words_extend_the_edits_inputs_by_a_counterfactual_set_and_gradient_rows(tiny):
    example = _example("a", "Shinzo Abe")
    probe = Probe("a", "specificity", "The capital of France is", "Paris")
    spec = JobSpec(model="tiny", examples=[example])
    layers, config = [1, 2], EditConfig(counterfactuals_per_example=6)
    inputs = prepare_edit(tiny, spec, [example], [probe], layers, config)
    rows = later_words([example], [0.0], config.later_words, room=4)
    extended = prepare_later_words(tiny, spec, [example], rows, [probe], layers, inputs, config)
    assert extended.preserved is inputs.preserved and len(extended.counterfactual_keys) == 2
    counterfactuals = [f"{query} Shinzo" for query in counterfactual_queries(example, 6)]
    expected = record_attn_out(tiny, counterfactuals, layers).inputs
    gradients = attn_out_gradients(tiny, [f"{QUERY} Shinzo"], [first_token(tiny, "Abe")], layers)
    for layer in layers:
        torch.testing.assert_close(extended.counterfactual_keys[1][layer], expected[layer], atol=1e-5, rtol=1e-4)
        assert extended.counterfactual_keys[0][layer] is inputs.counterfactual_keys[0][layer]
        torch.testing.assert_close(extended.answer_gradients[layer][:1], inputs.answer_gradients[layer])
        torch.testing.assert_close(extended.answer_gradients[layer][1:], gradients[layer], atol=1e-5, rtol=1e-4)


def test_rows_repeating_a_prompt_share_the_layers_below_the_edit_and_score_as_each_alone(tiny):
    layer = tiny.num_layers - 1
    queries = [QUERY, OTHER]
    keys = record_attn_out(tiny, queries, [layer]).inputs[layer]
    left = torch.stack([_forcing_delta(tiny, layer, QUERY, "Poe", 50.0), _forcing_delta(tiny, layer, OTHER, "Paris", 20.0)], 1)
    delta = LayerDelta(layer, tiny.attn_out_name(layer), left, torch.linalg.pinv(keys.double().T).float(), relative_norm=1.0)
    trials = torch.tensor([[0.0, 0.0], [0.5, 1.0], [1.0, 0.3]]).repeat_interleave(2, 0)  # row 2k + i: trial k, query i
    prompts, answers = queries * 3, [["Poe"], ["Paris"]] * 3

    def around(rows):
        return mixed_deltas(tiny, [delta], trials[rows])

    rows_seen: list[int] = []  # rows the bottom layer runs, per pass

    def count_rows(module, args, kwargs):
        rows_seen.append((args or [kwargs["hidden_states"]])[0].shape[0])

    bottom = tiny.layers[0].register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        alone = score_answers(tiny, prompts, answers, around)
        alone_rows = sum(rows_seen)
        rows_seen.clear()
        shared = score_answers(tiny, prompts, answers, around, edited_from=layer)
    finally:
        bottom.remove()
    assert alone_rows == 6 and sum(rows_seen) == 2  # the bottom layer ran each prompt once
    assert [s.gives for s in shared] == [s.gives for s in alone]
    assert len({s.logp for s in alone}) > 2  # the trials do differ
    for a, b in zip(alone, shared):
        assert b.logp == pytest.approx(a.logp, rel=1e-4, abs=1e-5)
        assert b.p_first == pytest.approx(a.p_first, rel=1e-4, abs=1e-6)


def test_prepare_never_preserves_the_jobs_own_prompts(tiny):
    shipped = preserve_prompts()
    example = TwoHopExample(
        id="a", query=QUERY, answer="America",
        hop1=Hop("The creator of C. Auguste Dupin is", "Edgar Allan Poe"), hop2=Hop("The nationality of Edgar Allan Poe is", "America"),
        specificity=[LabeledQuery(shipped[0], "x"), LabeledQuery(shipped[5], "y")],
    )
    spec = JobSpec(model="tiny", examples=[example])
    probes = [Probe("a", "specificity", q.prompt, q.answer) for q in example.specificity]
    layers = [1]
    inputs = prepare_edit(tiny, spec, [example], probes, layers, EditConfig(off_answer_weight=1.0))
    kept = preserved_prompts("", {shipped[0], shipped[5]})
    assert shipped[0] not in kept and shipped[5] not in kept and len(kept) == len(shipped) - 2
    expected = key_statistics(tiny, kept, layers)[1]
    torch.testing.assert_close(inputs.preserved[1].moment, expected.moment)
    torch.testing.assert_close(inputs.preserved[1].last, expected.last)
    assert all(q not in {shipped[0], shipped[5]} for q in counterfactual_queries(example))


def test_no_shipped_preserve_prompt_is_a_prompt_of_the_shipped_examples():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shipped = {p.lower() for p in preserve_prompts()}
    for path in (root / "examples").glob("*.json"):
        for ex in read_examples(path):
            prompts = {ex.query, ex.hop1.prompt, ex.hop2.prompt, *ex.paraphrases, *(q.prompt for q in ex.generalization), *(q.prompt for q in ex.specificity)}
            assert not {p.lower() for p in prompts} & shipped, path


def test_preserved_statistics_are_cached_on_disk_keyed_by_the_weights_below(tiny, tmp_path, monkeypatch):
    from hoppatch.engine.pipeline import preserved_statistics

    monkeypatch.setenv("HOPPATCH_CACHE", str(tmp_path))
    prompts, config = list(preserve_prompts()[:12]), EditConfig()
    first = preserved_statistics(tiny, prompts, [1, 2], config)
    files = sorted(tmp_path.rglob("statistics.safetensors"))
    assert len(files) == 2
    tiny.warm.clear()
    again = preserved_statistics(tiny, prompts, [1, 2], config)  # read back from disk
    torch.testing.assert_close(again[2].moment, first[2].moment)
    assert sorted(tmp_path.rglob("statistics.safetensors")) == files
    with torch.no_grad():
        tiny.layers[2].get_submodule(tiny.arch.attn_out).weight.mul_(2.0)  # layer 2's projection: not below layer 1
        tiny.layers[0].get_submodule(tiny.arch.attn_out).weight.mul_(2.0)  # below both
    tiny.warm.clear()
    changed = preserved_statistics(tiny, prompts, [1, 2], config)
    assert len(list(tmp_path.rglob("statistics.safetensors"))) == 4  # both layers depend on layer 0
    assert not torch.allclose(changed[1].moment, first[1].moment)


def test_the_base_fluency_reading_is_stored_on_disk_keyed_by_every_weight(tmp_path, monkeypatch):
    from hoppatch.engine import pipeline
    from hoppatch.engine.tiny_models import tiny_model

    monkeypatch.setenv("HOPPATCH_CACHE", str(tmp_path))
    tiny = tiny_model("llama")  # a family whose positions outlast the fluency text
    first = pipeline.base_fluency(tiny, record_layer=1)
    assert 1 in tiny.warm.fluency_inputs  # the same pass kept the layer's input
    [stored] = tmp_path.rglob("reading.safetensors")
    tiny.warm.clear()  # a new process: nothing warm
    with monkeypatch.context() as m:
        m.setattr(pipeline, "read_fluency", lambda *a, **k: pytest.fail("the stored reading was read again"))
        again = pipeline.base_fluency(tiny, record_layer=1)
    assert again.perplexity == first.perplexity
    torch.testing.assert_close(again.top_ids, first.top_ids)
    torch.testing.assert_close(again.logprobs, first.logprobs)
    with torch.no_grad():
        tiny.layers[-1].get_submodule(tiny.arch.attn_out).weight.mul_(2.0)  # the top layer: every position's reading moves
    tiny.warm.clear()
    changed = pipeline.base_fluency(tiny)
    assert len(list(tmp_path.rglob("reading.safetensors"))) == 2 and stored.exists()
    assert changed.perplexity != first.perplexity


def test_the_fluency_reading_unembedded_in_tiles_is_the_whole_softmax(monkeypatch):
    """Perplexity, top tokens and their log-probabilities as one log-softmax over the whole vocabulary gives
    them, with the positions and the vocabulary read in several blocks (sizes that divide neither)."""
    from hoppatch.engine import evaluate
    from hoppatch.engine.tiny_models import tiny_model
    from hoppatch.engine.tracing import encode, final_hidden_states

    tiny = tiny_model("llama")
    monkeypatch.setattr(evaluate, "FLUENCY_VOCAB_SLICE", tiny.vocab_size // 3 + 7)
    batch = encode(tiny, [evaluate.fluency_text()])
    monkeypatch.setattr(evaluate, "FLUENCY_POSITION_BLOCK", batch.input_ids.shape[1] // 3 + 5)
    reading = evaluate.read_fluency(tiny)
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny.logits(final_hidden_states(tiny, batch)[0, :-1]).double(), -1)
    targets = batch.input_ids[0, 1:, None]
    assert reading.perplexity == pytest.approx(float(torch.exp(-logprobs.gather(1, targets).mean())), rel=1e-5)
    top = logprobs.topk(evaluate.FLUENCY_TOP_TOKENS, -1)
    torch.testing.assert_close(reading.logprobs[:, :-1].double(), top.values, atol=1e-4, rtol=0)
    assert (reading.top_ids == top.indices).float().mean() > 0.99  # ties among near-equal tails may swap
    again = evaluate.read_fluency(tiny, base=reading)  # read at the base's tokens: the same columns
    torch.testing.assert_close(again.logprobs, reading.logprobs)
    assert evaluate.kl_drift(reading, again) == pytest.approx(0.0, abs=1e-9)


def test_preserved_statistics_of_another_projection_are_cached_apart(tmp_path, monkeypatch):
    from dataclasses import replace

    from hoppatch.engine.pipeline import preserved_statistics
    from hoppatch.engine.tiny_models import tiny_model

    monkeypatch.setenv("HOPPATCH_CACHE", str(tmp_path))
    lm = tiny_model("llama")
    prompts, config = list(preserve_prompts()[:12]), EditConfig()
    attention = preserved_statistics(lm, prompts, [1], config)[1]
    lm.warm.clear()
    lm.arch = replace(lm.arch, attn_out="mlp.down_proj")  # same weights, another projection's inputs
    mlp = preserved_statistics(lm, prompts, [1], config)[1]
    assert mlp.moment.shape[0] == lm.model.config.intermediate_size != attention.moment.shape[0]
    assert len(list(tmp_path.rglob("statistics.safetensors"))) == 2


def test_report_titles_render_a_query_literally(tmp_path):
    from hoppatch.engine.lens import LensCurve
    from hoppatch.engine.report import plot_example

    curve = LensCurve([0.1, 0.2], [3, 2], [0.1, 0.3], [4, 1])
    plot_example(tmp_path / "plot.png", r"The price of $\foo$ is", curve, [0.1, 0.2], [1])  # as mathtext: an unknown symbol
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_a_prompt_past_the_models_context_fails_as_invalid_input_before_any_pass(tiny, monkeypatch):
    from hoppatch.engine import pipeline
    from hoppatch.engine.errors import InvalidJob

    example = TwoHopExample(id="a", query=QUERY, answer="America", hop1=Hop("The creator is", "Poe"), hop2=Hop("Poe is", "America"))
    limit = tiny.context_length
    spec = JobSpec(model="tiny", examples=[example], preamble="word " * limit)
    monkeypatch.setattr(pipeline, "diagnose", lambda *a: pytest.fail("a forward pass ran"))
    with pytest.raises(InvalidJob, match=f"takes {limit}") as failure:
        pipeline.run_job(tiny, spec)
    assert failure.value.code == "invalid_input"


def test_an_interrupted_restore_is_caught_by_the_weight_hashes(tiny):
    from hoppatch.engine.delta import weight_sha256
    from hoppatch.engine.pipeline import base_weights_intact

    name = f"{tiny.attn_out_name(1)}.weight"
    tiny.warm.unverified[name] = weight_sha256(tiny.attn_out(1).weight)
    assert base_weights_intact(tiny) and not tiny.warm.unverified  # verified once, then forgotten
    tiny.warm.unverified[name] = weight_sha256(tiny.attn_out(1).weight)
    with torch.no_grad():
        tiny.attn_out(1).weight.add_(1e-3)  # an edit left in place
    assert not base_weights_intact(tiny)


def test_the_disk_caches_are_trimmed_together_least_recently_used_first(tmp_path, monkeypatch):
    import os

    from hoppatch.engine.pipeline import trim_disk_caches

    monkeypatch.setenv("HOPPATCH_CACHE", str(tmp_path))
    files = []
    kinds = {"new": "preserved-keys/new/statistics", "middle": "fluency/middle/reading", "old": "preserved-keys/old/statistics"}
    for age, name in enumerate(["new", "middle", "old"]):
        path = tmp_path / f"{kinds[name]}.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
        files.append(path)
    assert trim_disk_caches(2500) == [files[2]]
    assert trim_disk_caches(1000) == [files[1]]
    assert [p.exists() for p in files] == [True, False, False]


def test_the_warm_budget_splits_a_total_across_the_caches():
    from hoppatch.engine.warm import WarmBudget, WarmState

    budget = WarmBudget.within(100 << 20)
    assert 99 << 20 <= budget.total <= 100 << 20
    state = WarmState(budget)
    assert sum(cache.budget for cache in state.caches()) <= budget.total


PREAMBLE_WORDS = "The capital of France is Paris . The capital of Germany is Berlin . The currency of Japan is the yen . " * 2


def _same_readings(expected: list[Reading], got: list[Reading]) -> None:
    for e, g in zip(expected, got, strict=True):
        assert (g.gives, g.continuation, g.text) == (e.gives, e.continuation, e.text)
        assert g.p_answer == pytest.approx(e.p_answer, rel=1e-4, abs=1e-6)
        for mine, theirs in ((g.logp_answer, e.logp_answer), (g.logp_rival, e.logp_rival)):
            assert (mine is None and theirs is None) or mine == pytest.approx(theirs, rel=1e-4, abs=1e-5)


def _rank_two_change(lm, layers: list[int], size: float) -> None:
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        weight = lm.attn_out_weight(layer)
        change = torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight.shape[1], generator=generator)
        weight.data += size * weight.norm() * change / weight.numel() ** 0.5


def test_readings_after_an_edit_start_at_its_lowest_layer_and_read_as_whole_passes(tiny, monkeypatch):
    # a random tiny model's top logits lie within 1e-3 of each other; the margin only has to outlast the
    # float32 noise between pass shapes, far smaller here
    monkeypatch.setitem(REPLAY_MARGIN, torch.float32, 1e-5)
    layer = 2
    prompts = [QUERY, OTHER, "The capital of Poland is", "The official language of India is", "The founder of Islam was", "Q: Who is the author of Dupin ? A:"]
    probes = [Probe("a", "specificity", p, "Paris") for p in prompts] + [
        Probe("a", "correction", QUERY, "America", rival="France"),
        Probe("a", "paraphrase", prompts[5], "Edgar Allan Poe"),
    ]
    passes = BasePasses(layer)
    before = read_probes(tiny, probes, PREAMBLE_WORDS, record=passes)
    rows: list[int] = []  # rows the bottom layer runs, per pass
    positions: list[int] = []  # and their token positions

    def count(module, args, kwargs):
        hidden = (args or [kwargs["hidden_states"]])[0]
        rows.append(hidden.shape[0])
        positions.append(hidden.shape[0] * hidden.shape[1])

    snapshot = WeightSnapshot(tiny, [layer, layer + 1])
    bottom = tiny.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        unedited = read_probes(tiny, probes, PREAMBLE_WORDS, replay=passes)
        only_preamble = set(rows) == {1}  # below the layer, only the shared preamble ran, once per pass
        _rank_two_change(tiny, [layer, layer + 1], 0.6)
        positions.clear()
        whole = read_probes(tiny, probes, PREAMBLE_WORDS)
        whole_positions = sum(positions)
        positions.clear()
        replayed = read_probes(tiny, probes, PREAMBLE_WORDS, replay=passes)
    finally:
        bottom.remove()
        snapshot.restore()
    assert only_preamble
    _same_readings(before, unedited)
    changed = [b.continuation != w.continuation for b, w in zip(before, whole) if w.continuation is not None]
    assert any(changed) and not all(changed)  # the edit changes some continuations and keeps others
    _same_readings(whole, replayed)
    assert sum(positions) < whole_positions  # below the edit: the preamble, and the changed continuations decoded anew
