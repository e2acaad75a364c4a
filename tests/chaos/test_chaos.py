"""The chaos suite's CI part (`bench/chaos.py --scale ci`): real redis-server, API and worker processes on a
tiny model, with Redis SIGKILLed and restarted from its AOF, workers SIGKILLed mid-job, Redis paused past
the clients' timeouts, and a soak on one warm worker. Every job is counted."""

import shutil

import pytest

from bench.chaos import SCALES, StepReport, run_steps

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server (make test installs it)")


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, StepReport]:
    reports = run_steps(SCALES["ci"], tmp_path_factory.mktemp("chaos"))
    return {r.step.split()[0]: r for r in reports}


@pytest.mark.parametrize("step", ["burst", "worker", "redis", "soak"])
def test_every_accepted_job_ends_once_and_no_finished_job_is_reaped(steps, step):
    report = steps[step]
    assert report.accepted > 0
    assert report.terminal == report.accepted and report.lost == 0, report
    assert report.duplicated == 0, report
    assert report.wrongly_reaped == 0, report
    assert report.workers_alive, f"a worker process did not survive {step}: {report}"
    assert "500" not in report.statuses, report


def test_only_the_over_quota_tenant_gets_429s(steps):
    burst = steps["burst"]
    assert set(burst.too_many_per_tenant) == {"team-greedy"}, burst
    assert burst.accepted + sum(burst.too_many_per_tenant.values()) == burst.submitted


def test_while_redis_is_down_or_paused_the_api_answers_503_not_500(steps):
    down = steps["burst"].extra["statuses_during_outage"]
    paused = steps["redis"].extra["statuses_during_pause"]
    assert 503 in down and 503 in paused, (down, paused)
    assert 500 not in down and 500 not in paused, (down, paused)


def test_jobs_on_killed_workers_end_worker_lost_and_the_rest_succeed(steps):
    outcomes = steps["worker"].outcomes
    assert outcomes.get("failed:worker_lost", 0) >= 1, outcomes
    assert set(outcomes) <= {"succeeded", "failed:worker_lost"}, outcomes


def test_a_warm_worker_stays_flat_in_memory(steps):
    soak = steps["soak"].extra
    assert abs(soak["rss_growth"]) <= 0.10, soak
