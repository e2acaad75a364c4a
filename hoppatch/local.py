"""`hoppatch edit`: the whole job on this machine, no server, with a progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hoppatch.spec import JobSpec


def run_local(spec: JobSpec, out: Path, device: str | None) -> None:
    from workers.engine.errors import EngineError, InvalidJob, ModelNotFound, UnsupportedArchitecture
    from workers.engine.models import load_model
    from workers.engine.pipeline import run_job
    from workers.engine.publish import publish

    columns = (TextColumn("{task.description:<44}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    # transient, on stderr: the bar animates on a terminal and leaves stdout to the result
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"loading {spec.model}", total=1.0)
        try:
            lm = load_model(spec.model, device=device)
            outcome = run_job(lm, spec, progress=lambda stage, done, msg: bar.update(task, completed=done, description=msg))
            bar.update(task, completed=0.8, description="writing artifacts")
            document = publish(outcome, lm, out)
        except (ModelNotFound, UnsupportedArchitecture, InvalidJob) as exc:
            typer.echo(f"hoppatch: {exc}", err=True)
            raise typer.Exit(2) from None
        except EngineError as exc:
            typer.echo(f"hoppatch: {exc.code}: {exc}", err=True)
            raise typer.Exit(1) from None
        bar.update(task, completed=1.0, description="done")
    summary = document["summary"]
    shown = {k: summary[k] for k in ("patched", "correction_rate", "paraphrase_rate", "generalization_rate", "specificity_rate", "layers")}
    typer.echo(json.dumps(shown))
    typer.echo(f"artifacts in {out}")
