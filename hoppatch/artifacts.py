"""The artifact store: where a job's published files live. A local directory by default, or any
S3-compatible object store with `HOPPATCH_ARTIFACT_URL=s3://bucket/prefix`.

Both stores are atomic for readers: a local file is written under a temporary name and renamed, an S3 object
appears whole when its upload completes. Each artifact's sha256 is computed while it is stored and recorded
in the job's result (and, on S3, in the object's metadata).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from abc import ABC, abstractmethod
from urllib.parse import urlsplit

from hoppatch.jobs import Artifact, JobStore
from hoppatch.settings import Settings

_MEDIA_TYPES = {
    ".safetensors": "application/octet-stream", ".json": "application/json", ".png": "image/png", ".html": "text/html; charset=utf-8",
}
CHUNK_BYTES = 1 << 20


def media_type(name: str) -> str:
    suffix = Path(name).suffix
    return _MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _staged_files(staging: Path) -> list[tuple[str, Path]]:
    return [(p.relative_to(staging).as_posix(), p) for p in sorted(staging.rglob("*")) if p.is_file()]


class ArtifactStore(ABC):
    @abstractmethod
    def put(self, job_id: str, staging: Path) -> list[Artifact]:
        """Store every file under `staging` (names relative to it) for a job; return what was stored."""

    @abstractmethod
    def chunks(self, job_id: str, name: str) -> Iterator[bytes] | None:
        """An artifact's bytes in chunks, or None where the job has no such artifact."""

    @abstractmethod
    def read(self, job_id: str, name: str) -> bytes | None:
        """A small artifact's bytes, or None."""

    @abstractmethod
    def download_url(self, job_id: str, name: str) -> str | None:
        """A short-lived URL a client may fetch the artifact from directly, or None to stream it."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """Remove every file of a job (nothing where there is none)."""

    @abstractmethod
    def job_ids(self) -> list[str]:
        """Every job that has files stored."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts under `root/<job id>/<name>`; the API and the workers must share the directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, job_id: str, staging: Path) -> list[Artifact]:
        stored = []
        for name, source in _staged_files(staging):
            target = self.root / job_id / name
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.partial")
            digest = hashlib.sha256()
            with source.open("rb") as src, temporary.open("wb") as dst:
                for block in iter(lambda: src.read(CHUNK_BYTES), b""):
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

    def chunks(self, job_id: str, name: str) -> Iterator[bytes] | None:
        path = self.path(job_id, name)
        if path is None:
            return None

        def read_chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                yield from iter(lambda: f.read(CHUNK_BYTES), b"")

        return read_chunks()

    def read(self, job_id: str, name: str) -> bytes | None:
        path = self.path(job_id, name)
        return path.read_bytes() if path else None

    def download_url(self, job_id: str, name: str) -> str | None:
        return None

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def job_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("job_")]


class S3ArtifactStore(ArtifactStore):
    """Artifacts as objects `<prefix>/<job id>/<name>` in a bucket of any S3-compatible store.

    The endpoint, region and credentials come from boto3's usual environment (`AWS_ENDPOINT_URL_S3`,
    `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …). With `presign_seconds` above 0, downloads redirect to a presigned URL
    that long; otherwise the API streams them.
    """

    def __init__(self, url: str, presign_seconds: int = 0):
        import boto3  # only a deployment that stores on S3 pays for importing it
        from botocore.config import Config

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"HOPPATCH_ARTIFACT_URL must look like s3://bucket/prefix, not {url!r}")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.presign_seconds = presign_seconds
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        self.client = boto3.client("s3", config=config)

    def _key(self, job_id: str, name: str = "") -> str:
        return "/".join(part for part in (self.prefix, job_id, name) if part)

    def put(self, job_id: str, staging: Path) -> list[Artifact]:
        stored = []
        for name, source in _staged_files(staging):
            sha256, kind = file_sha256(source), media_type(name)
            self.client.upload_file(
                str(source), self.bucket, self._key(job_id, name),
                ExtraArgs={"ContentType": kind, "Metadata": {"sha256": sha256}},
            )
            stored.append(Artifact(name, source.stat().st_size, sha256, kind))
        return stored

    def _get(self, job_id: str, name: str):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(job_id, name))
        except self.client.exceptions.NoSuchKey:
            return None

    def chunks(self, job_id: str, name: str) -> Iterator[bytes] | None:
        response = self._get(job_id, name)
        return None if response is None else response["Body"].iter_chunks(CHUNK_BYTES)

    def read(self, job_id: str, name: str) -> bytes | None:
        response = self._get(job_id, name)
        return None if response is None else response["Body"].read()

    def download_url(self, job_id: str, name: str) -> str | None:
        if self.presign_seconds <= 0:
            return None
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(job_id, name)}, ExpiresIn=self.presign_seconds
        )

    def delete(self, job_id: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(job_id) + "/"):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def job_ids(self) -> list[str]:
        # Every key, not the delimited listing: some S3-compatible stores (SeaweedFS) list a deleted job's
        # emptied folders as common prefixes.
        base = self.prefix + "/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        found: set[str] = set()
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for item in page.get("Contents", []):
                job_id = item["Key"][len(base):].split("/", 1)[0]
                if job_id.startswith("job_"):
                    found.add(job_id)
        return sorted(found)


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The S3 store where `HOPPATCH_ARTIFACT_URL` names one, else the local directory."""
    if settings.artifact_url:
        return S3ArtifactStore(settings.artifact_url, settings.artifact_presign_seconds)
    return LocalArtifactStore(settings.artifact_dir)


def sweep_artifacts(store: JobStore, artifacts: ArtifactStore) -> list[str]:
    """Delete the files of every job whose record has expired; returns their ids."""
    job_ids = artifacts.job_ids()
    swept = [job_id for job_id, exists in zip(job_ids, store.existing(job_ids)) if not exists]
    for job_id in swept:
        artifacts.delete(job_id)
    return swept
