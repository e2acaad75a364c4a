"""`hoppatch`: edit on one machine, apply a delta, run the API or a worker, submit jobs from CI, manage keys.

This module sits in the base package, yet `serve`, `worker` and `keys` import the service and the worker:
those commands are the one place where the entry point reaches up to the layers above it.
Bad input prints one plain line to stderr and exits 2. Heavy imports (torch, Litestar) happen inside the
command that needs them, so `hoppatch submit` in a CI job stays light.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from hoppatch.spec import Budget

DEFAULT_BUDGET = Budget()

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
keys_app = typer.Typer(no_args_is_help=True, help="Create and revoke API keys (admin).")
app.add_typer(keys_app, name="keys")

EXIT_USAGE = 2
"""Bad input: a file, an option or a reference that cannot be used."""


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"hoppatch: {message}", err=True)
    raise typer.Exit(code)


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        layers: set[int] = set()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
        return sorted(layers)
    except ValueError:
        die(f"--layers {text!r}: expected numbers and ranges like 8,9 or 8-11")


@app.command()
def edit(
    model: Annotated[str, typer.Option(help="builtin:gemma-3-270m, a model directory, or a cached hub id")],
    examples: Annotated[Path, typer.Option(help="Examples: a JSON list or JSON Lines (hoppatch.examples/v1)")],
    out: Annotated[Path, typer.Option(help="Directory for the artifacts; must not exist or be empty")],
    layers: Annotated[str | None, typer.Option(help="Edit these layers (e.g. 8-11) instead of locating them")] = None,
    # the ranges are the job schema's (hoppatch.spec.Budget), checked when the spec is built
    max_layers: Annotated[int, typer.Option()] = DEFAULT_BUDGET.max_layers,
    max_rank: Annotated[int, typer.Option()] = DEFAULT_BUDGET.max_rank,
    max_relative_norm: Annotated[float, typer.Option()] = DEFAULT_BUDGET.max_relative_norm,
    max_seconds: Annotated[float, typer.Option()] = DEFAULT_BUDGET.max_seconds,
    preamble_file: Annotated[Path | None, typer.Option(help="Few-shot prefix put before every prompt")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: GPU if present)")] = None,
    base_delta: Annotated[list[Path], typer.Option(help="An earlier delta.safetensors to patch on top of (repeat, oldest first)")] = [],  # noqa: B006
) -> None:
    """Diagnose, locate, patch and evaluate on this machine, and write the artifacts to OUT."""
    import msgspec

    from hoppatch.spec import ExamplesError, JobSpec, read_examples, read_preamble

    try:
        loaded = read_examples(examples)
        preamble = read_preamble(preamble_file) if preamble_file else ""
        spec = msgspec.convert(
            {
                "model": model,
                "examples": msgspec.to_builtins(loaded),
                "budget": msgspec.to_builtins(Budget(max_layers, max_rank, max_relative_norm, max_seconds)),
                "layers": _layers(layers),
                "preamble": preamble,
            },
            JobSpec,
        )
    except (ExamplesError, msgspec.ValidationError, OSError) as exc:
        die(str(exc))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        die(f"--out {out}: exists and is not an empty directory")
    for path in base_delta:
        if not path.is_file():
            die(f"--base-delta {path}: no such file")
    from .local import run_local

    run_local(spec, out, device, [(str(path), path) for path in base_delta])


def _patched_model(model: str, deltas: list[Path]):
    """MODEL on the CPU with `deltas` applied in order, each verified against what the ones before it left."""
    from hoppatch.engine.delta import apply_delta
    from hoppatch.engine.errors import EngineError
    from hoppatch.engine.models import load_model

    for path in deltas:
        if not path.is_file():
            die(f"--delta {path}: no such file")
    try:
        lm = load_model(model, device="cpu")
        for path in deltas:
            apply_delta(lm.model, path)
    except EngineError as exc:
        die(f"{exc} (a chain is applied oldest first: the deltas a delta was solved on top of come before it)")
    return lm


def _empty_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        die(f"--out {out}: exists and is not empty")


@app.command()
def apply(
    model: Annotated[str, typer.Option(help="The base model the deltas were made for")],
    delta: Annotated[list[Path], typer.Option(help="delta.safetensors from a job; repeat for a chain, oldest first")],
    out: Annotated[Path, typer.Option(help="Directory to write the patched model to")],
) -> None:
    """Write a patched copy of MODEL; refuses a base whose touched weights do not match a delta."""
    _empty_out(out)
    lm = _patched_model(model, delta)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    typer.echo(f"patched model written to {out}")


@app.command()
def export(
    model: Annotated[str, typer.Option(help="The base model the deltas were made for")],
    delta: Annotated[list[Path], typer.Option(help="delta.safetensors from a job; repeat for a chain, oldest first")],
    out: Annotated[Path, typer.Option(help="Directory to write to")],
    merged: Annotated[bool, typer.Option(help="Write merged weights (a whole model) instead of one PEFT adapter")] = False,
) -> None:
    """Write a chain of deltas as one PEFT adapter (factors concatenated, rank summed) or as merged weights."""
    from hoppatch.engine.adapter import save_chain_adapter

    _empty_out(out)
    lm = _patched_model(model, delta)  # the chain is verified even when only the adapter is written
    if merged:
        lm.model.save_pretrained(out)
        lm.tokenizer.save_pretrained(out)
        typer.echo(f"merged weights written to {out}")
        return
    rank = save_chain_adapter(out, delta, lm.arch, model)
    typer.echo(f"PEFT adapter of rank {rank} written to {out}")


@app.command("import-mquake")
def import_mquake_cmd(
    files: Annotated[list[Path], typer.Argument(help="CREME/MQuAKE edit-request files (*.suf.json, *.suf.irre.json)")],
    out: Annotated[Path, typer.Option(help="Examples file to write")],
) -> None:
    """Convert CREME/MQuAKE-derived cases into a hoppatch examples file."""
    from hoppatch.mquake import import_mquake, write_examples

    try:
        examples = import_mquake(*files)
    except (OSError, ValueError, KeyError) as exc:
        die(f"cannot import: {exc}")
    write_examples(examples, out)
    typer.echo(f"{len(examples)} examples written to {out}")


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    processes: Annotated[int, typer.Option(min=1, help="uvicorn worker processes sharing the port")] = 1,
) -> None:
    """Run the HTTP API (Litestar on uvicorn)."""
    import uvicorn

    app = "hoppatch.service.app:create_app"
    # Requests are counted and timed in Prometheus; uvicorn's access lines sit below the warning level, and
    # switching them off skips their logger call on every response.
    uvicorn.run(app, factory=True, host=host, port=port, workers=processes, log_level="warning", access_log=False)


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty")] = False,
    preload: Annotated[str | None, typer.Option(help="Load this model before taking jobs")] = None,
    models: Annotated[str, typer.Option(help="Comma-separated models this worker serves: it loads them, then takes only their jobs (see HOPPATCH_SERVED_MODELS)")] = "",
) -> None:
    """Run one RQ worker (one per GPU: set CUDA_VISIBLE_DEVICES), keeping models warm."""
    from hoppatch.routing import parse_models
    from hoppatch.settings import Settings
    from hoppatch.workers.worker import run_worker

    settings, served = Settings(), parse_models(models)
    unrouted = [ref for ref in served if ref not in settings.served_models]
    if unrouted:
        die(f"--models {','.join(unrouted)}: not in HOPPATCH_SERVED_MODELS, so the API routes no job to its queue")
    run_worker(settings, burst=burst, preload=preload, models=served)


def _redis():
    from hoppatch.connection import connect
    from hoppatch.settings import Settings

    return connect(Settings().redis_url)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant this key acts for")],
    models: Annotated[str | None, typer.Option(help="Comma-separated model references this key may patch (default: all served)")] = None,
    max_seconds: Annotated[float | None, typer.Option(min=1, help="Ceiling on budget.max_seconds for this key's jobs")] = None,
) -> None:
    """Print a new API key on stdout (shown once; only its hash is stored) and its id on stderr."""
    from hoppatch.service.auth import create_key
    from hoppatch.spec import ModelRefError, check_model_ref

    allowed = tuple(m.strip() for m in models.split(",") if m.strip()) if models else ()
    for ref in allowed:
        try:
            check_model_ref(ref, None)
        except ModelRefError as exc:
            die(f"--models: {exc}")
    record, plaintext = create_key(_redis(), tenant, allowed, max_seconds)
    typer.echo(plaintext)
    typer.echo(f"key {record.id} for tenant {tenant!r}", err=True)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys")] = None) -> None:
    """One line per key: id, tenant, created, models, max seconds (never the key itself)."""
    from hoppatch.service.auth import list_keys

    for key in list_keys(_redis(), tenant):
        models = ",".join(key.models) or "*"
        typer.echo(f"{key.id}\t{key.tenant}\t{key.created_at:%Y-%m-%dT%H:%M:%SZ}\t{models}\t{key.max_seconds or '-'}")


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str | None, typer.Argument(help="The key to revoke (plaintext)")] = None,
    key_id: Annotated[str | None, typer.Option("--id", help="Revoke the key with this id")] = None,
    tenant: Annotated[str | None, typer.Option(help="Revoke every key of this tenant")] = None,
) -> None:
    """Revoke a key by its plaintext, by its id, or all of a tenant's keys."""
    from hoppatch.service.auth import revoke_keys

    if [key, key_id, tenant].count(None) != 2:
        die("name exactly one of: KEY, --id, --tenant")
    revoked = revoke_keys(_redis(), key=key, key_id=key_id, tenant=tenant)
    if not revoked:
        die("no such key")
    for record in revoked:
        typer.echo(f"revoked {record.id} ({record.tenant})")


