"""Does the model give an answer? Teacher-forced checks of answer strings, in one batched pass.

"Gives the answer" means: for some accepted wording of it, every one of its tokens is the model's greedy
next token, that is, the greedy continuation starts with it. Accepted wordings are the answer and the
aliases the user supplied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .models import LoadedModel
from .tracing import encode_ids, forward_at, greedy_tokens, layer_input, pass_overhead_tokens, resumed_at, token_batches

AroundPass = Callable[[list[int]], AbstractContextManager]
"""Given the indices of the prompts in a forward pass, a context to run that pass in."""

BATCH = 48
"""Sequences per forward pass when scoring; bounds memory on the vocabulary-sized logits."""


def answer_variants(answer: str, aliases: Sequence[str] = ()) -> list[str]:
    """Accepted wordings of an answer: the answer itself first, then the user's aliases, nothing else.

    A shorter form ("United States" for "United States of America") counts only when the user lists it.
    """
    return list(dict.fromkeys(name.strip() for name in (answer, *aliases) if name.strip()))


@dataclass(frozen=True)
class AnswerScore:
    """How a prompt answers: whether it gives an accepted wording, and how likely the main answer is."""

    gives: bool
    matched: str | None
    p_first: float  # probability of the answer's first token at the prompt's last position
    logp: float | None  # mean log-probability of the answer's tokens, teacher-forced (None: not forced)


def _split(lm: LoadedModel, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    prompt_ids = lm.tokenizer(prompt)["input_ids"]
    full = lm.tokenizer(prompt + " " + answer)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return prompt_ids, full[len(prompt_ids) :]
    return prompt_ids, lm.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class _Forced:
    greedy: bool  # every answer token is the greedy next token
    logp: float  # mean log-probability of the answer tokens
    p_first: float  # probability of the answer's first token
    top: int  # the model's greedy next token after the prompt


@torch.no_grad()
def _teacher_forced(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], around_pass: AroundPass | None = None, edited_from: int | None = None
) -> list[_Forced]:
    """Teacher-force each (prompt, answer) pair; the first answer step also gives the prompt's next-token view.

    Pairs are grouped by `token_batches`: shared prefixes (the preamble, a question template) run once,
    unless `around_pass` (called with each pass's pair indices) changes the model row by row. When it changes
    only layers from `edited_from` up, rows of a pass that repeat one pair run the layers below it once.
    """
    splits = [_split(lm, prompt, answer) for prompt, answer in pairs]
    results: dict[int, _Forced] = {}
    for chunk in token_batches([p + a for p, a in splits], BATCH, pass_overhead_tokens(lm)):
        counts = [len(splits[i][1]) for i in chunk]
        K = max(counts) + 1
        sequences = [splits[i][0] + splits[i][1] for i in chunk]
        batch = encode_ids(lm, sequences, share_prefix=around_pass is None, own_tokens=K)
        # of the last K positions, row i reads the c_i that predict its answer tokens: K-c_i-1 .. K-2
        keep = torch.zeros(len(chunk), K, dtype=torch.bool)
        for row, c in enumerate(counts):
            keep[row, K - c - 1 : K - 1] = True
        # edited from layer 0 (or not given): no layer below to share
        resume = _shared_lower_layers(lm, sequences, edited_from) if around_pass and edited_from else None
        with around_pass(chunk) if around_pass else nullcontext(), resumed_at(lm, *resume) if resume else nullcontext():
            logits = forward_at(lm, batch, keep)
        logprobs = torch.log_softmax(logits.float(), -1).split(counts)
        for row, i in enumerate(chunk):
            steps = logprobs[row]  # (c, V): step j predicts answer token j
            target = torch.tensor(splits[i][1], device=steps.device)
            token_lp = steps.gather(1, target[:, None]).squeeze(1)
            greedy = steps.argmax(-1)
            results[i] = _Forced(bool((greedy == target).all()), token_lp.mean().item(), token_lp[0].exp().item(), int(greedy[0]))
    return [results[i] for i in range(len(splits))]


def _shared_lower_layers(lm: LoadedModel, sequences: list[list[int]], layer: int) -> tuple[int, torch.Tensor] | None:
    """(layer, the residual stream entering it for every row), computed once per distinct sequence: for a pass
    whose rows repeat sequences and whose model differs from the base only from `layer` up. None when no row
    repeats."""
    distinct = list(dict.fromkeys(map(tuple, sequences)))
    if len(distinct) == len(sequences):
        return None
    # the same padded width as the whole batch, so each row's positions line up
    hidden = layer_input(lm, encode_ids(lm, distinct, share_prefix=False), layer)
    index = {seq: row for row, seq in enumerate(distinct)}
    rows = torch.tensor([index[tuple(seq)] for seq in sequences], device=hidden.device)
    return layer, hidden.index_select(0, rows)


def score_answers(
    lm: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    around_pass: AroundPass | None = None,
    edited_from: int | None = None,
) -> list[AnswerScore]:
    """Score each prompt against its accepted wordings (`answers[i]`, main answer first).

    One pass teacher-forces every main answer; it also shows each prompt's greedy next token, and only the
    other wordings that start with that token can be greedy continuations, so only those get a second pass.
    `around_pass(rows)`, if given, is entered around each pass over the prompts `rows` (indices into
    `prompts`): a way to run each prompt on its own variant of the model; `edited_from`, the lowest layer any
    variant changes, lets the rows of a pass that share a prompt run the layers below it once. Without
    `around_pass`, a (prompt, answers) pair that recurs (one bridge's second hop in many examples) is scored once.
    """
    if around_pass is None:
        pairs = [(prompt, tuple(cands)) for prompt, cands in zip(prompts, answers)]
        distinct = list(dict.fromkeys(pairs))
        if len(distinct) < len(pairs):
            scored = dict(zip(distinct, score_answers(lm, [p for p, _ in distinct], [list(c) for _, c in distinct])))
            return [scored[pair] for pair in pairs]
    main = _teacher_forced(lm, [(p, cands[0]) for p, cands in zip(prompts, answers)], around_pass, edited_from)
    second: list[tuple[int, str]] = [
        (i, cand)
        for i, cands in enumerate(answers)
        if not main[i].greedy
        for cand in cands[1:]
        if _split(lm, prompts[i], cand)[1][0] == main[i].top
    ]
    owners = [i for i, _ in second]
    around_second = (lambda rows: around_pass([owners[r] for r in rows])) if around_pass else None
    matched: dict[int, str] = {i: answers[i][0] for i, f in enumerate(main) if f.greedy}
    for (i, cand), forced in zip(second, _teacher_forced(lm, [(prompts[i], c) for i, c in second], around_second, edited_from)):
        if forced.greedy and i not in matched:
            matched[i] = cand
    return [AnswerScore(i in matched, matched.get(i), f.p_first, f.logp) for i, f in enumerate(main)]


@dataclass(frozen=True)
class Continuation:
    """A prompt's greedy continuation, first line only, and how it answers when the decoding decides that."""

    tokens: tuple[int, ...]  # at most `max_new_tokens`
    text: str
    score: AnswerScore | None  # None when no answers were given, or an answer outlasts the decoding

    @property
    def answer(self) -> str:
        """The continuation read as an answer: trailing punctuation stripped."""
        return self.text.rstrip(".,;:").strip()


def greedy_continuations(
    lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, answers: Sequence[Sequence[str]] | None = None
) -> list[Continuation]:
    """Each prompt's greedy continuation, first line only; with `answers` (accepted wordings per prompt, main
    answer first), also whether it gives one, read from the continuation itself.

    An answer is given when the greedy continuation starts with its tokens, so the decoding already decides
    every wording no longer than what was decoded (or that it leaves before the end): no teacher-forced pass.
    The main answer's first-token probability comes from the decoding's first step; `logp` stays unknown.
    """
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    eos = lm.tokenizer.eos_token_id
    wordings = [[_split(lm, prompts[i], a)[1] for a in answers[i]] for i in range(len(prompts))] if answers else None

    def first_line(row: list[int]) -> tuple[int, ...]:
        for n in range(1, len(row) + 1):
            if row[n - 1] == eos or "\n" in lm.tokenizer.decode(row[:n], skip_special_tokens=True).lstrip():
                return tuple(row[: n - 1])
        return tuple(row)

    def lines_ended(tokens: torch.Tensor) -> bool:  # only the first line is kept: more tokens change nothing
        return all(len(first_line(row)) < len(row) for row in tokens.tolist())

    out: dict[int, Continuation] = {}
    for rows in token_batches(ids, BATCH, pass_overhead_tokens(lm)):
        first: list[torch.Tensor] = []
        tokens = greedy_tokens(lm, encode_ids(lm, [ids[i] for i in rows]), max_new_tokens, done=lines_ended, first_logits=first.append)
        p_first = torch.softmax(first[0].float(), -1) if wordings else None
        for row, i in enumerate(rows):
            decoded = tokens[row].tolist()
            line = first_line(decoded)
            score = None
            if wordings:
                score = _score_from_decoding(decoded, wordings[i], float(p_first[row, wordings[i][0][0]]), answers[i])
            out[i] = Continuation(line, lm.tokenizer.decode(list(line), skip_special_tokens=True).strip(), score)
    return [out[i] for i in range(len(prompts))]


def _score_from_decoding(decoded: list[int], wordings: list[list[int]], p_first: float, names: Sequence[str]) -> AnswerScore | None:
    """Whether the decoded tokens start with one of the wordings; None when one is longer than the decoding
    and agrees with all of it (the teacher-forced pass decides those)."""
    for tokens, name in zip(wordings, names):
        if decoded[: len(tokens)] == tokens:
            return AnswerScore(True, name, p_first, None)
    if any(len(tokens) > len(decoded) and tokens[: len(decoded)] == decoded for tokens in wordings):
        return None
    return AnswerScore(False, None, p_first, None)


ANSWER_TOKENS = 4
"""Tokens decoded for a prompt's greedy answer (the model's prediction a report shows)."""


def greedy_answers(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """The model's greedy answer to each prompt: its first line, stripped of trailing punctuation."""
    return [c.answer for c in greedy_continuations(lm, prompts, max_new_tokens)]
