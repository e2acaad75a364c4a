"""report.html: one self-contained page a person opens, built from metrics.json and the report's plots.

It opens with the verdict, then gives each example its diagnosis, its logit lens and causal sweep, and every
probe before and after. Plots are embedded as data: URIs and the page carries its own Content-Security-Policy
(no script, nothing fetched), so it is safe to serve and to open from disk. Every user string is escaped.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
.ok { color: #1a7f37; } .no { color: #b42318; } code { background: #f3f3f3; padding: 0 .2em; } img { max-width: 100%; }
"""

_RATES = [
    ("correction", "correction_rate", "correction_rate_before"),
    ("paraphrase", "paraphrase_rate", "paraphrase_rate_before"),
    ("generalization", "generalization_rate", "generalization_rate_before"),
    ("specificity (unchanged)", "specificity_rate", None),
    ("specificity (kept or right)", "specificity_kept_or_right_rate", None),
    ("unrelated queries answered right", "specificity_right_rate", "specificity_right_rate_before"),
    ("of those answered right before, still right", "specificity_right_kept_rate", None),
]


def render(document: dict[str, Any], report_dir: Path) -> str:
    """The page for a job's metrics document; `report_dir` holds its PNG plots."""
    s = document["summary"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        f"<title>hoppatch report: {escape(document['model'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>hoppatch report</h1><p>Model <code>{escape(document['model'])}</code>, hoppatch {escape(document['hoppatch_version'])}.</p>",
        _verdict(s, document.get("lineage") or {}, report_dir),
        '<section id="examples"><h2>Examples</h2>',
        *(_example(ex, report_dir) for ex in document["examples"]),
        "</section></body></html>",
    ]
    return "\n".join(parts)


def _lineage(lineage: dict[str, Any], s: dict[str, Any]) -> str:
    parents = lineage.get("parents") or []
    if not parents:
        return "Regressions of earlier patches: none checked (no base patches)."
    names = ", ".join(f"<code>{escape(p['label'])}</code>" for p in parents)
    text = f"Solved on top of {names}: <strong>{s['regressions']}</strong> of their {s['regression_probes']} probes no longer hold."
    rows = "".join(
        f"<tr><td>{escape(r['parent'])}</td><td>{escape(r['kind'])}</td><td>{escape(r['prompt'])}</td><td>{escape(r['answer'])}</td></tr>"
        for r in lineage.get("regressions") or []
    )
    return text + (f"</p><table id=regressions><tr><th>patch</th><th>kind</th><th>prompt</th><th>answer</th></tr>{rows}</table><p>" if rows else "")


def _verdict(s: dict[str, Any], lineage: dict[str, Any], report_dir: Path) -> str:
    rows = "".join(
        f"<tr><th>{name}</th><td>{_rate(s.get(before)) if before else '–'}</td><td>{_rate(s.get(after))}</td></tr>"
        for name, after, before in _RATES
    )
    ppl = f"{s['perplexity_before']:.3f} → {s['perplexity_after']:.3f}" if s.get("perplexity_after") else "not measured"
    return (
        '<section id="verdict"><h2>Verdict</h2>'
        f"<p><strong>{s['patched']}</strong> of {s['examples']} examples were compositional failures and patched; "
        f"<strong>{s['dropped']}</strong> dropped (the update could not correct them); layers {escape(str(s['layers']))}, "
        f"rank {s['rank']}. {_lineage(lineage, s)}</p>"
        f"<table><tr><th>rate</th><th>before</th><th>after</th></tr>{rows}</table>"
        f"<p>Perplexity on the fluency text: {ppl}; KL drift {_number(s.get('kl_drift'))}. "
        "Thresholds are the caller's: <code>hoppatch submit --fail-under correction=0.9</code> gates on these rates.</p>"
        f"{_image(report_dir / 'summary.png', 'before and after, per rate')}</section>"
    )


def _example(ex: dict[str, Any], report_dir: Path) -> str:
    diagnosis = "".join(
        f"<tr><th>{hop}</th><td>{escape(str(ex[hop]['gives']))}</td><td>{_number(ex[hop]['p'])}</td></tr>" for hop in ("hop1", "hop2", "query")
    )
    probes = "".join(
        f"<tr><td>{escape(p['kind'])}</td><td>{escape(p['prompt'])}</td><td>{escape(p['answer'])}</td>"
        f"<td>{escape(p['before'].get('text') or '')}</td><td>{escape(p['after'].get('text') or '')}</td>"
        f"<td class={'ok' if p['success'] else 'no'}>{'yes' if p['success'] else 'no'}</td></tr>"
        for p in ex["probes"]
    )
    probe_table = (
        f"<table><tr><th>kind</th><th>prompt</th><th>answer</th><th>before</th><th>after</th><th>holds</th></tr>{probes}</table>"
        if probes else "<p>Not patched: no probes.</p>"
    )
    plot = report_dir / f"example-{ex['id']}.png"
    return (
        f'<article class="example" id="example-{escape(ex["id"])}"><h3>{escape(ex["id"])}</h3>'
        f"<p>Verdict: <strong>{escape(ex['verdict'])}</strong>"
        + (f"; dropped: {escape(ex['dropped_reason'])}" if ex.get("dropped_reason") else "")
        + (f"; later words with a column of their own: {escape(', '.join(ex['later_words']))}" if ex.get("later_words") else "")
        + f"</p><h4>Diagnosis</h4><table><tr><th>prompt</th><th>gives</th><th>p</th></tr>{diagnosis}</table>"
        f"<h4>Logit lens and causal sweep</h4>{_image(plot, 'logit lens and causal sweep') if plot.exists() else '<p>No plot: not patched.</p>'}"
        f"<h4>Probes, before and after</h4>{probe_table}</article>"
    )


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
