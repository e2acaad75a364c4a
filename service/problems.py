"""Every 4xx/5xx as RFC 9457 application/problem+json. The only map from error to `type`, `title`, `status`."""

from __future__ import annotations

import logging
import math
import re

import redis
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from hoppatch.spec import CROSS_FIELD_RULES

from .schemas import Problem, ProblemError

log = logging.getLogger("hoppatch.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://hoppatch.dev/problems/"


class ServiceError(Exception):
    """A domain fact the API reports; subclasses fix `status`, `slug` and `title`."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, pointer: str | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.detail = detail
        self.pointer = pointer
        self.retry_after = retry_after
        """Seconds after which the same request may succeed (sent as `Retry-After`); None: waiting will not help."""


class JobRejected(ServiceError):
    """The job body is well-formed JSON but not an acceptable job (unknown model, path outside roots…)."""

    status, slug, title = 422, "invalid-job", "The job cannot be accepted"


class ModelNotServed(ServiceError):
    """No configured worker group serves the job's model (`HOPPATCH_SERVED_MODELS`)."""

    status, slug, title = 422, "model-not-served", "No worker serves this model"


class IdempotencyConflict(ServiceError):
    """The Idempotency-Key was used before with another body."""

    status, slug, title = 422, "idempotency-key-reused", "Idempotency-Key reused with a different body"


class JobNotFound(ServiceError):
    """No such job for this tenant (another tenant's job is not found either)."""

    status, slug, title = 404, "job-not-found", "Job not found"


class ArtifactNotFound(ServiceError):
    status, slug, title = 404, "artifact-not-found", "Artifact not found"


class NoMetrics(ServiceError):
    """The job exists but has not succeeded, so it has no metrics."""

    status, slug, title = 409, "job-has-no-metrics", "The job has no metrics until it succeeds"


class NotCancellable(ServiceError):
    """The job already ended."""

    status, slug, title = 409, "job-not-cancellable", "The job has already finished"


class Unauthorized(ServiceError):
    status, slug, title = 401, "unauthorized", "A valid API key is required"


class ModelNotAllowed(ServiceError):
    """The API key is limited to other models."""

    status, slug, title = 403, "model-not-allowed", "This API key may not patch this model"


class TooManyRequests(ServiceError):
    """A quota: the tenant's active jobs, its submission rate, the queue's cap, its streams or its budget."""

    status, slug, title = 429, "too-many-requests", "Too many requests"


class ServiceUnavailable(ServiceError):
    status, slug, title = 503, "service-unavailable", "The service cannot reach its job store"


RETRY_AFTER_UNAVAILABLE = 5
"""Seconds a client is told to wait while Redis is out of reach."""


_HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "A valid API key is required"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("body-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    429: ("too-many-requests", "Too many requests"),
}

_PATH = re.compile(r"at `\$(?P<path>[^`]*)`")


def json_pointer(msgspec_path: str) -> str:
    """`$.budget.max_layers` / `$.examples[0].id` → `/budget/max_layers` / `/examples/0/id`."""
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]", msgspec_path)
    return "".join("/" + (name or index) for name, index in parts) or ""


def problem_response(status: int, slug: str, title: str, detail: str, instance: str, errors: list[ProblemError] | None = None) -> Response:
    body = Problem(type=TYPE_BASE + slug, title=title, status=status, detail=detail, instance=instance, errors=errors)
    return Response(body, status_code=status, media_type=PROBLEM_JSON)


def service_error_handler(request: Request, exc: ServiceError) -> Response:
    errors = [ProblemError(exc.pointer, exc.detail)] if exc.pointer is not None else None
    response = problem_response(exc.status, exc.slug, exc.title, exc.detail, request.url.path, errors)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


def redis_error_handler(request: Request, exc: redis.RedisError) -> Response:
    """Redis out of reach (restarting, paused, partitioned): 503 with Retry-After, never a 500."""
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    unavailable = ServiceUnavailable("the job store is unreachable; retry shortly", retry_after=RETRY_AFTER_UNAVAILABLE)
    return service_error_handler(request, unavailable)


BODY = "data"
"""The name Litestar gives the request body in its validation errors; the body is the document's root."""


def validation_handler(request: Request, exc: ValidationException) -> Response:
    errors = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        message = str(item.get("message", "")) if isinstance(item, dict) else str(item)
        if message in CROSS_FIELD_RULES:  # well-formed, each field valid: the job as a whole is refused
            rejected = JobRejected(message, CROSS_FIELD_RULES[message])
            return service_error_handler(request, rejected)
        key = str(item.get("key", "")) if isinstance(item, dict) else ""
        if key == BODY and message == repr(BODY):  # Litestar's words for a missing body
            message = "a JSON body is required"
        match = _PATH.search(message)
        pointer = json_pointer(match["path"]) if match else None
        if pointer is None and key:
            pointer = "" if key == BODY else json_pointer("$." + key)
        errors.append(ProblemError(pointer, _PATH.sub("", message).rstrip(" -")))
    detail = errors[0].detail if errors else str(exc.detail)
    return problem_response(400, "validation-error", "The request is not valid", detail, request.url.path, errors or None)


def http_error_handler(request: Request, exc: HTTPException) -> Response:
    slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
    response = problem_response(exc.status_code, slug, title, str(exc.detail), request.url.path)
    response.headers.update(exc.headers or {})  # Allow on a 405, as RFC 9110 asks
    return response


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("%s %s: internal error", request.method, request.url.path, exc_info=exc)
    return problem_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal-error", "Internal server error", "internal error", request.url.path)


def answered_status(exc: Exception) -> int:
    """The status the handlers below answer `exc` with, for code outside them that must count it (a middleware
    sees an exception raised in an outer middleware, such as authentication, before the app answers it)."""
    if isinstance(exc, ServiceError):
        return exc.status
    if isinstance(exc, redis.RedisError):
        return ServiceUnavailable.status
    if isinstance(exc, HTTPException):
        return exc.status_code
    return HTTP_500_INTERNAL_SERVER_ERROR


EXCEPTION_HANDLERS = {
    ServiceError: service_error_handler,
    redis.RedisError: redis_error_handler,
    ValidationException: validation_handler,
    HTTPException: http_error_handler,
    HTTP_500_INTERNAL_SERVER_ERROR: internal_error_handler,
}
