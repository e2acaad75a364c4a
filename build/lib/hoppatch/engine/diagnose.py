"""Diagnose: does the model pass hop 1, hop 2, and fail the composition? Only such cases are patched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from hoppatch.spec import TwoHopExample

from .answers import AnswerScore, answer_variants, greedy_answers, score_answers
from .models import LoadedModel


class Verdict(str, Enum):
    COMPOSITIONAL_FAILURE = "compositional_failure"
    ALREADY_CORRECT = "already_correct"
    HOP1_UNKNOWN = "hop1_unknown"
    HOP2_UNKNOWN = "hop2_unknown"


@dataclass(frozen=True)
class Diagnosis:
    example_id: str
    verdict: Verdict
    hop1: AnswerScore
    hop2: AnswerScore
    query: AnswerScore
    prediction: str  # the model's greedy answer to the composed query

    @property
    def patchable(self) -> bool:
        return self.verdict is Verdict.COMPOSITIONAL_FAILURE


def _verdict(hop1: AnswerScore, hop2: AnswerScore, query: AnswerScore) -> Verdict:
    if query.gives:
        return Verdict.ALREADY_CORRECT
    if not hop1.gives:
        return Verdict.HOP1_UNKNOWN
    if not hop2.gives:
        return Verdict.HOP2_UNKNOWN
    return Verdict.COMPOSITIONAL_FAILURE


def diagnose(lm: LoadedModel, examples: Sequence[TwoHopExample], preamble: str = "") -> list[Diagnosis]:
    """Classify every example with one batched teacher-forced pass (plus one greedy pass for the queries).

    Kept warm on the model (whose base weights every job restores): a resubmitted example costs nothing.
    """
    known = lm.warm.diagnoses
    keys = [(preamble, *_facts(ex)) for ex in examples]
    todo = list({key: ex for key, ex in zip(keys, examples) if key not in known}.values())
    if todo:
        prompts, answers = [], []
        for ex in todo:
            prompts += [preamble + ex.hop1.prompt, preamble + ex.hop2.prompt, preamble + ex.query]
            answers += [answer_variants(ex.hop1.answer), answer_variants(ex.hop2.answer), answer_variants(ex.answer, ex.aliases)]
        scores = score_answers(lm, prompts, answers)
        predictions = greedy_answers(lm, [preamble + ex.query for ex in todo])
        for i, ex in enumerate(todo):
            diagnosis = Diagnosis(ex.id, _verdict(*scores[3 * i : 3 * i + 3]), *scores[3 * i : 3 * i + 3], predictions[i])
            known.put((preamble, *_facts(ex)), diagnosis)
    found = {key: known.get(key) for key in keys}  # each looked up once: a small cache may evict as it goes
    return [replace(found[key], example_id=ex.id) for key, ex in zip(keys, examples)]


def _facts(ex: TwoHopExample) -> tuple:
    return (ex.query, ex.answer, tuple(ex.aliases), ex.hop1.prompt, ex.hop1.answer, ex.hop2.prompt, ex.hop2.answer)
