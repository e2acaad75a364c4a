"""`hoppatch submit`: the CI client. Posts a job, waits with progress, gates on metrics, downloads artifacts.

Exit codes: 0 the job succeeded and met every threshold; 1 it failed, was cancelled, or missed a threshold;
2 bad input (a file, a threshold, a rejected job); 3 the server could not be reached or answered 5xx.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from .spec import ExamplesError, JobSpec, read_examples, read_preamble

OK, FAILED, BAD_INPUT, SERVER_ERROR = 0, 1, 2, 3
RETRIES = 5
"""Tries of a call answered 429 or 503 with Retry-After."""
MAX_RETRY_WAIT = 120
"""A longer Retry-After is not waited for: the call fails (exit 3 from `hoppatch submit`)."""
METRIC_NAMES = ("correction", "paraphrase", "generalization", "specificity", "specificity_kept_or_right", "specificity_right_kept")


class ClientError(Exception):
    """A call that did not go as asked; `code` is the exit code `hoppatch submit` gives for it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _say(message: str) -> None:
    print(f"hoppatch: {message}", file=sys.stderr)


def parse_thresholds(items: list[str]) -> dict[str, float]:
    thresholds = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in METRIC_NAMES:
            raise ClientError(BAD_INPUT, f"--fail-under {item!r}: metric must be one of {', '.join(METRIC_NAMES)}")
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise ClientError(BAD_INPUT, f"--fail-under {item!r}: expected NAME=NUMBER") from None
    return thresholds


ProgressFn = Callable[[dict], None]
"""Called with the job document each time it is polled while waiting."""


