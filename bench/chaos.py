"""Chaos and soak: real redis-server, API and worker processes, a tiny model; faults injected; every job counted.

    .venv/bin/python bench/chaos.py                 # the long run: 1,000-job burst, 20 worker kills, 300-job soak
    .venv/bin/python bench/chaos.py --scale ci      # what tests/chaos runs in `make test`

Steps: a burst from 4 tenants with 2 workers (one tenant over its quota) while redis-server is SIGKILLed and
restarted from its AOF; workers SIGKILLed at random points; Redis paused (SIGSTOP) past the clients'
timeouts; a soak on one warm worker with distinct preambles and examples, sampling its RSS (and its GPU
memory through nvidia-smi where there is one). Each step prints its figures as one JSON line; `run_steps`
returns them for the tests' assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import HOPPATCH, ROOT, failing_tiny_job, free_port  # noqa: E402
from hoppatch.connection import SOCKET_TIMEOUT  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}
OUTAGE_SECONDS = 2.0
"""How long redis-server stays down after its SIGKILL, probed by a client meanwhile."""
WARM_CACHE_MIB = 16
"""A warm budget the soak's warm-up fills with tiny-model entries, so that what follows shows it holding."""
HEARTBEAT_TIMEOUT = 10.0
"""Short, so a killed worker's job is reaped within the step; still twice the Redis pause below."""


@dataclass(frozen=True)
class Scale:
    burst_jobs: int
    """Submissions in the burst, spread over 4 tenants; the last tenant sends half of them."""
    tenant_max_active: int
    worker_kills: int
    kill_jobs: int
    soak_jobs: int
    soak_sample_at: int


SCALES = {
    "full": Scale(burst_jobs=1000, tenant_max_active=200, worker_kills=20, kill_jobs=20, soak_jobs=300, soak_sample_at=50),
    "ci": Scale(burst_jobs=80, tenant_max_active=20, worker_kills=3, kill_jobs=6, soak_jobs=40, soak_sample_at=15),
}


class RedisProcess:
    """A foreground redis-server on a private port and directory, with AOF fsynced on every write."""

    def __init__(self, directory: Path):
        self.port, self.directory = free_port(), directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                   "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self, seconds: float) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


@dataclass
class Cluster:
    """Redis, one API process and worker processes, each worker with its own log."""

    work: Path
    redis: RedisProcess
    env: dict[str, str]
    url: str = ""
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    """Names of the workers this run killed: only their jobs may end `worker_lost`."""

    def start_api(self) -> None:
        port = free_port()
        log = (self.work / "api.log").open("ab")
        self.api = subprocess.Popen([*HOPPATCH, "serve", "--port", str(port)], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        _until(lambda: _get(f"{self.url}/healthz") == 200, 60, "the API did not start")

    def start_worker(self) -> str:
        log = (self.work / f"worker-{len(self.workers)}.log").open("ab")
        proc = subprocess.Popen([*HOPPATCH, "worker"], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        name = f"hoppatch-{os.uname().nodename}-{proc.pid}"
        self.workers[name] = proc
        return name

    def kill_worker(self, name: str) -> None:
        self.workers[name].send_signal(signal.SIGKILL)
        self.workers[name].wait()
        self.killed.add(name)

    def live_workers(self) -> list[str]:
        return [name for name, proc in self.workers.items() if proc.poll() is None]

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.api]:
            if proc and proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers.values(), self.api]:
            if proc:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.redis.stop()


