"""`hoppatch edit`: the whole job on this machine, no server: a progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hoppatch.spec import JobSpec


def _plain_progress(stage: str, fraction: float, message: str) -> None:
    print(f"{fraction * 100:5.1f}%  {message}", file=sys.stderr, flush=True)


def run_local(spec: JobSpec, out: Path, device: str | None, base_patches: list[tuple[str, Path]] = ()) -> None:
    from hoppatch.engine.errors import DeltaMismatch, EngineError, InvalidJob, ModelNotFound, UnsupportedArchitecture
    from hoppatch.engine.models import load_model
    from hoppatch.engine.pipeline import patch

    interactive = sys.stderr.isatty()
    columns = (TextColumn("{task.description:<44}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    # transient, on stderr: the bar animates on a terminal and leaves stdout to the result
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not interactive) as bar:
        task = bar.add_task(f"loading {spec.model}", total=1.0)

        def progress(stage: str, fraction: float, message: str) -> None:
            bar.update(task, completed=fraction, description=message)
            if not interactive:
                _plain_progress(stage, fraction, message)

        try:
            lm = load_model(spec.model, device=device)  # bad input fails here, before any progress line
            progress("load", 0.0, f"loaded {spec.model} in {lm.load_seconds:.1f} s")
            _, document = patch(lm, spec, out, progress=progress, base_patches=base_patches)
        except (ModelNotFound, UnsupportedArchitecture, InvalidJob, DeltaMismatch) as exc:
            typer.echo(f"hoppatch: {exc}", err=True)
            raise typer.Exit(2) from None
        except EngineError as exc:
            typer.echo(f"hoppatch: {exc.code}: {exc}", err=True)
            raise typer.Exit(1) from None
        progress("done", 1.0, "done")
    summary = document["summary"]
    shown = {
        k: summary[k]
        for k in (
            "patched", "correction_rate", "paraphrase_rate", "generalization_rate", "specificity_rate",
            "specificity_kept_or_right_rate", "specificity_right_kept_rate", "layers", "regressions",
        )
    }
    typer.echo(json.dumps(shown))
    typer.echo(f"artifacts in {out}")
