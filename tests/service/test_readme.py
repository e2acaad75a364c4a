"""The README's service commands, run as written against a live API and worker (built-in model, keys on).

Only the host and port change: `localhost:8000` becomes the test server's address.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import live_service

pytestmark = pytest.mark.builtin
ROOT = Path(__file__).resolve().parents[2]
HOPPATCH = [sys.executable, "-m", "hoppatch.cli"]


def readme_block(after: str) -> str:
    """The first ```bash block of the README after the line `after`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    return re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines and lines inside an open quote joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found, pending = [], ""
    for line in joined.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if len(re.findall(r'(?<!\\)"', pending)) % 2 == 0 and pending.count("'") % 2 == 0:
            command = re.sub(r"\s+#[^\"']*$", "", pending).strip()
            if command and not command.startswith("#"):
                found.append(command)
            pending = ""
    return found


@pytest.fixture(scope="module")
def live(redis_url, tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    env = {
        **os.environ, "HOPPATCH_REDIS_URL": redis_url, "HOPPATCH_ARTIFACT_DIR": str(work / "artifacts"),
        "HOPPATCH_WORKER_METRICS_PORT": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    with live_service(env, work, ("--preload", "builtin:gemma-3-270m")) as url:
        yield int(url.rsplit(":", 1)[1]), env, work


def _bash(command: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_readmes_curl_commands_work_as_written(live):
    port, env, work = live
    # the key the README creates, with the README's own command (`.venv/bin/` is the test interpreter's)
    [create_key] = [c for c in commands(readme_block("## The service")) if c.startswith("KEY=")]
    key = _bash(create_key.replace("KEY=$(", "").rstrip(")").replace(".venv/bin/hoppatch", "hoppatch"), env, ROOT)
    assert key.returncode == 0, key.stderr
    env = {**env, "KEY": key.stdout.strip()}
    submit, *rest = commands(readme_block("Submit a job, watch it, fetch the delta:"))
    local = lambda command: command.replace("localhost:8000", f"127.0.0.1:{port}")  # noqa: E731
    created = _bash(local(submit), env, ROOT)
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["status"] == "queued", job
    env["JOB"] = job["id"]
    deadline = time.monotonic() + 600
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        job = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{env['JOB']}", headers={"X-API-Key": env["KEY"]}).json()
    assert job["status"] == "succeeded", job
    for command in rest:
        # the status code of each call; the cancel of an ended job answers 409, as the README's table says
        done = _bash(local(command) + " -w '\\n%{http_code}'", env, work)
        assert done.returncode == 0, (command, done.stderr)
        status = int(done.stdout.strip().splitlines()[-1])
        expected = {409} if "/cancel" in command else {200}
        assert status in expected, (command, status, done.stdout[-500:])
    assert (work / "delta.safetensors").stat().st_size > 0
