"""Evaluate a patch: the same queries scored before and after, in one batched pass each.

Query kinds: `correction` (the composed query), `paraphrase`, `generalization` (other two-hop queries through
the same bridge, their own answers) and `specificity` (unrelated queries: kept when the greedy answer after
the patch is the one before, or has become the query's own correct answer; any other change is damage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from hoppatch.spec import TwoHopExample

from .answers import answer_variants, greedy_answers, score_answers
from .models import LoadedModel
from .tracing import encode, forward

FLUENCY_TEXT = (
    "The river rises in the hills to the north and flows south through farmland before it reaches the sea. "
    "In the spring the water is high and the fields along its banks are often flooded. "
    "Most of the towns on the river were founded as market towns, and several still hold a weekly market."
)
"""A short plain text whose perplexity shows whether a patch hurts general fluency."""


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
    logp_answer: float
    greedy: str | None = None  # specificity only
    logp_rival: float | None = None  # correction only


@dataclass(frozen=True)
class ProbeOutcome:
    probe: Probe
    before: Reading
    after: Reading

    @property
    def success(self) -> bool:
        """Correction, paraphrase, generalization: gives the answer after. Specificity: kept."""
        return self.after.gives  # for specificity: the pre-patch answer kept, or the right one given


def build_probes(examples: Sequence[TwoHopExample], predictions: dict[str, str]) -> list[Probe]:
    probes = []
    for ex in examples:
        probes.append(Probe(ex.id, "correction", ex.query, ex.answer, tuple(ex.aliases), predictions.get(ex.id)))
        probes += [Probe(ex.id, "paraphrase", p, ex.answer, tuple(ex.aliases)) for p in ex.paraphrases]
        probes += [Probe(ex.id, "generalization", q.prompt, q.answer) for q in ex.generalization]
        probes += [Probe(ex.id, "specificity", q.prompt, q.answer) for q in ex.specificity]
    return probes


def _read(lm: LoadedModel, probes: Sequence[Probe], preamble: str, kept: Sequence[str | None]) -> list[Reading]:
    """One scoring call for all probes, plus one row per correction probe for its rival answer.

    `kept[i]`, for a specificity probe, is its pre-patch greedy answer: the probe is kept when the model still
    gives it (or gives the probe's own answer).
    """
    prompts = [preamble + p.prompt for p in probes]
    answers = [([k] if k else []) + answer_variants(p.answer, p.aliases) for p, k in zip(probes, kept)]
    rivals = [i for i, p in enumerate(probes) if p.rival]
    scores = score_answers(lm, prompts + [prompts[i] for i in rivals], answers + [[probes[i].rival] for i in rivals])
    rival_logp = {i: s.logp for i, s in zip(rivals, scores[len(probes) :])}
    return [Reading(s.gives, s.p_first, s.logp, None, rival_logp.get(i)) for i, s in enumerate(scores[: len(probes)])]


def read_before(lm: LoadedModel, probes: Sequence[Probe], preamble: str) -> list[Reading]:
    """Readings of the unedited model; memoised on the warm model, whose base weights every job restores."""
    memo: dict[Probe, Reading] = lm.memo.setdefault(("before", preamble), {})
    todo = list(dict.fromkeys(p for p in probes if p not in memo))
    if todo:
        readings = _read(lm, todo, preamble, [None] * len(todo))
        spec = [i for i, p in enumerate(todo) if p.kind == "specificity"]
        greedy = dict(zip(spec, greedy_answers(lm, [preamble + todo[i].prompt for i in spec]))) if spec else {}
        for i, (probe, reading) in enumerate(zip(todo, readings)):
            memo[probe] = replace(reading, greedy=greedy.get(i))
    return [memo[p] for p in probes]


def read_after(lm: LoadedModel, probes: Sequence[Probe], before: Sequence[Reading], preamble: str) -> list[Reading]:
    """Readings of the edited model; a specificity probe `gives` when it kept its answer."""
    return _read(lm, probes, preamble, [b.greedy if p.kind == "specificity" else None for p, b in zip(probes, before)])


@torch.no_grad()
def perplexity(lm: LoadedModel, text: str = FLUENCY_TEXT) -> float:
    batch = encode(lm, [text])
    T = batch.input_ids.shape[1]
    logits = forward(lm, batch, logits_to_keep=T)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, batch.input_ids[0, 1:])
    return math.exp(nll.item())


def base_perplexity(lm: LoadedModel) -> float:
    """`perplexity` of the unedited model; memoised on the warm model, whose base weights every job restores."""
    if "perplexity" not in lm.memo:
        lm.memo["perplexity"] = perplexity(lm)
    return lm.memo["perplexity"]


def rate(outcomes: Sequence[ProbeOutcome], kind: str) -> float | None:
    """Fraction of successful probes of a kind; None where there were none."""
    chosen = [o for o in outcomes if o.probe.kind == kind]
    return sum(o.success for o in chosen) / len(chosen) if chosen else None


def event_rate(outcomes: Sequence[ProbeOutcome], when: str) -> float | None:
    """The paper's event metric on corrections: p(answer) > p(the model's pre-patch answer)."""
    readings = [getattr(o, when) for o in outcomes if o.probe.kind == "correction" and o.probe.rival]
    if not readings:
        return None
    return sum(r.logp_answer > r.logp_rival for r in readings) / len(readings)