@app.command()
def submit(
    server: Annotated[str, typer.Option(help="Base URL of the API, e.g. http://127.0.0.1:8000")],
    model: Annotated[str, typer.Option()],
    examples: Annotated[Path, typer.Option()],
    preamble_file: Annotated[Path | None, typer.Option()] = None,
    max_layers: Annotated[int | None, typer.Option(min=1, max=16)] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to end, showing progress")] = False,
    fail_under: Annotated[list[str], typer.Option(help="metric=threshold, e.g. correction=0.9 (implies --wait)")] = [],  # noqa: B006
    download: Annotated[Path | None, typer.Option(help="Download the artifacts here (implies --wait)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the job summary as JSON")] = False,
    api_key: Annotated[str | None, typer.Option(envvar="HOPPATCH_API_KEY")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most")] = 3600.0,
    base_patch: Annotated[list[str], typer.Option(help="An earlier succeeded job to patch on top of (repeat, oldest first)")] = [],  # noqa: B006
    fail_on_regression: Annotated[bool, typer.Option(help="Exit 1 when a base patch's probe no longer holds (implies --wait)")] = False,
) -> None:
    """Submit a job to a hoppatch server (for CI). Exit codes: 0 ok, 1 job failed, a threshold missed or a regression
    (with --fail-on-regression), 2 bad input, 3 server error."""
    from .client import SubmitGate, SubmitRequest, run_submit

    request = SubmitRequest(model, examples, preamble_file, max_layers, tuple(base_patch))
    gate = SubmitGate(wait, tuple(fail_under), download, json_output, fail_on_regression, timeout)
    code = run_submit(server, api_key, request, gate)
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="hoppatch")


if __name__ == "__main__":
    sys.exit(main())
