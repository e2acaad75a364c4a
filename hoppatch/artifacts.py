"""The artifact store: where a job's published files live. Local directory by default.

`ArtifactStore` is the interface a store implements (an S3-compatible one can follow); files arrive in a
staging directory and are stored atomically: copied to a temporary name, hashed, renamed.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
from pathlib import Path
from typing import Protocol

from hoppatch.jobs import Artifact, JobStore

_MEDIA_TYPES = {
    ".safetensors": "application/octet-stream", ".json": "application/json", ".png": "image/png", ".html": "text/html; charset=utf-8",
}


def media_type(name: str) -> str:
    suffix = Path(name).suffix
    return _MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


class ArtifactStore(Protocol):
    def put(self, job_id: str, staging: Path) -> list[Artifact]:
        """Store every file under `staging` (names relative to it) for a job; return what was stored."""

    def path(self, job_id: str, name: str) -> Path | None:
        """A local path to read an artifact from, or None."""

    def delete(self, job_id: str) -> None:
        """Remove every file of a job (nothing where there is none)."""


class LocalArtifactStore:
    """Artifacts under `root/<job id>/<name>`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, job_id: str, staging: Path) -> list[Artifact]:
        target_dir = self.root / job_id
        stored = []
        for source in sorted(p for p in staging.rglob("*") if p.is_file()):
            name = source.relative_to(staging).as_posix()
            target = target_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.partial")
            digest = hashlib.sha256()
            with source.open("rb") as src, temporary.open("wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            temporary.rename(target)
            stored.append(Artifact(name, target.stat().st_size, digest.hexdigest(), media_type(name)))
        return stored

    def path(self, job_id: str, name: str) -> Path | None:
        job_dir = (self.root / job_id).resolve()
        candidate = (job_dir / name).resolve()
        if not candidate.is_relative_to(job_dir) or not candidate.is_file():
            return None
        return candidate

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)


def sweep_artifacts(store: JobStore, artifacts: LocalArtifactStore) -> list[str]:
    """Delete the files of every job whose record has expired; returns their ids."""
    if not artifacts.root.is_dir():
        return []
    job_ids = [p.name for p in artifacts.root.iterdir() if p.is_dir() and p.name.startswith("job_")]
    swept = [job_id for job_id, exists in zip(job_ids, store.existing(job_ids)) if not exists]
    for job_id in swept:
        artifacts.delete(job_id)
    return swept
