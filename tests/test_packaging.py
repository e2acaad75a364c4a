"""What the Dockerfile, compose file, Makefile and README call exists and answers."""

import ast
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


def test_compose_runs_redis_durably_bounded_and_behind_a_password():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    redis = services["redis"]["command"]
    for setting in ("--appendonly yes", "--appendfsync always", "--maxmemory ", "noeviction", "--requirepass"):
        assert setting in redis
    for name in ("redis", "api", "worker"):
        assert services[name]["restart"] == "unless-stopped" and services[name]["healthcheck"]["test"]
    assert services["api"]["environment"]["HOPPATCH_REDIS_URL"].startswith("redis://:${HOPPATCH_REDIS_PASSWORD")


def test_images_are_pinned_and_the_service_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = re.findall(r"^FROM (\S+)", dockerfile, re.M) + [s["image"] for s in compose["services"].values() if "image" in s]
    for image in images:
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"{image} is not pinned to a release"
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "-c constraints.txt" in dockerfile


def test_readme_starts_with_the_two_commands():
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/demo.sh" in makefile and "scripts/test.sh" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _imports(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return names


def test_layers_import_only_downwards():
    """The engine imports neither adapter; the base package reaches up only from the CLI's server commands."""
    for path in (ROOT / "hoppatch").rglob("*.py"):
        upward = {m for m in _imports(path) if m.split(".")[:2] in (["hoppatch", "service"], ["hoppatch", "workers"])}
        upward |= {m for m in _imports(path) if m.split(".")[0] in ("service", "workers", "tests", "bench")}
        if path == ROOT / "hoppatch" / "cli.py":
            assert upward <= {"hoppatch.service.app", "hoppatch.service.auth", "hoppatch.workers.worker"}, upward
        else:
            assert not upward, (path, upward)
    for path in (ROOT / "bench").rglob("*.py"):
        assert not {m for m in _imports(path) if m.split(".")[0] == "tests"}, path


def test_the_wheel_installs_only_the_hoppatch_package_with_its_public_api(tmp_path):
    """A wheel built from the repo, in a fresh venv: one top-level package, its data, and the public names."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and not p.name.startswith(("_", "pip", "setuptools", "pkg_resources"))}
    assert installed == {"hoppatch"}
    assert (site / "hoppatch" / "engine" / "data" / "preserve_prompts.txt").is_file()
    assert (site / "hoppatch" / "engine" / "data" / "fluency.txt").is_file()
    # the dependencies come from the test environment's site-packages, placed after the venv's own
    deps = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    code = (
        "import hoppatch, hoppatch.service.app, hoppatch.workers.tasks\n"
        "from hoppatch import apply_delta, read_delta, Client, JobSpec\n"
        "import importlib.util as u\n"
        "assert u.find_spec('service') is None and u.find_spec('workers') is None\n"
        "print(hoppatch.__file__)"
    )
    script = tmp_path / "check.py"
    script.write_text(f"import sys\nsys.path.append({str(deps)!r})\n" + code)
    done = subprocess.run([str(venv / "bin" / "python"), str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(site))


def test_the_kubernetes_manifests_wire_api_workers_redis_and_keda():
    from hoppatch.routing import Routes, model_queue, rq_queue_key

    docs = [d for f in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    api = deployments["hoppatch-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][0] == "serve" and {"hoppatch-api", "hoppatch-redis"} <= {s["metadata"]["name"] for s in by_kind["Service"]}
    [config] = by_kind["ConfigMap"]
    routes = Routes(tuple(config["data"]["HOPPATCH_SERVED_MODELS"].split(",")))
    assert config["data"]["HOPPATCH_ARTIFACT_URL"].startswith("s3://")
    workers = [d for name, d in deployments.items() if name.startswith("hoppatch-worker-")]
    served_by_groups = set()
    for worker in workers:
        container = worker["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][:2] == ["worker", "--models"] and container["resources"]["requests"]["nvidia.com/gpu"] == 1
        served_by_groups.update(container["args"][2].split(","))
    assert served_by_groups == set(routes.served)  # every served model has a group, and no group idles
    redis_args = by_kind["StatefulSet"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--appendonly" in redis_args and "noeviction" in redis_args
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"]["triggers"][0]["metadata"]["listName"] for s in by_kind["ScaledObject"]}
    for worker in workers:  # each group scales on the queue of the model it serves
        container = worker["spec"]["template"]["spec"]["containers"][0]
        assert scaled[worker["metadata"]["name"]] == rq_queue_key(model_queue(container["args"][2]))
