"""Dependencies, provided on the app: the job store, the queue, the artifact store, the settings."""

from __future__ import annotations

from litestar.datastructures import State
from rq import Queue

from hoppatch.jobs import JobStore
from hoppatch.settings import Settings
from hoppatch.artifacts import ArtifactStore


def provide_store(state: State) -> JobStore:
    return state.store


def provide_queues(state: State) -> dict[str, Queue]:
    """RQ's queues by label (`Routes.queues`): the shared one, or one per served model."""
    return state.queues


def provide_artifacts(state: State) -> ArtifactStore:
    return state.artifacts


def provide_settings(state: State) -> Settings:
    return state.settings
