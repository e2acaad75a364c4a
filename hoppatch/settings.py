"""Configuration from environment variables, read once per process. The README lists them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .routing import Routes, parse_models


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default_factory=lambda: _env("HOPPATCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    """Redis shared by the API and every worker."""
    artifact_dir: Path = field(default_factory=lambda: Path(_env("HOPPATCH_ARTIFACT_DIR", "./.hoppatch/artifacts")))
    """Root of the local artifact store; the API and the workers must both see it."""
    artifact_url: str = field(default_factory=lambda: _env("HOPPATCH_ARTIFACT_URL", ""))
    """`s3://bucket/prefix`: store artifacts in an S3-compatible store instead of `artifact_dir`."""
    artifact_presign_seconds: int = field(default_factory=lambda: int(_env("HOPPATCH_ARTIFACT_PRESIGN_SECONDS", "0")))
    """With S3, downloads redirect to a presigned URL valid this long; 0: the API streams them."""
    auth: bool = field(default_factory=lambda: _env("HOPPATCH_AUTH", "on") != "off")
    """API keys required; `HOPPATCH_AUTH=off` switches them off for local use, and the API says so at start."""
    model_roots: tuple[Path, ...] = field(
        default_factory=lambda: tuple(Path(p) for p in _env("HOPPATCH_MODEL_ROOTS", "").split(os.pathsep) if p)
    )
    """Directories under which local models may be named; empty: no local directories at all."""
    retention_seconds: int = field(default_factory=lambda: int(_env("HOPPATCH_RETENTION_SECONDS", str(7 * 24 * 3600))))
    """How long a finished job's record and events are kept."""
    heartbeat_timeout: float = field(default_factory=lambda: float(_env("HOPPATCH_HEARTBEAT_TIMEOUT", "30")))
    """A running job whose worker has not heartbeated for this long is failed with `worker_lost`."""
    max_examples: int = field(default_factory=lambda: int(_env("HOPPATCH_MAX_EXAMPLES", "64")))
    """Most examples one API job may carry."""
    max_body_bytes: int = field(default_factory=lambda: int(_env("HOPPATCH_MAX_BODY_BYTES", str(2 * 1024 * 1024))))
    tenant_max_active: int = field(default_factory=lambda: int(_env("HOPPATCH_TENANT_MAX_ACTIVE", "50")))
    """Jobs one tenant may have queued or running at once (429 beyond); 0: no limit."""
    tenant_rate: float = field(default_factory=lambda: float(_env("HOPPATCH_TENANT_RATE", "5")))
    """Submissions per second a tenant's token bucket refills with; 0: no limit."""
    tenant_burst: int = field(default_factory=lambda: int(_env("HOPPATCH_TENANT_BURST", "50")))
    """Submissions a tenant may make in one burst before `tenant_rate` applies."""
    queue_cap: int = field(default_factory=lambda: int(_env("HOPPATCH_QUEUE_CAP", "5000")))
    """Jobs waiting in the queue, all tenants together (429 beyond); 0: no cap."""
    tenant_max_seconds: float = field(default_factory=lambda: float(_env("HOPPATCH_TENANT_MAX_SECONDS", "1800")))
    """Ceiling on a job's `budget.max_seconds` for keys that name none of their own."""
    streams_per_tenant: int = field(default_factory=lambda: int(_env("HOPPATCH_STREAMS_PER_TENANT", "8")))
    """Open event streams one tenant may hold on one API process."""
    streams_per_process: int = field(default_factory=lambda: int(_env("HOPPATCH_STREAMS_PER_PROCESS", "256")))
    """Open event streams one API process holds, all tenants together."""
    warm_cache_bytes: int = field(default_factory=lambda: int(_env("HOPPATCH_WARM_CACHE_MIB", "1408")) << 20)
    """Bytes each warm model's caches (readings, locate rows, keys, statistics) may hold together."""
    statistics_disk_bytes: int = field(default_factory=lambda: int(_env("HOPPATCH_STATISTICS_DISK_MIB", "4096")) << 20)
    """Bytes the disk caches (preserved-key statistics, base fluency readings) may hold together; least recently
    used files go first."""
    served_models: tuple[str, ...] = field(default_factory=lambda: parse_models(_env("HOPPATCH_SERVED_MODELS", "")))
    """Models that worker groups serve, each with its own queue (see `hoppatch.routing`); empty: any model,
    one shared queue."""
    model_cache_size: int = field(default_factory=lambda: int(_env("HOPPATCH_MODEL_CACHE_SIZE", "1")))
    """Models each worker keeps warm."""
    worker_metrics_port: int = field(default_factory=lambda: int(_env("HOPPATCH_WORKER_METRICS_PORT", "9101")))
    """Port of a worker's Prometheus endpoint; 0 switches it off."""
    device: str | None = field(default_factory=lambda: os.environ.get("HOPPATCH_DEVICE") or None)
    """`cpu`, `cuda`, `cuda:1`…; default: the GPU when there is one."""

    @property
    def routes(self) -> Routes:
        return Routes(self.served_models)
