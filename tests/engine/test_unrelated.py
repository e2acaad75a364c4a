"""Counterfactual queries: the query's own wording with its subject or its first-hop description swapped."""

import pytest

from hoppatch.spec import Hop, TwoHopExample
from hoppatch.engine.unrelated import counterfactual_queries, first_hop_descriptions, named_subject, named_subjects

KEMPER = TwoHopExample(
    id="kemper",
    query="The name of the current head of state of the country that Ellie Kemper is a citizen of is",
    answer="Donald Trump",
    hop1=Hop(prompt="The country that Ellie Kemper is a citizen of is", answer="United States of America"),
    hop2=Hop(prompt="The name of the current head of state of United States of America is", answer="Donald Trump"),
)


@pytest.mark.parametrize(
    ("prompt", "subject"),
    [
        ("The country that Ellie Kemper is a citizen of is", "Ellie Kemper"),
        ("The creator of C. Auguste Dupin is", "C. Auguste Dupin"),
        ("The religion that A.K. Fazlul Huq is affiliated with is", "A.K. Fazlul Huq"),
        ("The country that Brienne of Tarth is a citizen of is", "Brienne of Tarth"),
        ("The author of Love's Labour's Lost is", "Love's Labour's Lost"),
        ("The country that baseball was created in is", None),
    ],
)
def test_named_subject(prompt, subject):
    assert named_subject(prompt) == subject


def test_counterfactuals_swap_the_subject_or_the_description():
    queries = counterfactual_queries(KEMPER, 8)
    assert len(queries) == 8 and len(set(queries)) == 8 and all("Ellie Kemper" not in q for q in queries)
    by_subject = {"The name of the current head of state of the country that " + s + " is a citizen of is" for s in named_subjects()}
    prefix = "The name of the current head of state of "
    descriptions = {prefix + d[:1].lower() + d[1:] + " is" for d in first_hop_descriptions()}
    assert all(q in by_subject or q in descriptions for q in queries)
    assert sum(q in by_subject for q in queries[:4]) == 4  # half of them, the subject swaps first
    assert all(q in descriptions for q in queries[4:])


def test_counterfactuals_without_a_named_subject_swap_descriptions_only():
    baseball = TwoHopExample(
        id="baseball",
        query="The continent that the country that baseball was created in is located in is",
        answer="North America",
        hop1=Hop(prompt="The country that baseball was created in is", answer="United States of America"),
        hop2=Hop(prompt="The continent that United States of America is located in is", answer="North America"),
    )
    queries = counterfactual_queries(baseball, 6)
    assert len(queries) == 6 and all("baseball" not in q and q.endswith(" is located in is") for q in queries)
    assert counterfactual_queries(baseball, 6) == queries  # seeded by the example: the same every job
