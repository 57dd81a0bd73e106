"""The no-Docker runner reads compose files as Docker Compose does and renders supervisord
programs with exactly the compose services' commands and environment.

The reference side of the equivalence test is computed here, independently of the runner:
plain YAML loading, a small interpolation of the forms the compose files use, and the
mount table; the runner side is the rendered supervisord.conf as supervisord itself parses it.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.runner.cli import main as runner_main
from services.runner.compose import (
    ComposeError,
    Project,
    interpolate,
    parse_dotenv,
    parse_duration,
)
from services.runner.render import (
    build_plan,
    conf_command,
    conf_environment,
    render_conf,
    write_conf,
)

ROOT = Path(__file__).resolve().parents[1]
OUR_IMAGE_SERVICES = {"compose.yaml": {"teacher-0", "teacher-1", "trainer"},
                      "compose.demo.yaml": {"teacher", "trainer"}}


# --------------------------------------------------------------------------- helpers
def supervisor_programs(conf: Path) -> dict:
    """Programs of a conf as supervisord parses them: name -> ProcessConfig."""
    from supervisor.options import ServerOptions

    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    return {p.name: p for g in opts.process_group_configs for p in g.process_configs}


def reference_interpolate(text: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name, op, word = m.group(1), m.group(2), m.group(3)
        value = variables.get(name)
        if op == ":-":
            return value if value else word
        if op == ":?":
            assert value, f"{name} required"
        return value or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def reference_services(compose: Path, variables: dict[str, str], run_dir: Path):
    """(argv, environment) of each service with a command, container paths mapped to host."""
    doc = yaml.safe_load(compose.read_text())
    out = {}
    for name, svc in doc["services"].items():
        if "profiles" in svc or ("command" not in svc and "entrypoint" not in svc):
            continue
        mapping = []
        for vol in svc.get("volumes", []):
            src, dst = reference_interpolate(vol, variables).split(":")[:2]
            if src.startswith((".", "/")):
                host = str((compose.parent / src).resolve())
            else:
                host = str(run_dir.resolve() / "volumes" / src)
            mapping.append((dst, host))
        mapping.sort(key=lambda p: -len(p[0]))

        def mapped(value: str, mapping: list[tuple[str, str]] = mapping) -> str:
            for dst, host in mapping:
                if value == dst or value.startswith(dst + "/"):
                    return host + value[len(dst):]
                if value.startswith("-") and "=" in value:
                    flag, _, rest = value.partition("=")
                    if rest == dst or rest.startswith(dst + "/"):
                        return f"{flag}={host}{rest[len(dst):]}"
            return value

        argv = [mapped(reference_interpolate(str(a), variables))
                for a in (svc.get("entrypoint") or []) + svc.get("command", [])]
        env = {k: mapped(reference_interpolate(str(v), variables))
               for k, v in (svc.get("environment") or {}).items()}
        out[name] = (argv, env)
    return out


@pytest.fixture
def gpu_env(tmp_path: Path) -> dict[str, str]:
    models = tmp_path / "models"
    (models / "Llama-test").mkdir(parents=True)
    (models / "Llama-test" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    return {"MODELS_DIR": str(models), "TEACHER_MODEL": "Llama-test",
            "DATA_DIR": str(tmp_path / "data"), "RUNS_DIR": str(tmp_path / "runs"),
            "RUN_NAME": "r1", "GRAFANA_ADMIN_PASSWORD": "pw", "NCCL_DEBUG": "INFO"}


def write_env(path: Path, variables: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    return path


# --------------------------------------------------------------------------- compose reading
def test_interpolation_forms():
    env = {"A": "a", "EMPTY": ""}
    look = env.get
    assert interpolate("${A}-$A-$$A-${B:-dflt}-${EMPTY:-e}-${EMPTY-e}", look) == "a-a-$A-dflt-e-"
    assert interpolate("${B:-${A}x}", look) == "ax"
    assert interpolate("${A:+set}${B:+set}", look) == "set"
    with pytest.raises(ComposeError, match="B.*must be set"):
        interpolate("${B:?must be set}", look)
    with pytest.raises(ComposeError, match="EMPTY"):
        interpolate("${EMPTY:?x}", look)
    assert interpolate("${EMPTY?x}", look) == ""
    assert parse_duration("1m30s", 0) == 90 and parse_duration("500ms", 0) == 0.5
    assert parse_duration(None, 7) == 7


def test_dotenv_syntax():
    text = ("# comment\nexport A=1\nB = two words # inline comment\nC='lit ${A} #x'\n"
            'D="q ${A}\\n"\nE=${A}${Z:-z}\nF=\n')
    assert parse_dotenv(text, {"Z": None}.get) == {
        "A": "1", "B": "two words", "C": "lit ${A} #x", "D": "q 1\n", "E": "1z", "F": ""}


def test_precedence_override_then_environment_then_dotenv(tmp_path: Path):
    (tmp_path / "compose.yaml").write_text(
        "services:\n  s:\n    image: x\n    command: [echo, '${X}', '${Y}', '${Z}']\n")
    write_env(tmp_path / ".env", {"X": "dotenv", "Y": "dotenv", "Z": "dotenv"})
    p = Project([tmp_path / "compose.yaml"], overrides={"X": "override"},
                environ={"X": "shell", "Y": "shell"})
    assert p.service("s").command == ["echo", "override", "shell", "dotenv"]


def test_override_file_merges_like_compose(tmp_path: Path):
    (tmp_path / "compose.yaml").write_text("""
