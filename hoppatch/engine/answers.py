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
from .tracing import (
    Encoded,
    encode_ids,
    forward_at,
    greedy_tokens,
    layer_input,
    pass_overhead_tokens,
    prefix_cache,
    recorded_layer_input,
    resumed_at,
    token_batches,
)

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
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    around_pass: AroundPass | None = None,
    edited_from: int | None = None,
    record: BasePasses | None = None,
    replay: BasePasses | None = None,
) -> list[_Forced]:
    """Teacher-force each (prompt, answer) pair; the first answer step also gives the prompt's next-token view.

    Pairs are grouped by `token_batches`: shared prefixes (the preamble, a question template) run once,
    unless `around_pass` (called with each pass's pair indices) changes the model row by row. When it changes
    only layers from `edited_from` up, rows of a pass that repeat one pair run the layers below it once.
    `record` and `replay` as in `score_answers`.
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
        if replay is not None and (kept := replay.forced_input(sequences)) is not None:
            resume = replay.layer, kept
        with (
            around_pass(chunk) if around_pass else nullcontext(),
            resumed_at(lm, *resume) if resume else nullcontext(),
            recorded_layer_input(lm, record.layer) if record else nullcontext() as seen,
        ):
            logits = forward_at(lm, batch, keep)
        if record:
            record.keep_forced(sequences, seen[0])
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
    *,
    record: BasePasses | None = None,
    replay: BasePasses | None = None,
) -> list[AnswerScore]:
    """Score each prompt against its accepted wordings (`answers[i]`, main answer first).

    One pass teacher-forces every main answer; it also shows each prompt's greedy next token, and only the
    other wordings that start with that token can be greedy continuations, so only those get a second pass.
    `around_pass(rows)`, if given, is entered around each pass over the prompts `rows` (indices into
    `prompts`): a way to run each prompt on its own variant of the model; `edited_from`, the lowest layer any
    variant changes, lets the rows of a pass that share a prompt run the layers below it once. Without
    `around_pass`, a (prompt, answers) pair that recurs (one bridge's second hop in many examples) is scored once.
    `record` keeps, on the unedited model, what its passes leave at one layer; `replay` starts the same passes
    at that layer on a model edited from there up (`BasePasses`).
    """
    if around_pass is None:
        pairs = [(prompt, tuple(cands)) for prompt, cands in zip(prompts, answers)]
        distinct = list(dict.fromkeys(pairs))
        if len(distinct) < len(pairs):
            scored = score_answers(lm, [p for p, _ in distinct], [list(c) for _, c in distinct], record=record, replay=replay)
            return [dict(zip(distinct, scored))[pair] for pair in pairs]
    main = _teacher_forced(lm, [(p, cands[0]) for p, cands in zip(prompts, answers)], around_pass, edited_from, record, replay)
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
    seconds = _teacher_forced(lm, [(prompts[i], c) for i, c in second], around_second, edited_from, record, replay)
    for (i, cand), forced in zip(second, seconds):
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
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    answers: Sequence[Sequence[str]] | None = None,
    *,
    record: BasePasses | None = None,
    replay: BasePasses | None = None,
) -> list[Continuation]:
    """Each prompt's greedy continuation, first line only; with `answers` (accepted wordings per prompt, main
    answer first), also whether it gives one, read from the continuation itself.

    An answer is given when the greedy continuation starts with its tokens, so the decoding already decides
    every wording no longer than what was decoded (or that it leaves before the end): no teacher-forced pass.
    The main answer's first-token probability comes from the decoding's first step; `logp` stays unknown.

    `record` keeps this decoding (on the base model) for a later `replay`; `replay` re-reads the prompts it
    kept on a model edited from its layer up (`BasePasses.replayed`), and decodes only the rest.
    """
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    wordings = [[_split(lm, prompts[i], a)[1] for a in answers[i]] for i in range(len(prompts))] if answers else None
    out = replay.replayed(lm, prompts, max_new_tokens, wordings, answers) if replay is not None else {}
    todo = [i for i in range(len(prompts)) if i not in out]

    def lines_ended(tokens: torch.Tensor) -> bool:  # only the first line is kept: more tokens change nothing
        return all(_line_end(lm, row) < len(row) for row in tokens.tolist())

    for rows in token_batches([ids[i] for i in todo], BATCH, pass_overhead_tokens(lm)) if todo else []:
        rows = [todo[r] for r in rows]
        first: list[torch.Tensor] = []
        batch = encode_ids(lm, [ids[i] for i in rows])
        with recorded_layer_input(lm, record.layer) if record else nullcontext() as seen:
            tokens = greedy_tokens(lm, batch, max_new_tokens, done=lines_ended, first_logits=first.append)
        if record:
            record.keep_decoding([prompts[i] for i in rows], [ids[i] for i in rows], batch, tokens, seen, max_new_tokens)
        p_first = torch.softmax(first[0].float(), -1) if wordings else None
        for row, i in enumerate(rows):
            decoded = tokens[row].tolist()
            score = None
            if wordings:
                score = _score_from_decoding(decoded, wordings[i], float(p_first[row, wordings[i][0][0]]), answers[i])
            out[i] = _continuation(lm, decoded, score)
    return [out[i] for i in range(len(prompts))]


def _line_end(lm: LoadedModel, row: list[int]) -> int:
    """Index of the token that ends the first line (the end of sequence, or a token with a line break in
    it), or len(row) when the line goes on past the decoding."""
    eos = lm.tokenizer.eos_token_id
    for n in range(1, len(row) + 1):
        if row[n - 1] == eos or "\n" in lm.tokenizer.decode(row[:n], skip_special_tokens=True).lstrip():
            return n - 1
    return len(row)


def _continuation(lm: LoadedModel, decoded: list[int], score: AnswerScore | None) -> Continuation:
    line = tuple(decoded[: _line_end(lm, decoded)])
    return Continuation(line, lm.tokenizer.decode(list(line), skip_special_tokens=True).strip(), score)


REPLAY_MARGIN = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}
"""How far (in logits) the replayed greedy token must lead the runner-up to count as the decoding's own: a
replay runs the layers in other shapes than the decoding did, so a near tie is decoded again instead."""


@dataclass
class _TracedBatch:
    prompts: list[str]
    ids: list[list[int]]  # the prompts' tokens
    replay: Encoded  # own tokens: each prompt, left-padded, then every decoded token but the last
    decoded: torch.Tensor  # (B, s)
    hidden: torch.Tensor  # (B, T + s - 1, D): the residual stream entering `BasePasses.layer` there
    max_new_tokens: int  # what the decoding was asked for (it may have stopped sooner)


class BasePasses:
    """What the unedited model's passes left at the input of `layer`, kept so that a model edited only from
    `layer` up re-reads the same prompts without running the layers below it.

    - A teacher-forced pass over the same batch resumes at `layer` from the kept residual stream: the same
      arithmetic, so the same scores.
    - A greedy decoding becomes one teacher-forced pass over the base's decoded tokens: the edited model's
      continuation starts like the base's for as long as its argmax picks those tokens again. Rows where it
      does not (or only by a near tie) are decoded anew.
    """

    def __init__(self, layer: int):
        self.layer = layer
        self._batches: list[_TracedBatch] = []
        self._forced: dict[tuple[tuple[int, ...], ...], torch.Tensor] = {}

    def keep_forced(self, sequences: Sequence[Sequence[int]], hidden: torch.Tensor) -> None:
        self._forced[tuple(map(tuple, sequences))] = hidden

    def forced_input(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """The kept input to `layer` of a teacher-forced pass over exactly these sequences, if one was made."""
        return self._forced.get(tuple(map(tuple, sequences)))

    def keep_decoding(
        self, prompts: list[str], ids: list[list[int]], batch: Encoded, tokens: torch.Tensor, seen: list[torch.Tensor],
        max_new_tokens: int,
    ) -> None:
        """Keep one decoded batch: `seen`, the residual stream entering `layer` in each of its passes."""
        fed = tokens[:, :-1]  # the last token decoded was never fed back
        replay = Encoded(
            torch.cat([batch.input_ids, fed], dim=1),
            torch.cat([batch.attention_mask, torch.ones_like(fed)], dim=1),
        )
        self._batches.append(_TracedBatch(prompts, ids, replay, tokens, torch.cat(seen, dim=1), max_new_tokens))

    def replayed(
        self, lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, wordings: list[list[list[int]]] | None,
        answers: Sequence[Sequence[str]] | None,
    ) -> dict[int, Continuation]:
        """{index into `prompts`: its continuation on the model as it is now}, for the prompts kept here that
        the replay decides; the others are left to the caller to decode."""
        wanted: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            wanted.setdefault(prompt, []).append(i)
        out: dict[int, Continuation] = {}
        for traced in self._batches:
            if traced.max_new_tokens != max_new_tokens or not any(p in wanted for p in traced.prompts):
                continue
            steps = self._replay(lm, traced)  # (B, s, V)
            for row, prompt in enumerate(traced.prompts):
                for i in wanted.get(prompt, []):
                    continuation = self._decided(lm, traced.decoded[row].tolist(), steps[row], wordings[i] if wordings else None,
                                                 answers[i] if answers else None)
                    if continuation is not None:
                        out[i] = continuation
        return out

    def _replay(self, lm: LoadedModel, traced: _TracedBatch) -> torch.Tensor:
        """The edited model's logits at each decoded step, teacher-forced, from `layer` up: (B, s, V)."""
        s = traced.decoded.shape[1]
        own = traced.replay.input_ids.shape[1]
        shared = traced.replay.attention_mask.shape[1] - own
        # the shared prefix's keys and values above `layer` change with the edit: run it again on this model
        cache = prefix_cache(lm, traced.ids[0][:shared]) if shared else None
        batch = Encoded(traced.replay.input_ids, traced.replay.attention_mask, cache)
        keep = torch.ones(len(traced.prompts), s, dtype=torch.bool)
        with resumed_at(lm, self.layer, traced.hidden):
            return forward_at(lm, batch, keep).float().view(len(traced.prompts), s, -1)

    def _decided(
        self, lm: LoadedModel, decoded: list[int], logits: torch.Tensor, wordings: list[list[int]] | None,
        names: Sequence[str] | None,
    ) -> Continuation | None:
        """The continuation when the replay picks the base's tokens through its first line's end, each by a
        clear margin, and that decides the answer; else None."""
        checked = min(_line_end(lm, decoded) + 1, len(decoded))  # the line's tokens and the token that ends it
        top = logits[:checked].topk(2, dim=-1)
        picked = top.indices[:, 0].tolist() == decoded[:checked]
        clear = bool((top.values[:, 0] - top.values[:, 1] > REPLAY_MARGIN.get(lm.model.dtype, 0.5)).all())
        if not (picked and clear):
            return None
        score = None
        if wordings:
            p_first = float(torch.softmax(logits[0], -1)[wordings[0][0]])
            score = _score_from_decoding(decoded[:checked], wordings, p_first, names)
            if score is None:  # an answer outlasts what the replay vouches for
                return None
        return _continuation(lm, decoded[:checked], score)


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
