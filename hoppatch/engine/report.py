"""Plots for the report: per patched example its logit-lens curves and causal sweep; one summary plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from .evaluate import Rates  # noqa: E402


def plot_example(path: Path, title: str, lens, effects: list[float], layers: list[int]) -> None:
    fig, (ax_lens, ax_sweep) = plt.subplots(1, 2, figsize=(11, 3.8))
    depth = range(len(lens.bridge_prob))
    ax_lens.plot(depth, lens.bridge_prob, marker="o", label="bridge entity")
    ax_lens.plot(depth, lens.answer_prob, marker="s", label="answer")
    ax_lens.set(xlabel="residual state (0 = embeddings)", ylabel="probability (first token)", title="logit lens, query's last token")
    ax_lens.legend()
    ax_sweep.bar(range(len(effects)), effects, color=["tab:red" if l in layers else "tab:gray" for l in range(len(effects))])
    ax_sweep.axhline(0, color="black", linewidth=0.8)
    ax_sweep.set(xlabel="layer", ylabel="Δ log p(answer)", title="causal patching of attention output (edited in red)")
    fig.suptitle(title[:110].replace("$", r"\$"), fontsize=9)  # a user's text, never mathtext
    # fixed margins: `tight_layout` measures every label and costs as much as drawing the figure
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.14, top=0.84, wspace=0.22)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_summary(path: Path, rates: Rates) -> None:
    kinds = ["correction", "paraphrase", "generalization"]
    before = [getattr(rates, f"{k}_before") for k in kinds] + [None, None]
    after = [getattr(rates, k) for k in kinds] + [rates.specificity, rates.specificity_kept_or_right]
    labels = [*kinds, "specificity\n(unchanged)", "specificity\n(kept or right)"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [b or 0 for b in before], width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [a or 0 for a in after], width=0.4, label="after")
    ax.set_xticks(list(xs), labels)
    ax.set(ylim=(0, 1.05), ylabel="fraction of queries", title="patch outcome")
    ax.legend()
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
