"""The one dependency the handlers take: what the app built at start (store, queues, RQ's writes, artifacts,
settings).

One dependency rather than one per part: Litestar resolves several dependencies of a handler concurrently in
a task group of their own, which on the submit path cost more than the handler's own work.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar.di import Provide
from rq import Queue

from hoppatch.artifacts import ArtifactStore
from hoppatch.jobs import JobStore
from hoppatch.settings import Settings

from .jobs import CheckedModels
from .rq_writes import RQJobWrites


@dataclass(frozen=True)
class Services:
    store: JobStore
    queues: dict[str, Queue]
    """RQ's queues by label (`Routes.queues`): the shared one, or one per served model."""
    rq_writes: RQJobWrites
    artifacts: ArtifactStore
    settings: Settings
    models: CheckedModels


def services_dependency(services: Services) -> Provide:
    """The handlers' `services`: a provider without parameters, so Litestar parses nothing to call it."""

    def provide_services() -> Services:
        return services

    return Provide(provide_services, sync_to_thread=False)