class Client:
    """The hoppatch API from Python: submit a job, wait for it, download its artifacts.

    >>> with Client("http://127.0.0.1:8000", api_key=KEY) as client:
    ...     job = client.wait(client.submit(JobSpec(model="builtin:gemma-3-270m", examples=examples)))
    ...     client.download(job, Path("artifacts"))
    """

    def __init__(self, server: str, api_key: str | None = None, timeout: float = 60.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        """One API call. A 429 or 503 that says `Retry-After` (a quota, Redis out of reach) is retried after
        that wait, up to `RETRIES` times; `submit` sends an Idempotency-Key, so a retried POST makes one job."""
        for _ in range(RETRIES):
            response = self._send(method, url, **kwargs)
            wait = response.headers.get("Retry-After") if response.status_code in (429, 503) else None
            if wait is None or not wait.isdigit() or int(wait) > MAX_RETRY_WAIT:
                break
            time.sleep(int(wait))
        return self._checked(method, url, response)

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(SERVER_ERROR, f"cannot reach the server: {exc}") from None

    @staticmethod
    def _checked(method: str, url: str, response: httpx.Response) -> httpx.Response:
        """The response, or a ClientError: bad input for a refusal, a server error for what waiting may fix."""
        status = response.status_code
        if status >= 500 and "Retry-After" not in response.headers:
            raise ClientError(SERVER_ERROR, f"server error {status} on {method} {url}")
        if status >= 400:
            try:
                problem = response.json()
                detail = problem.get("detail") or problem.get("title")
            except ValueError:
                detail = response.text[:200]
            busy = status >= 500 or (status == 429 and "Retry-After" in response.headers)
            raise ClientError(SERVER_ERROR if busy else BAD_INPUT, f"{method} {url}: {status} {detail}")
        return response

    def submit(self, spec: JobSpec | dict, idempotency_key: str | None = None) -> dict:
        """POST the job; returns the job document (status `queued`)."""
        body = msgspec.to_builtins(spec) if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key or f"hoppatch-client-{uuid.uuid4().hex}"}
        return self.request("POST", "/v1/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job: dict, timeout: float = 3600.0, on_progress: ProgressFn | None = None) -> dict:
        """Poll until the job has ended; returns its final document."""
        deadline = time.monotonic() + timeout
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise ClientError(FAILED, f"job {job['id']} still {job['status']} after {timeout:.0f} s")
            time.sleep(0.5)
            job = self.request("GET", job["urls"]["self"]).json()
            if on_progress:
                on_progress(job)
        return job

    def download(self, job: dict, target: Path) -> list[Path]:
        """Every artifact of a succeeded job under `target`, each checked against its sha256."""
        root = target.resolve()
        written = []
        for artifact in self.request("GET", job["urls"]["artifacts"]).json()["data"]:
            path = (root / artifact["name"]).resolve()
            if not path.is_relative_to(root):
                raise ClientError(SERVER_ERROR, f"artifact name {artifact['name']!r} points outside {target}")
            response = self.request("GET", f"{job['urls']['artifacts']}/{artifact['name']}")
            if response.status_code == 307:  # a presigned URL of the object store: fetched without our key
                response = httpx.get(response.headers["location"], timeout=self._http.timeout)
                response.raise_for_status()
            if hashlib.sha256(response.content).hexdigest() != artifact["sha256"]:
                raise ClientError(SERVER_ERROR, f"artifact {artifact['name']}: sha256 does not match")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(response.content)
            written.append(path)
        return written


def _progress_printer(interactive: bool) -> ProgressFn:
    """A bar on a terminal, one plain line per change otherwise (CI logs)."""
    last: list[str] = []

    def show(job: dict) -> None:
        progress = job["progress"]
        message = f"{job['status']:<10} {progress['fraction'] * 100:5.1f}%  {progress['message']}"
        if interactive:
            width = 30
            filled = int(progress["fraction"] * width)
            end = "\n" if job["status"] in ("succeeded", "failed", "cancelled") else ""
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {message[:90]:<90}", end=end, file=sys.stderr, flush=True)
        elif message not in last[-1:]:
            print(message, file=sys.stderr, flush=True)
            last.append(message)

    return show


@dataclass(frozen=True)
class SubmitRequest:
    """The job `hoppatch submit` sends, read from the user's files."""

    model: str
    examples_path: Path
    preamble_file: Path | None = None
    max_layers: int | None = None
    base_patches: tuple[str, ...] = ()

    def body(self) -> dict:
        """The request body; a file that cannot be read or parsed is bad input."""
        try:
            examples = read_examples(self.examples_path)
            preamble = read_preamble(self.preamble_file) if self.preamble_file else ""
        except (ExamplesError, OSError) as exc:
            raise ClientError(BAD_INPUT, str(exc)) from None
        body: dict = {"model": self.model, "examples": msgspec.to_builtins(examples), "preamble": preamble}
        if self.max_layers:
            body["budget"] = {"max_layers": self.max_layers}
        if self.base_patches:
            body["base_patches"] = list(self.base_patches)
        return body


@dataclass(frozen=True)
class SubmitGate:
    """What `hoppatch submit` does once the job is in: wait, download, and the conditions it exits 1 on."""

    wait: bool = False
    fail_under: tuple[str, ...] = ()
    download: Path | None = None
    json_output: bool = False
    fail_on_regression: bool = False
    timeout: float = 3600.0

    @property
    def waits(self) -> bool:
        return bool(self.wait or self.fail_under or self.download or self.fail_on_regression)


def run_submit(server: str, api_key: str | None, request: SubmitRequest, gate: SubmitGate) -> int:
    """Send `request` to `server`, then do what `gate` says; returns the exit code, and says why in one line."""
    try:
        thresholds = parse_thresholds(list(gate.fail_under))
        body = request.body()
        with Client(server, api_key) as client:
            job = client.submit(body)
            print(job["id"], flush=True)
            if not gate.waits:
                return OK
            job = client.wait(job, gate.timeout, _progress_printer(sys.stderr.isatty()))
            if job["status"] == "succeeded" and gate.download:
                gate.download.mkdir(parents=True, exist_ok=True)
                client.download(job, gate.download)
        summary = (job.get("result") or {}).get("summary", {})
        if gate.json_output:
            print(json.dumps({"id": job["id"], "status": job["status"], "error": job["error"], "summary": summary}, indent=2))
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            raise ClientError(FAILED, f"job {job['id']} {job['status']}: {error.get('code', '')} {error.get('message', '')}".rstrip())
        missed = [
            f"{name}_rate={summary.get(f'{name}_rate')} < {limit}"
            for name, limit in thresholds.items()
            if summary.get(f"{name}_rate") is None or summary[f"{name}_rate"] < limit
        ]
        if gate.fail_on_regression and summary.get("regressions"):
            missed.append(f"regressions={summary['regressions']} of the base patches' {summary.get('regression_probes')} probes")
        if missed:
            raise ClientError(FAILED, "patch does not hold: " + ", ".join(missed))
        return OK
    except ClientError as stop:
        _say(str(stop))
        return stop.code