@dataclass
class Submissions:
    """What clients saw: the job each idempotency key got, and every status code."""

    jobs: dict[str, str] = field(default_factory=dict)
    ids_per_key: dict[str, set[str]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    too_many: Counter = field(default_factory=Counter)
    """429s per tenant."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, tenant: str, idem: str, response: httpx.Response | None) -> None:
        with self.lock:
            self.statuses[response.status_code if response is not None else "connection-error"] += 1
            if response is not None and response.status_code == 429:
                self.too_many[tenant] += 1
            if response is not None and response.status_code == 202:
                job_id = response.json()["id"]
                self.jobs[idem] = job_id
                self.ids_per_key.setdefault(idem, set()).add(job_id)


def submit(url: str, key: str, tenant: str, idem: str, body: dict, seen: Submissions, deadline: float) -> None:
    """Submit until accepted or refused for good; 503s and dropped connections are retried, same key."""
    with httpx.Client(timeout=15) as client:
        while time.monotonic() < deadline:
            try:
                response = client.post(f"{url}/v1/jobs", json=body, headers={"X-API-Key": key, "Idempotency-Key": idem})
            except httpx.HTTPError:
                seen.record(tenant, idem, None)
                time.sleep(0.5)
                continue
            seen.record(tenant, idem, response)
            if response.status_code == 503:
                assert "Retry-After" in response.headers, "a 503 without Retry-After"
                time.sleep(min(1.0, float(response.headers["Retry-After"])))
                continue
            return


def final_states(cluster: Cluster, key_of: dict[str, str], job_ids: dict[str, str], timeout: float) -> dict[str, dict]:
    """Each job's record once every one has ended (or the timeout passed); tenant keys read their own jobs."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=15) as client:
        while time.monotonic() < deadline:
            for idem, job_id in job_ids.items():
                if job_id in found and found[job_id]["status"] in TERMINAL:
                    continue
                try:
                    response = client.get(f"{cluster.url}/v1/jobs/{job_id}", headers={"X-API-Key": key_of[idem]})
                except httpx.HTTPError:
                    continue
                found[job_id] = response.json() if response.status_code == 200 else {"status": f"http-{response.status_code}"}
            if all(found.get(j, {}).get("status") in TERMINAL for j in job_ids.values()):
                break
            time.sleep(0.5)
    return found


@dataclass
class StepReport:
    step: str
    submitted: int
    accepted: int
    terminal: int
    lost: int
    duplicated: int
    wrongly_reaped: int
    outcomes: dict[str, int]
    statuses: dict[str, int]
    too_many_per_tenant: dict[str, int]
    workers_alive: bool
    seconds: float
    extra: dict = field(default_factory=dict)


def report(step: str, cluster: Cluster, seen: Submissions, submitted: int, key_of: dict[str, str], started: float,
           survivors: list[str], timeout: float, **extra) -> StepReport:
    states = final_states(cluster, key_of, seen.jobs, timeout)
    terminal = [s for s in states.values() if s.get("status") in TERMINAL]
    wrongly_reaped = [
        s for s in terminal if (s.get("error") or {}).get("code") == "worker_lost" and s.get("worker") not in cluster.killed
        and not _reaped_while_queued(s)
    ]
    outcomes = Counter(s["status"] if s["status"] != "failed" else f"failed:{s['error']['code']}" for s in terminal)
    return StepReport(
        step=step, submitted=submitted, accepted=len(seen.jobs), terminal=len(terminal),
        lost=len(seen.jobs) - len(terminal),
        duplicated=sum(len(ids) - 1 for ids in seen.ids_per_key.values()),
        wrongly_reaped=len(wrongly_reaped), outcomes=dict(outcomes), statuses={str(k): v for k, v in seen.statuses.items()},
        too_many_per_tenant=dict(seen.too_many), workers_alive=all(cluster.workers[n].poll() is None for n in survivors),
        seconds=round(time.monotonic() - started, 1), extra=extra,
    )


def _reaped_while_queued(state: dict) -> bool:
    return state.get("started_at") is None


def burst_with_redis_restart(cluster: Cluster, keys: dict[str, str], body: dict, scale: Scale) -> StepReport:
    """The burst: 4 tenants, the last sending half the jobs; redis-server SIGKILLed at 40 % and restarted."""
    seen, started = Submissions(), time.monotonic()
    tenants = list(keys)
    plan = [(tenants[-1] if i % 2 else tenants[i // 2 % 3], f"burst-{i}") for i in range(scale.burst_jobs)]
    key_of = {idem: keys[tenant] for tenant, idem in plan}
    survivors = cluster.live_workers()
    deadline = time.monotonic() + 300
    threads, outage = [], []
    for index, (tenant, idem) in enumerate(plan):
        if index == int(0.4 * len(plan)):
            cluster.redis.kill()
            outage.extend(_probe(cluster.url, keys[tenants[0]], OUTAGE_SECONDS))
            cluster.redis.start()
        thread = threading.Thread(target=submit, args=(cluster.url, keys[tenant], tenant, idem, body, seen, deadline))
        thread.start()
        threads.append(thread)
        if len(threads) >= 16:
            threads.pop(0).join()
    for thread in threads:
        thread.join()
    return report("burst + redis SIGKILL/restart", cluster, seen, len(plan), key_of, started, survivors, 900,
                  outage_seconds=OUTAGE_SECONDS, statuses_during_outage=dict(Counter(outage)))


def worker_kills(cluster: Cluster, keys: dict[str, str], body: dict, scale: Scale, rng: random.Random) -> StepReport:
    """Workers SIGKILLed at random points while jobs run; a fresh one started after each kill."""
    seen, started = Submissions(), time.monotonic()
    tenant = next(iter(keys))
    key_of = {}
    for kill in range(scale.worker_kills):
        for j in range(scale.kill_jobs):
            idem = f"kill-{kill}-{j}"
            key_of[idem] = keys[tenant]
            submit(cluster.url, keys[tenant], tenant, idem, body, seen, time.monotonic() + 60)
        victim = _running_worker(cluster, keys[tenant], [seen.jobs[f"kill-{kill}-{j}"] for j in range(scale.kill_jobs)])
        time.sleep(rng.uniform(0.0, 0.5))  # a random point of the job: loading, a stage, publishing
        cluster.kill_worker(victim or rng.choice(cluster.live_workers()))
        cluster.start_worker()
    survivors = cluster.live_workers()
    return report("worker SIGKILLs", cluster, seen, len(key_of), key_of, started, survivors, 600)


def _running_worker(cluster: Cluster, key: str, job_ids: list[str]) -> str | None:
    """The worker of the first of `job_ids` seen running (None if none runs within 30 s)."""
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=15) as client:
        while time.monotonic() < deadline:
            for job_id in job_ids:
                job = client.get(f"{cluster.url}/v1/jobs/{job_id}", headers={"X-API-Key": key}).json()
                if job["status"] == "running" and job.get("worker") in cluster.live_workers():
                    return job["worker"]
            time.sleep(0.05)
    return None


def redis_pause(cluster: Cluster, keys: dict[str, str], body: dict, pause_seconds: float) -> StepReport:
    """Redis stopped (SIGSTOP) past every client timeout while jobs are queued and running, then resumed."""
    seen, started = Submissions(), time.monotonic()
    tenant = next(iter(keys))
    key_of = {}
    survivors = cluster.live_workers()
    for j in range(10):
        key_of[f"pause-{j}"] = keys[tenant]
        submit(cluster.url, keys[tenant], tenant, f"pause-{j}", body, seen, time.monotonic() + 60)
    during: list[int] = []
    prober = threading.Thread(target=lambda: during.extend(_probe(cluster.url, keys[tenant], pause_seconds)))
    prober.start()
    cluster.redis.pause(pause_seconds)
    prober.join()
    return report("redis SIGSTOP/SIGCONT", cluster, seen, len(key_of), key_of, started, survivors, 600,
                  pause_seconds=pause_seconds, statuses_during_pause=dict(Counter(during)))


def _probe(url: str, key: str, seconds: float) -> list[int]:
    """Status codes of job listings while Redis is paused: 503s, never a 500."""
    codes, deadline = [], time.monotonic() + seconds
    with httpx.Client(timeout=seconds + 10) as client:
        while time.monotonic() < deadline:
            try:
                codes.append(client.get(f"{url}/v1/jobs", headers={"X-API-Key": key}).status_code)
            except httpx.HTTPError:
                codes.append(0)
            time.sleep(0.5)
    return codes


def soak(cluster: Cluster, keys: dict[str, str], body: dict, scale: Scale) -> StepReport:
    """Distinct preambles and examples on one warm worker, one at a time, sampling its RSS after each job."""
    for name in cluster.live_workers()[1:]:
        cluster.workers[name].terminate()
        cluster.workers[name].wait()
    [name] = cluster.live_workers()
    pid = cluster.workers[name].pid
    seen, started = Submissions(), time.monotonic()
    tenant = next(iter(keys))
    key_of, rss, device = {}, [], []
    for j in range(scale.soak_jobs):
        idem = f"soak-{j}"
        key_of[idem] = keys[tenant]
        example = {**body["examples"][0], "id": f"soak-{j}", "query": body["examples"][0]["query"] + f" (case {j})"}
        job = {**body, "examples": [example], "preamble": f"Note {j}: answer briefly.\n"}
        submit(cluster.url, keys[tenant], tenant, idem, job, seen, time.monotonic() + 60)
        final_states(cluster, {idem: keys[tenant]}, {idem: seen.jobs[idem]}, 120)
        rss.append(_rss_mib(pid))
        device.append(_device_mib(pid))
    warm = rss[scale.soak_sample_at - 1]
    return report("soak", cluster, seen, len(key_of), key_of, started, [name], 120,
                  rss_mib_at_sample=warm, rss_mib_at_end=rss[-1], rss_growth=round(rss[-1] / warm - 1, 4),
                  sample_at=scale.soak_sample_at, rss_mib_max_after_sample=max(rss[scale.soak_sample_at - 1 :]),
                  warm_cache_budget_mib=WARM_CACHE_MIB, rss_mib_every_25=rss[24::25],
                  device_mib_every_25=device[24::25] if any(d is not None for d in device) else None)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no RSS for process {pid}")


def _device_mib(pid: int) -> float | None:
    """GPU memory the process holds, from nvidia-smi; None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line) if int(p) == pid]
    return used[0] if used else 0.0


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise RuntimeError(message)


def run_steps(scale: Scale, work: Path, steps: tuple[str, ...] = ("burst", "kills", "pause", "soak"), seed: int = 0) -> list[StepReport]:
    rng = random.Random(seed)
    body = failing_tiny_job(work)
    server = RedisProcess(work / "redis")
    (work / "redis").mkdir(parents=True, exist_ok=True)
    server.start()
    env = {
        **os.environ, "HOPPATCH_REDIS_URL": server.url, "HOPPATCH_ARTIFACT_DIR": str(work / "artifacts"),
        "HOPPATCH_MODEL_ROOTS": str(work / "models"), "HOPPATCH_WORKER_METRICS_PORT": "0",
        "HOPPATCH_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "HOPPATCH_CACHE": str(work / "cache"),
        "HOPPATCH_TENANT_MAX_ACTIVE": str(scale.tenant_max_active), "HOPPATCH_TENANT_RATE": "0",
        "OMP_NUM_THREADS": "1", "HOPPATCH_WARM_CACHE_MIB": str(WARM_CACHE_MIB),
    }
    cluster = Cluster(work, server, env)
    reports = []
    try:
        cluster.start_api()
        for _ in range(2):
            cluster.start_worker()
        _until(lambda: _get(f"{cluster.url}/readyz") == 200, 120, "no worker became ready")
        keys = {}
        for tenant in ("team-a", "team-b", "team-c", "team-greedy"):
            out = subprocess.run([*HOPPATCH, "keys", "create", "--tenant", tenant], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            keys[tenant] = out.stdout.strip()
        if "burst" in steps:
            reports.append(burst_with_redis_restart(cluster, keys, body, scale))
        if "kills" in steps:
            reports.append(worker_kills(cluster, keys, body, scale, rng))
        if "pause" in steps:
            reports.append(redis_pause(cluster, keys, body, SOCKET_TIMEOUT + 2))
        if "soak" in steps:
            reports.append(soak(cluster, keys, body, scale))
    finally:
        cluster.stop()
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--steps", default="burst,kills,pause,soak")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hoppatch-chaos-"))
    try:
        for step in run_steps(SCALES[args.scale], work, tuple(args.steps.split(",")), args.seed):
            print(json.dumps(asdict(step)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