services:
  a:
    image: x
    command: [python, -c, "pass"]
    environment: {K1: v1, K2: v2}
    volumes: ["./d:/d"]
  b:
    image: x
    command: sleep 1
    depends_on: [a]
""")
    (tmp_path / "compose.override.yaml").write_text("""
services:
  a:
    command: [python, -c, "print(1)"]
    environment: [K2=over, K3=new]
    volumes: ["./e:/d", "./f:/f"]
""")
    p = Project([tmp_path / "compose.yaml", tmp_path / "compose.override.yaml"], environ={})
    a = p.service("a")
    assert a.command == ["python", "-c", "print(1)"]
    assert a.environment == {"K1": "v1", "K2": "over", "K3": "new"}
    assert {m.target: m.source for m in a.mounts} == {"/d": str(tmp_path / "e"),
                                                      "/f": str(tmp_path / "f")}
    assert p.service("b").command == ["sleep", "1"]
    assert p.select(["b"]) == ["a", "b"] and p.select(["b"], with_deps=False) == ["b"]


def test_env_file_and_environment(tmp_path: Path):
    (tmp_path / "svc.env").write_text("FROM_FILE=1\nBOTH=file\n")
    (tmp_path / "compose.yaml").write_text("""
services:
  s:
    image: x
    command: ["true"]
    env_file: [svc.env, {path: missing.env, required: false}]
    environment:
      - BOTH=environment
      - PASSED_THROUGH
      - NOT_SET_ANYWHERE
""")
    p = Project([tmp_path / "compose.yaml"], environ={"PASSED_THROUGH": "shell"})
    assert p.service("s").environment == {"FROM_FILE": "1", "BOTH": "environment",
                                          "PASSED_THROUGH": "shell"}


def test_profiles_and_compose_profiles():
    p = Project([ROOT / "compose.yaml"], env_files=[], environ={})
    assert "dcgm-exporter" not in p.select()
    assert "dcgm-exporter" in p.select(profiles=["dcgm"])
    p2 = Project([ROOT / "compose.yaml"], env_files=[], environ={"COMPOSE_PROFILES": "dcgm"})
    assert "dcgm-exporter" in p2.select()
    # Dependencies first, as compose starts them.
    order = p.select()
    assert order.index("teacher-0") < order.index("trainer")
    assert order.index("prometheus") < order.index("grafana")


def test_only_selected_services_are_interpolated(tmp_path: Path, gpu_env):
    """Grafana's required password does not block a local run, which skips Grafana."""
    env = dict(gpu_env)
    del env["GRAFANA_ADMIN_PASSWORD"]
    p = Project([ROOT / "compose.yaml"], env_files=[], environ=env)
    plan = build_plan(p, run_dir=tmp_path / "run")
    assert "grafana" in plan.skipped
    with pytest.raises(ComposeError, match="GRAFANA_ADMIN_PASSWORD"):
        p.service("grafana")


