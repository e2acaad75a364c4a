"""Model-aware routing: which RQ queue a job waits in, and which queues a worker listens to.

With no served models configured (`HOPPATCH_SERVED_MODELS` empty) every job waits in one shared queue and
any worker takes any model: one machine, or a pool of identical workers. With served models, each model has
its own queue; a worker started with `--models` listens only to its models' queues and keeps them warm, so a
job lands on a worker that already holds its model, and a job for a model nobody serves is refused at the
door instead of waiting until it times out.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARED_QUEUE = "hoppatch"
ANY_MODEL = "any"
"""The label of the shared queue in /readyz and /metrics."""


def model_queue(model: str) -> str:
    """The queue of one served model."""
    return f"{SHARED_QUEUE}:{model}"


def rq_queue_key(queue_name: str) -> str:
    """The Redis list RQ keeps a queue's job ids in (KEDA scales a worker group on its length)."""
    return f"rq:queue:{queue_name}"


@dataclass(frozen=True)
class Routes:
    served: tuple[str, ...] = ()
    """Models that configured worker groups serve; empty: any model, through the shared queue."""

    def label_for(self, model: str) -> str | None:
        """The label of the queue a job for `model` waits in (see `queues`); None where no group serves it."""
        if not self.served:
            return ANY_MODEL
        return model if model in self.served else None

    def queue_for(self, model: str) -> str | None:
        """The queue a job for `model` waits in; None where no worker group serves it."""
        label = self.label_for(model)
        return None if label is None else self.queues()[label]

    def queues(self) -> dict[str, str]:
        """Every queue jobs may wait in, by its label: the served model, or `any` for the shared queue."""
        if not self.served:
            return {ANY_MODEL: SHARED_QUEUE}
        return {model: model_queue(model) for model in self.served}


def parse_models(value: str) -> tuple[str, ...]:
    """A comma-separated list of model references, blanks and repeats dropped, order kept."""
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
