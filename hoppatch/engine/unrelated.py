"""What a patch must leave alone: the shipped unrelated prompts, and counterfactual queries made from them.

A counterfactual is the patched query with one part swapped for an unrelated one, so it shares the query's
wording but not its facts. Two kinds, half of each per example:
- the first-hop description swapped ("the country that Ellie Kemper is a citizen of" → "the capital of
  Lithuania"): the same second hop through other bridges;
- the named subject swapped ("Ellie Kemper" → "Winston Churchill"): the same two relations, other people.
  Unrelated queries of the query's own template moved with the patch until these were kept.
"""

from __future__ import annotations

import random
from functools import cache
from importlib.resources import files

from hoppatch.spec import TwoHopExample

COUNTERFACTUALS_PER_EXAMPLE = 48
"""Counterfactual queries made per example, at most (bench/README.md has the measurement that chose it)."""

_NAME_JOINERS = frozenset({"of", "the", "de", "van", "von", "la", "le", "du", "del", "da", "and", "&", "bin", "al", "y"})
"""Lower-case words that may sit inside a name ("Francis de Sales", "Brienne of Tarth")."""


@cache
def preserve_prompts() -> tuple[str, ...]:
    """The shipped unrelated cloze prompts whose attention outputs a patch is solved to keep."""
    text = files("hoppatch.engine").joinpath("data/preserve_prompts.txt").read_text(encoding="utf-8")
    return tuple(line.replace("\\n", "\n") for line in text.splitlines() if line and not line.startswith("#"))


@cache
def first_hop_descriptions() -> tuple[str, ...]:
    """Descriptions of entities ("The capital of Lithuania") taken from the shipped single-hop clozes."""
    return tuple(p[: -len(" is")] for p in preserve_prompts() if p.endswith(" is") and "\n" not in p)


def named_subject(prompt: str) -> str | None:
    """The longest run of capitalised words after the first word ("Ellie Kemper" in "The country that Ellie
    Kemper is a citizen of is"); None when there is none ("The country that baseball was created in is")."""
    words = prompt.split()
    capitalised = [w[:1].isupper() or w[:1].isdigit() for w in words]
    best, i = None, 1
    while i < len(words):
        if not capitalised[i]:
            i += 1
            continue
        j = i + 1
        while j < len(words) and (capitalised[j] or (words[j] in _NAME_JOINERS and j + 1 < len(words) and capitalised[j + 1])):
            j += 1
        name = " ".join(words[i:j])
        if best is None or len(name) > len(best):
            best = name
        i = j
    return best


@cache
def named_subjects() -> tuple[str, ...]:
    """The named subjects of the shipped single-hop clozes: people, places, works, companies."""
    return tuple(sorted({s for p in preserve_prompts() if "\n" not in p for s in [named_subject(p)] if s}))


def _swap(query: str, part: str, others: list[str], count: int, seed: str, lower_first: bool) -> list[str]:
    at = query.lower().find(part.lower())
    if at < 0 or not part:
        return []
    picks = random.Random(seed).sample(others, min(count, len(others)))
    fit = (lambda s: s[:1].lower() + s[1:]) if lower_first and at > 0 else (lambda s: s)
    return [query[:at] + fit(s) + query[at + len(part) :] for s in picks]


def counterfactual_queries(example: TwoHopExample, count: int = COUNTERFACTUALS_PER_EXAMPLE) -> list[str]:
    """Up to `count` queries like the example's own with its subject or its first-hop description swapped."""
    subject = named_subject(example.hop1.prompt)
    by_subject = []
    if subject and subject in example.query:
        others = [s for s in named_subjects() if s.lower() != subject.lower()]
        by_subject = _swap(example.query, subject, others, count // 2, example.id + "/subject", lower_first=False)
    description = example.hop1.prompt.strip().removesuffix(" is")
    others = [d for d in first_hop_descriptions() if d.lower() != description.lower()]
    by_description = _swap(example.query, description, others, count - len(by_subject), example.id, lower_first=True)
    return by_subject + by_description