# --------------------------------------------------------------------------- conf quoting
@pytest.mark.parametrize("argv", [
    ["python", "-c", "import sys; print('a #b ;c %d' % 1)  # comment-like"],
    ["echo", "it's", 'say "hi"', "100%", "a  b", "#x", ";y", "ünï", ""],
])
def test_command_quoting_survives_supervisord_parsing(tmp_path: Path, argv):
    conf = tmp_path / "s.conf"
    conf.write_text(f"[supervisord]\n[program:p]\ncommand={conf_command(argv)}\n")
    parsed = supervisor_programs(conf)["p"]
    assert shlex.split(parsed.command) == argv


def test_environment_quoting_survives_supervisord_parsing(tmp_path: Path):
    env = {"A": "1", "B": "", "C": "x,y=z", "D": "50%", "E": "it's", "F": 'say "hi" now',
           "G": "a b", "H": "/p/a:/p/b"}
    conf = tmp_path / "s.conf"
    conf.write_text(f"[supervisord]\n[program:p]\ncommand=true\n"
                    f"environment={conf_environment(env)}\n")
    assert supervisor_programs(conf)["p"].environment == env


def test_environment_values_supervisord_cannot_hold_are_refused():
    for bad in ("'quoted'", "a\nb", "x #y"):
        with pytest.raises(ComposeError):
            conf_environment({"K": bad})


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("compose_name", ["compose.yaml", "compose.demo.yaml"])
def test_rendered_programs_are_the_compose_services(tmp_path: Path, gpu_env, compose_name):
    """Every compose service with a command is a supervisord program with exactly its command
    and environment (container paths mapped to the host); the others are reported skipped."""
    if not shutil.which("prometheus") and not os.path.exists("/bin/prometheus"):
        pytest.fail("prometheus not found (Debian package prometheus); install the CI tools "
                    "with: bash .ci/install_tools.sh")
    compose = ROOT / compose_name
    run_dir = tmp_path / "run"
    project = Project([compose], env_files=[write_env(tmp_path / "test.env", gpu_env)],
                      environ={})
    plan = build_plan(project, run_dir=run_dir)
    conf = write_conf(plan)
    programs = supervisor_programs(conf)
    expected = reference_services(compose, gpu_env, run_dir)

    listeners = {n for n in programs if n.startswith("stop-on")}
    assert set(programs) - listeners == set(expected)
    doc = yaml.safe_load(compose.read_text())
    for name in doc["services"]:
        assert name in expected or name in plan.skipped or doc["services"][name].get("profiles")

    raw = yaml.safe_load(compose.read_text())["services"]
    for name, (argv, env) in expected.items():
        prog = programs[name]
        got = shlex.split(prog.command)
        if name in OUR_IMAGE_SERVICES[compose_name]:
            assert got == argv, name
        else:  # an image's own program runs as this host's program of the same name
            assert Path(got[0]).name == Path(argv[0]).name and got[1:] == argv[1:], name
        got_env = {k: v for k, v in (prog.environment or {}).items() if k != "PATH"}
        assert got_env == env, name
        assert prog.stopasgroup and prog.killasgroup and prog.stopsignal == 15
        grace = parse_duration(raw[name].get("stop_grace_period"), 10)
        assert prog.stopwaitsecs < grace, name
        if name in OUR_IMAGE_SERVICES[compose_name]:
            assert env["NCCL_NVLS_ENABLE"] == "0"
            assert int(env["STOP_WAIT_SECS"]) == prog.stopwaitsecs
        assert prog.stdout_logfile == str(run_dir / "logs" / f"{name}.log")
        restart = raw[name].get("restart", "no")
        assert (prog.autorestart is False) == (restart == "no"), name
        assert prog.autostart == (not raw[name].get("depends_on")), name

    # The paths the services need are host paths now.
    teacher = "teacher-0" if compose_name == "compose.yaml" else "teacher"
    argv = shlex.split(programs[teacher].command)
    assert argv[argv.index("--teacher.model_path") + 1] == str(
        Path(gpu_env["MODELS_DIR"]) / gpu_env["TEACHER_MODEL"])
    assert argv[argv.index("--link.rendezvous_dir") + 1] == str(
        run_dir.resolve() / "volumes" / "rendezvous")
    if compose_name == "compose.yaml":  # compiled kernels persist on the kernel-cache volume
        cache = run_dir.resolve() / "volumes" / "kernel-cache"
        for name in OUR_IMAGE_SERVICES[compose_name]:
            env = programs[name].environment
            assert env["TRITON_CACHE_DIR"] == str(cache / "triton"), name
            assert env["TORCH_EXTENSIONS_DIR"] == str(cache / "torch_extensions"), name


