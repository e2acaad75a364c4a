"""Import the CREME/MQuAKE-derived edit-request files (`*.suf.json`, `*.suf.irre.json`) as hoppatch examples.

Field mapping: `prompt_comp`+`subject_comp` is the query, `prompt_f_hop` (answered by `subject_guide`) the
first hop, `prompt_guide`+`subject_guide` the guide (second hop), `target` the answer; paraphrase and
generalization queries carry over; an `.irre` file's irrelevant queries become specificity queries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec

from .spec import MAX_QUERIES, Hop, LabeledQuery, TwoHopExample


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def example_id(query: str) -> str:
    """A stable id for a composed query."""
    return "mq-" + hashlib.sha1(query.encode()).hexdigest()[:10]


def convert_case(case: dict) -> TwoHopExample:
    query = case["prompt_comp"].format(case["subject_comp"])
    spec_q = case.get("irrelevant queries", [])
    spec_a = case.get("irrelevant answers", [])
    return TwoHopExample(
        id=example_id(query),
        query=query,
        answer=case["target"],
        hop1=Hop(_cap(case["prompt_f_hop"]), case["subject_guide"]),
        hop2=Hop(case["prompt_guide"].format(case["subject_guide"]), case["target"]),
        paraphrases=list(case.get("paraphrase queries", []))[:MAX_QUERIES],
        generalization=[
            LabeledQuery(_cap(q), a) for q, a in zip(case.get("generalization queries", []), case.get("generalization answers", []))
        ][:MAX_QUERIES],
        specificity=[LabeledQuery(_cap(q), a) for q, a in zip(spec_q, spec_a)][:MAX_QUERIES],
    )


def import_mquake(*paths: str | Path) -> list[TwoHopExample]:
    """Read edit-request files; cases repeated across files (an `.irre` twin) are merged by query."""
    merged: dict[str, dict] = {}
    for path in paths:
        for case in json.loads(Path(path).read_text(encoding="utf-8")):
            query = case["prompt_comp"].format(case["subject_comp"])
            merged.setdefault(query, {}).update({k: v for k, v in case.items() if v})
    return [convert_case(case) for case in merged.values()]


def write_examples(examples: list[TwoHopExample], path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(examples), indent=1) + b"\n")
