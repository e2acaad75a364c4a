"""Evaluate a patch: the same queries scored before and after, in one batched pass each.

Query kinds: `correction` (the composed query), `paraphrase`, `generalization` (other two-hop queries through
the same bridge, their own answers) and `specificity` (unrelated queries). A specificity query succeeds when
its greedy continuation is unchanged (its first line, up to `CONTINUATION_TOKENS` new tokens); the looser
`kept_or_right` also accepts the same first few tokens, or the query's own right answer.

Fluency is read on a shipped plain text of about 2,000 tokens: perplexity, and the next-token KL divergence
of the patched model from the base at every position of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import torch

from hoppatch.spec import TwoHopExample

from .answers import BasePasses, answer_variants, greedy_continuations, score_answers
from .models import LoadedModel
from .tracing import encode, final_hidden_states, layer_input, resumed_at
from .warm import ByteLru

CONTINUATION_TOKENS = 8
"""New tokens compared for `specificity` (fewer where the first line ends sooner)."""
KEPT_TOKENS = 4
"""New tokens that must match for `kept_or_right`."""
FLUENCY_TOP_TOKENS = 32
"""KL drift compares the base model's top tokens at each position, with the rest as one outcome."""


@cache
def fluency_text() -> str:
    """A plain expository text of about 2,000 tokens, written for this purpose."""
    return files("hoppatch.engine").joinpath("data/fluency.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Probe:
    """One query to score: which example and kind it belongs to, and the answers it is judged by."""

    example_id: str
    kind: str  # correction | paraphrase | generalization | specificity
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()
    rival: str | None = None  # the model's pre-patch answer to the query, for the event metric


@dataclass(frozen=True)
class Reading:
    gives: bool  # gives the probe's answer
    p_answer: float
    logp_answer: float | None  # teacher-forced; None where the greedy decoding decided `gives`
    continuation: tuple[int, ...] | None = None  # specificity only: greedy first-line tokens
    text: str | None = None  # specificity only: that continuation, decoded
    logp_rival: float | None = None  # correction only


@dataclass(frozen=True)
class ProbeOutcome:
    probe: Probe
    before: Reading
    after: Reading

    @property
    def unchanged(self) -> bool:
        return self.after.continuation == self.before.continuation

    @property
    def success(self) -> bool:
        """Correction, paraphrase, generalization: gives the answer after. Specificity: continuation unchanged."""
        return self.unchanged if self.probe.kind == "specificity" else self.after.gives

    @property
    def kept_or_right(self) -> bool:
        """Specificity, leniently: the first `KEPT_TOKENS` new tokens kept, or the query's right answer given."""
        before, after = self.before.continuation or (), self.after.continuation or ()
        return before[:KEPT_TOKENS] == after[:KEPT_TOKENS] or self.after.gives


def build_probes(examples: Sequence[TwoHopExample], predictions: dict[str, str]) -> list[Probe]:
    probes = []
    for ex in examples:
        probes.append(Probe(ex.id, "correction", ex.query, ex.answer, tuple(ex.aliases), predictions.get(ex.id)))
        probes += [Probe(ex.id, "paraphrase", p, ex.answer, tuple(ex.aliases)) for p in ex.paraphrases]
        probes += [Probe(ex.id, "generalization", q.prompt, q.answer) for q in ex.generalization]
        probes += [Probe(ex.id, "specificity", q.prompt, q.answer) for q in ex.specificity]
    return probes


def _read(
    lm: LoadedModel, probes: Sequence[Probe], preamble: str, record: BasePasses | None, replay: BasePasses | None
) -> list[Reading]:
    """One greedy decoding call for the specificity probes, which also says whether each gives its answer,
    and one scoring call for the other probes (plus a row per correction probe for its rival answer, and any
    specificity probe whose answer outlasts the decoding)."""
    prompts = [preamble + p.prompt for p in probes]
    answers = [answer_variants(p.answer, p.aliases) for p in probes]
    specificity = [i for i, p in enumerate(probes) if p.kind == "specificity"]
    decoded = greedy_continuations(
        lm, [prompts[i] for i in specificity], CONTINUATION_TOKENS, [answers[i] for i in specificity], record=record, replay=replay
    )
    continuations = dict(zip(specificity, decoded))
    forced = [i for i in range(len(probes)) if i not in continuations or continuations[i].score is None]
    rivals = [i for i, p in enumerate(probes) if p.rival]
    scores = score_answers(
        lm, [prompts[i] for i in forced + rivals], [answers[i] for i in forced] + [[probes[i].rival] for i in rivals],
        record=record, replay=replay,
    )
    score_of = {i: continuations[i].score for i in specificity} | dict(zip(forced, scores))
    rival_logp = {i: s.logp for i, s in zip(rivals, scores[len(forced) :])}
    readings = []
    for i in range(len(probes)):
        score, continuation = score_of[i], continuations.get(i)
        tokens, text = (continuation.tokens, continuation.text) if continuation else (None, None)
        readings.append(Reading(score.gives, score.p_first, score.logp, tokens, text, rival_logp.get(i)))
    return readings


def read_probes(
    lm: LoadedModel,
    probes: Sequence[Probe],
    preamble: str,
    known: ByteLru | None = None,
    *,
    record: BasePasses | None = None,
    replay: BasePasses | None = None,
) -> list[Reading]:
    """Readings of the model as it is now. `known` ((preamble, probe) → reading, `WarmState.readings`) holds
    readings of the same unedited model: they are reused, and new ones are added.

    `record`, on the unedited model, keeps what its passes leave at one layer; `replay`, on a model edited
    from that layer up, starts the same readings there (see `answers.BasePasses`)."""
    found = {p: known.get((preamble, p)) if known is not None else None for p in probes}
    todo = [p for p, reading in found.items() if reading is None]
    if todo:
        # examples of a job often list the same unrelated query: each distinct reading is made once
        distinct = list({_reading_key(p): p for p in todo}.values())
        read = {_reading_key(p): reading for p, reading in zip(distinct, _read(lm, distinct, preamble, record, replay))}
        for probe in todo:
            reading = read[_reading_key(probe)]
            found[probe] = known.put((preamble, probe), reading) if known is not None else reading
    return [found[p] for p in probes]


def _reading_key(probe: Probe) -> tuple:
    """What a reading depends on: the prompt, the answers it is judged by, and whether it is decoded."""
    return (probe.kind == "specificity", probe.prompt, probe.answer, probe.aliases, probe.rival)


@dataclass(frozen=True)
class FluencyReading:
    """Next-token view of the fluency text: its perplexity, and per position the base model's top tokens
    with their log-probabilities (the rest summed as one last column)."""

    perplexity: float
    top_ids: torch.Tensor  # (T, k)
    logprobs: torch.Tensor  # (T, k + 1)


FLUENCY_POSITION_BLOCK = 512
FLUENCY_VOCAB_SLICE = 4096
"""The fluency text is unembedded in tiles of this many positions by this many tokens of the vocabulary: a
tile's logits (8 MB) are still in the CPU's cache when the softmax's reductions read them, and no (positions ×
vocabulary) tensor is ever whole."""


@torch.no_grad()
def read_fluency(lm: LoadedModel, base: FluencyReading | None = None, resume: tuple[int, torch.Tensor] | None = None) -> FluencyReading:
    """Perplexity of the fluency text; next-token log-probabilities at `base`'s top tokens (or the model's own).

    `resume` ((layer, `fluency_layer_input` of the base model there)) skips the layers below `layer`: for a
    model edited only from `layer` up, the reading is the same.
    """
    batch = encode(lm, [fluency_text()])
    with resumed_at(lm, *resume) if resume else nullcontext():
        hidden = final_hidden_states(lm, batch)[0, :-1]  # (T-1, D): predicts ids[1:]
    targets = batch.input_ids[0, 1:, None].to(hidden.device)
    blocks = [
        _unembed_block(lm, hidden[at : at + FLUENCY_POSITION_BLOCK], targets[at : at + FLUENCY_POSITION_BLOCK],
                       None if base is None else base.top_ids[at : at + FLUENCY_POSITION_BLOCK].to(hidden.device))
        for at in range(0, hidden.shape[0], FLUENCY_POSITION_BLOCK)
    ]
    lse, target_logits, top_logits, top_ids = (torch.cat(parts) for parts in zip(*blocks))
    nll = float((lse[:, None] - target_logits).sum())
    chosen = top_logits - lse[:, None]
    rest = torch.log1p(-chosen.exp().sum(-1).clamp(max=1 - 1e-6))
    return FluencyReading(math.exp(nll / hidden.shape[0]), top_ids.cpu(), torch.cat([chosen, rest[:, None]], -1).cpu())


def _unembed_block(
    lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of positions against the vocabulary, slice by slice: each position's log-sum-exp, its
    target's logit, and the logits of `top_ids` (or of its own top `FLUENCY_TOP_TOKENS`, with their ids)."""
    positions = hidden.shape[0]
    lse = torch.full((positions,), float("-inf"), device=hidden.device)
    target_logits = torch.zeros(positions, 1, device=hidden.device)
    if top_ids is None:
        top_logits = torch.full((positions, FLUENCY_TOP_TOKENS), float("-inf"), device=hidden.device)
        ids = torch.zeros(positions, FLUENCY_TOP_TOKENS, dtype=torch.long, device=hidden.device)
    else:
        top_logits, ids = torch.zeros(top_ids.shape, device=hidden.device), top_ids
    for start in range(0, lm.vocab_size, FLUENCY_VOCAB_SLICE):
        logits = lm.logits(hidden, slice(start, start + FLUENCY_VOCAB_SLICE)).float()
        lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        _take_logits(logits, start, targets, target_logits)
        if top_ids is None:
            values, found = logits.topk(min(FLUENCY_TOP_TOKENS, logits.shape[1]), -1)
            top_logits, order = torch.cat([top_logits, values], -1).topk(FLUENCY_TOP_TOKENS, -1)
            ids = torch.cat([ids, found + start], -1).gather(1, order)
        else:
            _take_logits(logits, start, ids, top_logits)
    return lse, target_logits, top_logits, ids


def _take_logits(logits: torch.Tensor, start: int, ids: torch.Tensor, into: torch.Tensor) -> None:
    """Copy into `into` the logits of the token `ids` (positions, k) that lie in this vocabulary slice."""
    local = ids - start
    inside = (local >= 0) & (local < logits.shape[1])
    into.copy_(torch.where(inside, logits.gather(1, local.clamp(0, logits.shape[1] - 1)), into))


def fluency_layer_input(lm: LoadedModel, layer: int) -> torch.Tensor:
    """The fluency text's residual stream entering `layer`, for `read_fluency(resume=...)`."""
    return layer_input(lm, encode(lm, [fluency_text()]), layer)


def kl_drift(base: FluencyReading, patched: FluencyReading) -> float:
    """Mean KL(base ‖ patched) of the next-token distributions over the text, on the base's top tokens + the rest."""
    p = base.logprobs.double()
    q = patched.logprobs.double()
    return float((p.exp() * (p - q)).sum(-1).mean())


@dataclass(frozen=True)
class Rates:
    """Every rate a job reports, computed in one place from its probe outcomes."""

    correction: float | None
    paraphrase: float | None
    generalization: float | None
    specificity: float | None  # continuation unchanged
    specificity_kept_or_right: float | None
    specificity_right: float | None  # the unrelated query's own answer given
    specificity_right_kept: float | None  # of those given before the patch, the share still given after
    correction_before: float | None
    paraphrase_before: float | None
    generalization_before: float | None
    specificity_right_before: float | None
    event_before: float | None
    event_after: float | None


def _fraction(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def rates(outcomes: Sequence[ProbeOutcome]) -> Rates:
    by_kind: dict[str, list[ProbeOutcome]] = {}
    for o in outcomes:
        by_kind.setdefault(o.probe.kind, []).append(o)

    def after(kind: str) -> float | None:
        return _fraction([o.success for o in by_kind.get(kind, [])])

    def before(kind: str) -> float | None:
        return _fraction([o.before.gives for o in by_kind.get(kind, [])])

    unrelated = by_kind.get("specificity", [])

    return Rates(
        correction=after("correction"),
        paraphrase=after("paraphrase"),
        generalization=after("generalization"),
        specificity=after("specificity"),
        specificity_kept_or_right=_fraction([o.kept_or_right for o in unrelated]),
        specificity_right=_fraction([o.after.gives for o in unrelated]),
        specificity_right_kept=_fraction([o.after.gives for o in unrelated if o.before.gives]),
        correction_before=before("correction"),
        paraphrase_before=before("paraphrase"),
        generalization_before=before("generalization"),
        specificity_right_before=before("specificity"),
        event_before=event_rate(outcomes, "before"),
        event_after=event_rate(outcomes, "after"),
    )


def event_rate(outcomes: Sequence[ProbeOutcome], when: str) -> float | None:
    """The paper's event metric on corrections: p(answer) > p(the model's pre-patch answer)."""
    readings = [getattr(o, when) for o in outcomes if o.probe.kind == "correction" and o.probe.rival]
    if not readings:
        return None
    return sum(r.logp_answer > r.logp_rival for r in readings) / len(readings)