def test_compose_layout_of_the_8_gpu_node(gpu_env, tmp_path: Path):
    project = Project([ROOT / "compose.yaml"], env_files=[], environ=gpu_env)
    t0, t1, tr = (project.service(n) for n in ("teacher-0", "teacher-1", "trainer"))
    assert t0.command[t0.command.index("--device-id") + 1] == "6"
    assert t1.command[t1.command.index("--device-id") + 1] == "7"
    assert tr.command[:7] == ["torchrun", "--standalone", "--nproc-per-node", "6",
                              "--max-restarts", "3", "-m"]  # elastic restarts resume
    for svc in (t0, t1, tr):
        raw = svc.raw
        assert raw["network_mode"] == "host" and raw["ipc"] == "host"
        assert raw["ulimits"]["memlock"] == -1
        (dev,) = raw["deploy"]["resources"]["reservations"]["devices"]
        assert dev["count"] == "all" and dev["capabilities"] == ["gpu"]
        assert svc.command[svc.command.index("--link.trainers_per_group") + 1] == "3"
        assert svc.environment["NCCL_NVLS_ENABLE"] == "0"
    assert tr.depends_on == {"teacher-0": "service_healthy", "teacher-1": "service_healthy"}
    assert t0.healthcheck and "9400/healthz" in t0.healthcheck.test[-1]
    assert t1.healthcheck and "9401/healthz" in t1.healthcheck.test[-1]
    assert t0.restart == "unless-stopped"
    graf = project.raw("grafana")["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert graf.startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_runner_overrides_for_demo_and_benchmarks(tmp_path: Path, gpu_env):
    """--env, --services, --extra-args: how make demo and GPU runs pick and tune services."""
    conf = tmp_path / "run" / "supervisord.conf"
    args = ["render", "-f", str(ROOT / "compose.yaml"), "--run-dir", str(tmp_path / "run"),
            "--env-file", str(write_env(tmp_path / "e.env", gpu_env)),
            "--env", "TEACHER_0_GPU=1", "--env", "TRAINER_NPROC=1",
            "--services", "trainer", "--extra-args", "trainer=--train.steps 20",
            "--extra-args", "teacher-0=--teacher.max_batch_tokens 4096"]
    assert runner_main(args) == 0
    programs = supervisor_programs(conf)
    assert set(programs) == {"teacher-0", "teacher-1", "trainer", "stop-on-fatal"}
    t0 = shlex.split(programs["teacher-0"].command)
    assert t0[t0.index("--device-id") + 1] == "1"
    assert t0[-2:] == ["--teacher.max_batch_tokens", "4096"]
    tr = shlex.split(programs["trainer"].command)
    assert tr[3] == "1" and tr[-2:] == ["--train.steps", "20"]
    assert programs["trainer"].environment["NCCL_DEBUG"] == "INFO"
    assert runner_main(args[:-4] + ["--no-deps"]) == 0
    assert set(supervisor_programs(conf)) == {"trainer", "stop-on-fatal"}


# --------------------------------------------------------------------------- make up refusal
@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A copy of the deployment files in a scratch project (so a real .env is never used)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("compose.yaml", "compose.demo.yaml", "deploy.mk", ".env.example"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "deploy", proj / "deploy")
    shutil.copytree(ROOT / "configs", proj / "configs")
    return proj


def _make(proj: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(["make", "--no-print-directory", "-f", "deploy.mk", *targets,
                           f"RUNNER={sys.executable} -m services.runner",
                           "COMPOSE=echo docker compose"],
                          cwd=proj, env=env, capture_output=True, text=True, timeout=120)


def test_make_up_refuses_without_env_file(project_copy: Path):
    done = _make(project_copy, "up")
    assert done.returncode != 0
    assert ".env is missing" in done.stderr and "cp .env.example .env" in done.stderr
    assert "docker compose" not in done.stdout


def test_make_up_refuses_when_models_dir_lacks_the_teacher(project_copy: Path, gpu_env):
    env = dict(gpu_env, TEACHER_MODEL="Not-There")
    write_env(project_copy / ".env", env)
    done = _make(project_copy, "up")
    assert done.returncode != 0
    assert "Not-There has no config.json" in done.stderr and "MODELS_DIR" in done.stderr
    assert "docker compose" not in done.stdout


def test_make_up_refuses_without_grafana_password(project_copy: Path, gpu_env):
    env = dict(gpu_env)
    env["GRAFANA_ADMIN_PASSWORD"] = ""
    write_env(project_copy / ".env", env)
    done = _make(project_copy, "up")
    assert done.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in done.stderr


def test_make_up_local_refuses_without_env_file(project_copy: Path):
    done = _make(project_copy, "up-local")
    assert done.returncode != 0 and "cp .env.example .env" in done.stderr
    assert not (project_copy / "runs").exists()


def test_make_up_passes_its_checks_then_calls_compose(project_copy: Path, gpu_env):
    write_env(project_copy / ".env", gpu_env)
    done = _make(project_copy, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    # One build of the image the three services share, then up (compose would build it thrice).
    lines = done.stdout.splitlines()
    build = lines.index("docker compose -f compose.yaml build trainer")
    assert lines.index("docker compose -f compose.yaml up -d") > build


def test_check_for_docker_does_not_need_the_programs_on_this_host(project_copy: Path, gpu_env,
                                                                  monkeypatch):
    """make up on a GPU node: the host has no torchrun or prometheus, the image has."""
    import services.runner.render as render

    monkeypatch.setattr(render, "local_path_env", lambda *a: "/nonexistent")
    write_env(project_copy / ".env", gpu_env)
    assert runner_main(["check", "-f", str(project_copy / "compose.yaml"),
                        "--require-env-file"]) == 0
    with pytest.raises(ComposeError, match="is not on PATH"):
        build_plan(Project([project_copy / "compose.yaml"], environ={}))


def test_render_does_not_need_the_conf_to_be_started(tmp_path: Path, gpu_env):
    project = Project([ROOT / "compose.demo.yaml"], env_files=[], environ={})
    text = render_conf(build_plan(project, run_dir=tmp_path / "r"))
    assert "[program:teacher]" in text and "[eventlistener:stop-on-fatal]" in text


def test_env_example_documents_every_variable_compose_uses():
    """.env.example parses as compose's dotenv and names every variable of compose.yaml."""
    text = (ROOT / ".env.example").read_text()
    values = parse_dotenv(text, {}.get)
    documented = set(values) | set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "compose.yaml").read_text()))
    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", (ROOT / "compose.yaml").read_text()))
    assert required <= set(values), "required variables must be uncommented in .env.example"
    assert values["GRAFANA_ADMIN_PASSWORD"] == "", "no default password"
