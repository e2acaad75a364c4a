"""Liveness and readiness, open without a key."""

from __future__ import annotations

import redis
from litestar import Controller, Request, Response, get
from litestar.openapi import ResponseSpec
from rq import Worker

from ..deps import Services
from ..metrics import read_queues
from ..schemas import Health, ModelQueue


class HealthController(Controller):
    tags = ["health"]

    @get("/healthz", operation_id="Health", sync_to_thread=False)
    def healthz(self) -> Health:
        """The API process is up."""
        return Health("ok")

    @get("/readyz", operation_id="Ready", sync_to_thread=True, responses={503: ResponseSpec(Health, description="Not ready")})
    def readyz(self, request: Request, services: Services) -> Response[Health]:
        """Redis answers and at least one worker is alive (503 otherwise); queue depth and live workers per
        served model."""
        state = request.app.state
        try:
            state.redis.ping()
            queues = read_queues(services.queues)
        except redis.RedisError:
            return Response(Health("unavailable", redis=False, workers=0), status_code=503)
        models = {label: ModelQueue(queued, workers) for label, (queued, workers) in queues.items()}
        workers = Worker.count(connection=state.redis)
        ready = workers > 0
        health = Health("ok" if ready else "no-workers", redis=True, workers=workers, models=models)
        return Response(health, status_code=200 if ready else 503)
