"""Patches on top of patches: earlier deltas applied in order, and a check that they still hold.

A delta records the hashes of the weights it was solved against, so a chain applied in order verifies itself:
each delta checks what the ones before it left. A delta solved on top of others also records them as its
parents. Every delta carries its regression suite: its correction and paraphrase probes that held once it was
applied. A job stacked on earlier patches re-reads their suites with its own edit applied; a probe that no
longer holds is a regression.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .delta import AppliedDelta, apply_delta, read_delta, weight_sha256
from .evaluate import Probe, ProbeOutcome
from .models import LoadedModel
from .warm import WarmState

SUITE_KINDS = ("correction", "paraphrase")


@dataclass(frozen=True)
class BasePatch:
    """One earlier delta of a chain: where it came from and what it must keep doing."""

    label: str
    """The job that made it, or the file's name."""
    sha256: str
    """Of the delta file."""
    suite: tuple[Probe, ...]
    """Its regression suite; each probe's prompt includes the preamble it was asked with."""
    modules: tuple[str, ...]
    """The projections it edits."""


def regression_suite(outcomes: Sequence[ProbeOutcome], preamble: str) -> list[dict]:
    """A delta's suite, as recorded in its metadata: the correction and paraphrase probes that hold after it."""
    return [
        {"example_id": o.probe.example_id, "kind": o.probe.kind, "prompt": preamble + o.probe.prompt,
         "answer": o.probe.answer, "aliases": list(o.probe.aliases)}
        for o in outcomes if o.probe.kind in SUITE_KINDS and o.success
    ]


def read_base_patch(path: Path, label: str) -> BasePatch:
    delta = read_delta(path)
    suite = tuple(
        Probe(p["example_id"], p["kind"], p["prompt"], p["answer"], tuple(p.get("aliases", ())))
        for p in json.loads(delta.metadata.get("regression_suite", "[]"))
    )
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return BasePatch(label, digest, suite, tuple(delta.factors))


@contextmanager
def stacked(lm: LoadedModel, chain: Sequence[tuple[str, Path]]) -> Iterator[list[BasePatch]]:
    """The model with the deltas of `chain` ((label, path), oldest first) applied in order, each verified against
    the weights the ones before it left, and with a fresh warm state, since the warm caches read base weights.
    On exit the base weights and the warm state are back; every weight touched is left for the worker's
    `base_weights_intact` check."""
    if not chain:
        yield []
        return
    patches = [read_base_patch(path, label) for label, path in chain]
    base_warm = lm.warm
    touched = {f"{module}.weight" for patch in patches for module in patch.modules}
    base_warm.unverified.update({name: weight_sha256(lm.model.get_parameter(name)) for name in touched if name not in base_warm.unverified})
    applied: list[AppliedDelta] = []
    lm.warm = WarmState(base_warm.budget)
    try:
        for _, path in chain:
            applied.append(apply_delta(lm.model, path))
        yield patches
    finally:
        for delta in reversed(applied):
            delta.revert()
        # weights the stacked job edited that no base patch touched: their hash there is their base hash
        base_warm.unverified.update({k: v for k, v in lm.warm.unverified.items() if k not in base_warm.unverified})
        lm.warm = base_warm
