"""What the Dockerfile, compose file, Makefile and README call exists and answers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _hoppatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hoppatch.cli", *args], capture_output=True, text=True, cwd=ROOT)


def _image_commands() -> set[str]:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["hoppatch"\]', dockerfile, re.M)
    commands = {re.search(r'^CMD \["(\w+)"', dockerfile, re.M).group(1)}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands |= {svc["command"][0] for name, svc in compose["services"].items() if svc.get("build")}
    return commands


@pytest.mark.parametrize("command", sorted(_image_commands() | {"edit", "apply", "submit", "import-mquake", "keys"}))
def test_entry_points_exist(command):
    done = _hoppatch(command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_compose_runs_redis_durably():
    redis = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert "--appendonly" in redis and "noeviction" in redis


def test_readme_starts_with_the_two_commands():
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/demo.sh" in makefile and "scripts/test.sh" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
