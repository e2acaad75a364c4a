"""Build the dev set from ../shared/data/mquake-2hop and split its compositional failures into tune and validation.

    .venv/bin/python bench/dataset.py [--model builtin:gemma-3-270m] [--data ../shared/data/mquake-2hop]

Two sources of two-hop cases:
- the `*.suf` edit requests (with their `.irre` twins for specificity), through `hoppatch.mquake`;
- every generalization cloze of `MQuAKE-CF-3k.2hop.edit.json` whose wording holds its case's first-hop
  description: its bridge is the case's `subj`, its guide the cloze with the description replaced by the
  bridge, its paraphrase the aligned generalization question in the one-shot Q/A form of the `*.suf` files,
  its generalization probes the case's other clozes, its specificity probes the case's irrelevant clozes
  and questions.

The model diagnoses every case (with the shipped preamble); the compositional failures are split by the
first hop's named subject (sha1, even/odd), so cases that share a subject, and so a bridge, stay in one half.
Writes bench/results/dev-{all,tune,validation}.json (hoppatch.examples/v1) and prints the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hoppatch.mquake import example_id, import_mquake  # noqa: E402
from hoppatch.spec import MAX_QUERIES, Hop, LabeledQuery, TwoHopExample, read_preamble  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mquake-2hop"
ONE_SHOT = "Q: Who is the prime minister of Canada?\nA: Justin Trudeau\nQ: {}\nA:"
"""The `*.suf` files' question format."""


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _replace(text: str, part: str, by: str) -> str | None:
    at = text.lower().find(part.lower())
    return None if at < 0 else text[:at] + by + text[at + len(part) :]


def generalization_cases(data: Path) -> list[TwoHopExample]:
    """Two-hop cases made from the generalization clozes that run through a known first hop."""
    clozes = json.loads((data / "comp_cloze_suffix.json").read_text(encoding="utf-8"))
    edits = json.loads((data / "MQuAKE-CF-3k.2hop.edit.json").read_text(encoding="utf-8"))
    cases = []
    for cloze, edit in zip(clozes, edits, strict=True):
        assert cloze["questions"] == edit["questions"], "comp_cloze_suffix and the edit file do not line up"
        description, bridge = cloze["subj_hop1"], cloze["subj"]
        queries = [(_cap(q), a, qq) for q, a, qq in zip(edit["generalization clozes"], edit["generalization answers"], edit["generalization questions"])]
        specificity = [LabeledQuery(_cap(q), a) for q, a in zip(edit["irrelevant clozes"], edit["irrelevant answers"])]
        specificity += [LabeledQuery(ONE_SHOT.format(q), a) for q, a in zip(edit["irrelevant questions"], edit["irrelevant answers"])]
        for query, answer, question in queries:
            guide = _replace(query, description, bridge)
            if guide is None:
                continue
            others = [LabeledQuery(q, a) for q, a, _ in queries if q != query]
            others += [LabeledQuery(ONE_SHOT.format(qq), a) for q, a, qq in queries if q != query]
            cases.append(
                TwoHopExample(
                    id=example_id(query),
                    query=query,
                    answer=answer,
                    hop1=Hop(_cap(description) + " is", bridge),
                    hop2=Hop(_cap(guide), answer),
                    paraphrases=[ONE_SHOT.format(question)],
                    generalization=others[:MAX_QUERIES],
                    specificity=specificity[:MAX_QUERIES],
                )
            )
    return cases


def all_cases(data: Path) -> list[TwoHopExample]:
    files = sorted(str(p) for p in data.glob("*.suf*.json"))
    merged: dict[str, TwoHopExample] = {ex.query: ex for ex in import_mquake(*files)}
    for ex in generalization_cases(data):
        merged.setdefault(ex.query, ex)
    return list(merged.values())


def case_prompts(example: TwoHopExample) -> set[str]:
    return {
        example.query, example.hop1.prompt, example.hop2.prompt, *example.paraphrases,
        *(q.prompt for q in example.generalization), *(q.prompt for q in example.specificity),
    }


def shipped_overlap(cases: list[TwoHopExample]) -> set[str]:
    """Shipped preserve prompts that are also a prompt of some dev case (there must be none)."""
    from hoppatch.engine.unrelated import preserve_prompts

    prompts = {p.lower() for ex in cases for p in case_prompts(ex)}
    return {p for p in preserve_prompts() if p.lower() in prompts}


def split_key(example: TwoHopExample) -> str:
    """The first hop's named subject, else its whole prompt: what keeps cases through one bridge together."""
    from hoppatch.engine.unrelated import named_subject

    return (named_subject(example.hop1.prompt) or example.hop1.prompt).lower()


def half(example: TwoHopExample) -> str:
    return "tune" if int(hashlib.sha1(split_key(example).encode()).hexdigest(), 16) % 2 == 0 else "validation"


def write(path: Path, examples: list[TwoHopExample]) -> None:
    import msgspec

    document = {"schema": "hoppatch.examples/v1", "examples": msgspec.to_builtins(examples)}
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--preamble-file", default=str(ROOT / "examples" / "preamble.txt"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    from hoppatch.engine.diagnose import diagnose
    from hoppatch.engine.models import load_model

    cases = all_cases(args.data)
    leaked = shipped_overlap(cases)
    if leaked:
        sys.exit(f"{len(leaked)} shipped preserve prompts are prompts of the dev cases, e.g. {sorted(leaked)[:3]}")
    lm = load_model(args.model)
    preamble = read_preamble(args.preamble_file)
    diagnoses = diagnose(lm, cases, preamble)
    failures = [ex for ex, d in zip(cases, diagnoses) if d.patchable]
    halves = {"tune": [ex for ex in failures if half(ex) == "tune"], "validation": [ex for ex in failures if half(ex) == "validation"]}
    stem = args.model.removeprefix("builtin:")
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / f"{stem}-all.json", cases)
    for name, examples in halves.items():
        write(args.out / f"{stem}-{name}.json", examples)
    verdicts = Counter(d.verdict.value for d in diagnoses)
    print(f"{len(cases)} cases for {args.model}: {dict(verdicts)}")
    for name, examples in halves.items():
        subjects = len({split_key(ex) for ex in examples})
        print(f"{name:<10} {len(examples):>4} compositional failures, {subjects} first-hop subjects -> {args.out / f'{stem}-{name}.json'}")


if __name__ == "__main__":
    main()
