"""`hoppatch submit`: the CI client. Posts a job, waits with progress, gates on metrics, downloads artifacts.

Exit codes: 0 the job succeeded and met every threshold; 1 it failed, was cancelled, or missed a threshold;
2 bad input (a file, a threshold, a rejected job); 3 the server could not be reached or answered 5xx.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import httpx
import msgspec

from .spec import ExamplesError, read_examples, read_preamble

OK, FAILED, BAD_INPUT, SERVER_ERROR = 0, 1, 2, 3
METRIC_NAMES = ("correction", "paraphrase", "generalization", "specificity")


class _Stop(Exception):
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
            raise _Stop(BAD_INPUT, f"--fail-under {item!r}: metric must be one of {', '.join(METRIC_NAMES)}")
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise _Stop(BAD_INPUT, f"--fail-under {item!r}: expected NAME=NUMBER") from None
    return thresholds


def _request(client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
    try:
        response = client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise _Stop(SERVER_ERROR, f"cannot reach the server: {exc}") from None
    if response.status_code >= 500:
        raise _Stop(SERVER_ERROR, f"server error {response.status_code} on {method} {url}")
    if response.status_code >= 400:
        try:
            problem = response.json()
            detail = problem.get("detail") or problem.get("title")
        except ValueError:
            detail = response.text[:200]
        raise _Stop(BAD_INPUT, f"{method} {url}: {response.status_code} {detail}")
    return response


def _wait(client: httpx.Client, job: dict, timeout: float, interactive: bool) -> dict:
    deadline = time.monotonic() + timeout
    last_message = None
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise _Stop(FAILED, f"job {job['id']} still {job['status']} after {timeout:.0f} s")
        time.sleep(0.5)
        job = _request(client, "GET", job["urls"]["self"]).json()
        progress = job["progress"]
        message = f"{job['status']:<10} {progress['fraction'] * 100:5.1f}%  {progress['message']}"
        if interactive:
            width = 30
            filled = int(progress["fraction"] * width)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {message[:90]:<90}", end="", file=sys.stderr, flush=True)
        elif message != last_message:
            print(message, file=sys.stderr, flush=True)
        last_message = message
    if interactive:
        print(file=sys.stderr)
    return job


def _download(client: httpx.Client, job: dict, target: Path) -> None:
    for artifact in _request(client, "GET", job["urls"]["artifacts"]).json()["data"]:
        response = _request(client, "GET", f"{job['urls']['artifacts']}/{artifact['name']}")
        if hashlib.sha256(response.content).hexdigest() != artifact["sha256"]:
            raise _Stop(SERVER_ERROR, f"artifact {artifact['name']}: sha256 does not match")
        path = target / artifact["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)


def run_submit(server, model, examples_path, preamble_file, max_layers, wait, fail_under, download, json_output, api_key, timeout) -> int:
    try:
        thresholds = parse_thresholds(fail_under)
        try:
            examples = read_examples(examples_path)
            preamble = read_preamble(preamble_file) if preamble_file else ""
        except (ExamplesError, OSError) as exc:
            raise _Stop(BAD_INPUT, str(exc)) from None
        body: dict = {"model": model, "examples": msgspec.to_builtins(examples), "preamble": preamble}
        if max_layers:
            body["budget"] = {"max_layers": max_layers}
        headers = {"X-API-Key": api_key} if api_key else {}
        with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=60.0) as client:
            job = _request(client, "POST", "/v1/jobs", json=body).json()
            print(job["id"], flush=True)
            if not (wait or thresholds or download):
                return OK
            job = _wait(client, job, timeout, sys.stderr.isatty())
            if job["status"] == "succeeded" and download:
                download.mkdir(parents=True, exist_ok=True)
                _download(client, job, download)
        summary = (job.get("result") or {}).get("summary", {})
        if json_output:
            print(json.dumps({"id": job["id"], "status": job["status"], "error": job["error"], "summary": summary}, indent=2))
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            raise _Stop(FAILED, f"job {job['id']} {job['status']}: {error.get('code', '')} {error.get('message', '')}".rstrip())
        missed = [
            f"{name}_rate={summary.get(f'{name}_rate')} < {limit}"
            for name, limit in thresholds.items()
            if summary.get(f"{name}_rate") is None or summary[f"{name}_rate"] < limit
        ]
        if missed:
            raise _Stop(FAILED, "patch does not hold: " + ", ".join(missed))
        return OK
    except _Stop as stop:
        _say(str(stop))
        return stop.code
