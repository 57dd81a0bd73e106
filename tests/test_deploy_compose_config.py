"""The runner and Docker Compose read our compose files the same way.

services/runner keeps its own reader (docs/deploy.md says why); this is the check that it
agrees with Compose itself: for every service of compose.yaml, compose.demo.yaml and
compose.yaml + compose.cpu.yaml (merged, with `!reset`), `docker compose config --format json`
(the real Compose v2 binary, which needs no engine) and the runner's Project give the same
command, environment, mounts, dependencies, healthcheck, restart policy, stop grace period,
profiles and image. Compose is installed by .ci/install_tools.sh; a missing binary fails
the test with that command (never a skip).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import docker_engine
from services.runner.compose import ComposeError, Project, load_yaml
from services.runner.normalise import parse_duration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_env_file(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    (models / "Llama-test").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    path = tmp_path / "gpu.env"
    path.write_text(f"MODELS_DIR={models}\nTEACHER_MODEL=Llama-test\nDATA_DIR={tmp_path / 'data'}\n"
                    f"RUNS_DIR={tmp_path / 'runs'}\nRUN_NAME=r1\nGRAFANA_ADMIN_PASSWORD=pw\n"
                    "NCCL_DEBUG=INFO\nTRAINER_NPROC=4\n")
    return path


def compose_config(files: list[str], env_file: Path | None) -> dict:
    cmd = docker_engine.compose_command()
    if cmd is None:
        pytest.fail("Docker Compose v2 not found; install it with: python3 "
                    "-m deploy.docker_engine compose (or bash .ci/install_tools.sh)")
    args = [*cmd, "--profile", "*"]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    for f in files:
        args += ["-f", str(ROOT / f)]
    # A bare environment: no variable of this shell may change what either side reads, and
    # no engine is reachable (config must not need one).
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    done = subprocess.run(args + ["config", "--format", "json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def compose_view(svc: dict) -> dict:
    """What the runner uses of a service, from compose's normalised JSON."""
    health = svc.get("healthcheck")
    if health and not health.get("disable"):
        health = {"test": health["test"], "interval": parse_duration(health.get("interval"), 30),
                  "timeout": parse_duration(health.get("timeout"), 30),
                  "retries": health.get("retries", 3),
                  "start_period": parse_duration(health.get("start_period"), 0)}
    return {
        "argv": (svc.get("entrypoint") or []) + (svc.get("command") or []),
        "environment": svc.get("environment") or {},
        "mounts": sorted((v["type"], v["source"], v["target"], bool(v.get("read_only")))
                         for v in svc.get("volumes") or []),
        "depends_on": {k: v["condition"] for k, v in (svc.get("depends_on") or {}).items()},
        "healthcheck": health or None,
        "restart": svc.get("restart", "no"),
        "stop_grace_period": parse_duration(svc.get("stop_grace_period"), 10),
        "profiles": svc.get("profiles") or [],
        "image": svc.get("image"),
        "builds": "build" in svc,
    }


def runner_view(project: Project, name: str) -> dict:
    svc = project.service(name)
    health = svc.healthcheck
    return {
        "argv": svc.argv or [],
        "environment": svc.environment,
        "mounts": sorted((m.kind, m.source, m.target, m.read_only) for m in svc.mounts),
        "depends_on": svc.depends_on,
        "healthcheck": None if health is None else {
            "test": health.test, "interval": health.interval, "timeout": health.timeout,
            "retries": health.retries, "start_period": health.start_period},
        "restart": svc.restart,
        "stop_grace_period": svc.stop_grace_period,
        "profiles": svc.profiles,
        "image": svc.image,
        "builds": svc.builds,
    }


@pytest.mark.parametrize("files,env", [
    (["compose.yaml"], "gpu"),
    (["compose.demo.yaml"], None),
    (["compose.yaml", "compose.cpu.yaml"], "deploy/cpu.env"),
], ids=["compose.yaml", "compose.demo.yaml", "compose.yaml+compose.cpu.yaml"])
def test_runner_reads_every_service_as_compose_does(files, env, gpu_env_file: Path):
    env_file = gpu_env_file if env == "gpu" else (ROOT / env if env else None)
    composed = compose_config(files, env_file)
    project = Project([ROOT / f for f in files], env_files=[env_file] if env_file else [],
                      environ={})
    assert project.name == composed["name"]
    assert set(project.service_names) == set(composed["services"])
    assert set(project.volume_names()) == set(composed.get("volumes") or {})
    for name, svc in composed["services"].items():
        assert runner_view(project, name) == compose_view(svc), name


def test_cpu_override_removes_gpu_settings_in_both_readers():
    composed = compose_config(["compose.yaml", "compose.cpu.yaml"], ROOT / "deploy" / "cpu.env")
    project = Project([ROOT / "compose.yaml", ROOT / "compose.cpu.yaml"],
                      env_files=[ROOT / "deploy" / "cpu.env"], environ={})
    for name in ("teacher-0", "teacher-1", "trainer"):
        for key in ("deploy", "ulimits"):
            assert key not in composed["services"][name] and key not in project.raw(name)
        build = composed["services"][name]["build"]
        assert build["args"]["BASE_IMAGE"] == "llama2rwkv-base:bookworm"
        assert build["network"] == "host"
    assert project.select() == ["teacher-0", "teacher-1", "trainer", "prometheus"]


def test_override_tags(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(
        "services:\n  s:\n    image: x\n    command: [a]\n    environment: {A: '1', B: '2'}\n"
        "    deploy: {resources: {limits: {cpus: '1'}}}\n")
    (tmp_path / "b.yaml").write_text(
        "services:\n  s:\n    deploy: !reset {}\n    environment: !override {C: '3'}\n")
    project = Project([tmp_path / "a.yaml", tmp_path / "b.yaml"], environ={})
    assert "deploy" not in project.raw("s")
    assert project.service("s").environment == {"C": "3"}
    assert load_yaml("k: !reset null")["k"] is not None  # a marker until files are merged
    (tmp_path / "c.yaml").write_text("services:\n  s:\n    image: !unknown x\n")
    with pytest.raises(ComposeError, match="unknown"):
        Project([tmp_path / "c.yaml"], environ={})


def test_cpu_override_passes_the_compose_spec_schema(tmp_path: Path):
    """check-jsonschema cannot read `!reset`: validate the file with its tags resolved."""
    import shutil

    exe = shutil.which("check-jsonschema") or shutil.which(
        "check-jsonschema", path=str(Path(sys.executable).parent))
    if not exe:
        pytest.fail("check-jsonschema not found; bash .ci/install_tools.sh")
    doc = load_yaml((ROOT / "compose.cpu.yaml").read_text())

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return getattr(value, "value", {} if type(value).__name__ == "_Reset" else value)

    out = tmp_path / "compose.cpu.yaml"
    out.write_text(yaml.safe_dump(plain(doc)))
    done = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
