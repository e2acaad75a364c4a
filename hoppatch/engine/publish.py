"""Publish a job's outcome: delta.safetensors, adapter/, metrics.json, report.html and report/, written atomically.

Everything is written to a staging directory beside the target and renamed into place at the end, so a
reader never sees a half-written result.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
import tempfile
import time
from pathlib import Path

import msgspec

from hoppatch import __version__

from .adapter import save_adapter
from .delta import save_delta
from .evaluate import rates
from .lineage import regression_suite
from .models import LoadedModel
from .pipeline import JobOutcome
from .report import plot_example, plot_summary
from hoppatch.report_page import render as render_report

ARTIFACTS = ("delta.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.json", "report.html")
"""Files every successful job publishes, besides the plots under report/."""


DROPPED_REASON = "the full update did not correct its query; left out of the delta, counted as a failed correction"


def metrics(outcome: JobOutcome) -> dict:
    """The metrics.json document (its contract is in the README)."""
    probes = outcome.probes
    corrections = [p for p in probes if p.probe.kind == "correction"]
    deltas = [p.after.logp_answer - p.before.logp_answer for p in corrections]
    diagnosis = dict(Counter(d.verdict.value for d in outcome.diagnoses))
    edit = outcome.edit
    r = rates(probes)
    dropped = [ex.id for ex, s in zip(outcome.patched, outcome.scales or []) if s == 0]
    later = outcome.later_words
    later_words = {ex.id: later.words_of(i) for i, ex in enumerate(outcome.patched) if ex.id not in dropped} if later else {}
    summary = {
        "examples": len(outcome.diagnoses),
        "diagnosis": diagnosis,
        "patched": len(outcome.patched),
        "correction_rate": r.correction,
        "paraphrase_rate": r.paraphrase,
        "generalization_rate": r.generalization,
        "specificity_rate": r.specificity,
        "specificity_kept_or_right_rate": r.specificity_kept_or_right,
        "specificity_right_rate": r.specificity_right,
        "specificity_right_kept_rate": r.specificity_right_kept,
        "correction_rate_before": r.correction_before,
        "paraphrase_rate_before": r.paraphrase_before,
        "generalization_rate_before": r.generalization_before,
        "specificity_right_rate_before": r.specificity_right_before,
        "event_rate_before": r.event_before,
        "event_rate_after": r.event_after,
        "mean_delta_logp_answer": sum(deltas) / len(deltas) if deltas else None,
        "perplexity_before": outcome.perplexity_before,
        "perplexity_after": outcome.perplexity_after,
        "kl_drift": outcome.kl_drift,
        "layers": outcome.layers,
        "rank": max((d.rank for d in edit.deltas), default=0) if edit else 0,
        "dropped": len(dropped),
        "regressions": len(outcome.regressions),
        "regression_probes": len(outcome.regression_held),
        "relative_norms": {d.layer: round(d.relative_norm, 6) for d in edit.deltas} if edit else {},
        "seconds": {k: round(v, 4) for k, v in outcome.seconds.items()},
    }
    scales = dict(zip((ex.id for ex in outcome.patched), outcome.scales)) if outcome.scales else {}
    by_example = {ex.id: [] for ex in outcome.patched}
    for p in probes:
        by_example[p.probe.example_id].append(
            {
                "kind": p.probe.kind,
                "prompt": p.probe.prompt,
                "answer": p.probe.answer,
                "success": p.success,
                "before": _reading(p.before),
                "after": _reading(p.after),
            }
        )
    examples = []
    for ex, d in zip(outcome.spec.examples, outcome.diagnoses):
        examples.append(
            {
                "id": ex.id,
                "verdict": d.verdict.value,
                "prediction_before": d.prediction,
                "hop1": {"gives": d.hop1.gives, "p": d.hop1.p_first},
                "hop2": {"gives": d.hop2.gives, "p": d.hop2.p_first},
                "query": {"gives": d.query.gives, "p": d.query.p_first},
                "scale": scales.get(ex.id),
                "dropped_reason": DROPPED_REASON if ex.id in dropped else None,
                "later_words": later_words.get(ex.id, []),
                "probes": by_example.get(ex.id, []),
            }
        )
    located = outcome.located
    return {
        "hoppatch_version": __version__,
        "model": outcome.spec.model,
        "summary": summary,
        "examples": examples,
        "locate": {"mean_effect": located.mean_effect, "layers": located.layers} if located else None,
        "lineage": {
            "parents": _parents(outcome),
            "regressions": [
                {"parent": parent.label, "example_id": probe.example_id, "kind": probe.kind, "prompt": probe.prompt, "answer": probe.answer}
                for parent, probe in outcome.regressions
            ],
        },
    }


def _parents(outcome: JobOutcome) -> list[dict]:
    return [{"label": parent.label, "sha256": parent.sha256} for parent in outcome.parents]


def _reading(reading) -> dict:
    document = msgspec.to_builtins(reading)
    document.pop("continuation", None)  # token ids: `text` says the same for a reader
    return document


def publish(outcome: JobOutcome, lm: LoadedModel, out_dir: Path) -> dict:
    """Write the artifacts to `out_dir` (which must not exist yet, or be empty) and return the metrics."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        budget = msgspec.to_builtins(outcome.spec.budget)
        save_delta(
            staging / "delta.safetensors",
            outcome.edit.deltas,
            base_model=outcome.spec.model,
            base_hashes=outcome.base_hashes,
            conv1d=lm.arch.conv1d,
            budget=budget,
            parents=_parents(outcome),
            regression_suite=regression_suite(outcome.probes, outcome.spec.preamble),
        )
        save_adapter(staging / "adapter", outcome.edit.deltas, lm.arch, outcome.spec.model)
        report = staging / "report"
        report.mkdir()
        effects = outcome.located.effects if outcome.located else []
        for i, ex in enumerate(outcome.patched):
            plot_example(report / f"example-{ex.id}.png", ex.query, outcome.lens[ex.id], effects[i] if effects else [], outcome.layers)
        plot_summary(report / "summary.png", rates(outcome.probes))
        outcome.seconds["publish"] = time.perf_counter() - started
        document = metrics(outcome)
        (staging / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
        (staging / "report.html").write_text(render_report(document, report), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return document
