"""Diagnose: does the model pass hop 1, hop 2, and fail the composition? Only such cases are patched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from hoppatch.spec import TwoHopExample

from .answers import ANSWER_TOKENS, AnswerScore, answer_variants, greedy_continuations, score_answers
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
    """Classify every example: one greedy decoding of the queries, one teacher-forced pass for the hops.

    Kept warm on the model (whose base weights every job restores): a resubmitted example costs nothing.
    """
    known = lm.warm.diagnoses
    keys = [(preamble, *_facts(ex)) for ex in examples]
    todo = list({key: ex for key, ex in zip(keys, examples) if key not in known}.values())
    if todo:
        # the query's greedy answer is read anyway (the prediction); it also decides whether the query gives
        # its answer, except where an accepted wording is longer than the decoding and agrees with all of it
        queries = [preamble + ex.query for ex in todo]
        query_answers = [answer_variants(ex.answer, ex.aliases) for ex in todo]
        predictions = greedy_continuations(lm, queries, ANSWER_TOKENS, query_answers)
        undecided = [i for i, prediction in enumerate(predictions) if prediction.score is None]
        prompts = [preamble + hop.prompt for ex in todo for hop in (ex.hop1, ex.hop2)] + [queries[i] for i in undecided]
        answers = [answer_variants(hop.answer) for ex in todo for hop in (ex.hop1, ex.hop2)] + [query_answers[i] for i in undecided]
        scores = score_answers(lm, prompts, answers)
        forced = dict(zip(undecided, scores[2 * len(todo) :]))
        for i, (ex, prediction) in enumerate(zip(todo, predictions)):
            hop1, hop2 = scores[2 * i : 2 * i + 2]
            query = forced.get(i, prediction.score)
            known.put((preamble, *_facts(ex)), Diagnosis(ex.id, _verdict(hop1, hop2, query), hop1, hop2, query, prediction.answer))
    found = {key: known.get(key) for key in keys}  # each looked up once: a small cache may evict as it goes
    return [replace(found[key], example_id=ex.id) for key, ex in zip(keys, examples)]


def _facts(ex: TwoHopExample) -> tuple:
    return (ex.query, ex.answer, tuple(ex.aliases), ex.hop1.prompt, ex.hop1.answer, ex.hop2.prompt, ex.hop2.answer)
