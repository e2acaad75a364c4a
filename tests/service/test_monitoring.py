"""Monitoring: the alert rules pass promtool, a real Prometheus scrapes a live API and worker, and every
series the dashboard and the alerts read is one the service exports."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, live_service

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hoppatch.json"


def _expressions() -> list[str]:
    rules = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    panels = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return rules + panels


@pytest.mark.skipif(not shutil.which("promtool"), reason="needs promtool (Debian package prometheus; make test installs it)")
def test_the_alert_rules_pass_promtool():
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 rules found" in done.stdout


@pytest.fixture(scope="module")
def scraped(redis_url, tmp_path_factory):
    """A live API and worker; yields their URLs (API, worker metrics) and their /metrics text."""
    work = tmp_path_factory.mktemp("monitoring")
    worker_port = free_port()
    env = {**os.environ, "HOPPATCH_REDIS_URL": redis_url, "HOPPATCH_AUTH": "off", "HOPPATCH_ARTIFACT_DIR": str(work / "a"),
           "HOPPATCH_WORKER_METRICS_PORT": str(worker_port)}
    with live_service(env, work) as url:
        worker = f"http://127.0.0.1:{worker_port}"
        time.sleep(1.5)  # the API's gauges are refreshed off the request path
        yield url, worker, httpx.get(f"{url}/metrics").text + httpx.get(f"{worker}/metrics").text


def test_every_series_the_dashboard_and_alerts_read_is_exported(scraped):
    *_, text = scraped
    # every family is declared (# TYPE) even before its first sample: a labelled counter nobody has hit yet
    suffixes = {"counter": ("", "_total"), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {name + suffix for name, kind in re.findall(r"^# TYPE (hoppatch_\w+) (\w+)", text, re.M) for suffix in suffixes.get(kind, ("",))}
    used = {name for expr in _expressions() for name in re.findall(r"\b(hoppatch_\w+)", expr)}
    assert used - exported == set()


@pytest.mark.skipif(not shutil.which("prometheus"), reason="needs prometheus (Debian package; make test installs it)")
def test_a_real_prometheus_scrapes_the_api_and_a_worker(scraped, tmp_path):
    api, worker, _ = scraped
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "hoppatch-api", "static_configs": [{"targets": [api.removeprefix("http://")]}]},
            {"job_name": "hoppatch-worker", "static_configs": [{"targets": [worker.removeprefix("http://")]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    command = ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for series, job in (("hoppatch_queue_depth", "hoppatch-api"), ("hoppatch_worker_models_warm", "hoppatch-worker")):
            assert _query_until(port, series), f"{series} never reached Prometheus"
            assert _query_until(port, series)[0]["metric"]["job"] == job
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules").json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == {"HoppatchQueueGrowing", "HoppatchNoLiveWorker", "HoppatchFailureRatioHigh", "HoppatchWorkerLost"}
    finally:
        proc.terminate()
        proc.wait(30)


def _query_until(port: int, series: str, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": series}).json()["data"]["result"]
            if result:
                return result
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    return []
