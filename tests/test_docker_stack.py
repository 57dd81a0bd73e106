"""The stack in Docker on CPU: real images, real containers, real Compose (make up-cpu's path).

The engine (Debian's docker.io), the Compose plugin and dockerd are installed and started by
deploy/docker_engine.py when missing, and the dockerd started here is stopped at the end (an
engine that already answered is left alone). The images are built offline: Debian bases and a
wheelhouse from deploy/docker_images.py (cached, keyed by their inputs), then docker/Dockerfile's
CPU flavour through `docker compose build` (Docker's layer cache). Then compose.yaml +
compose.cpu.yaml run under their own project name with a tiny teacher:

1. the kd stage runs to exit 0; Prometheus (Debian's, in its container) saw teachers and
   trainer ranks up; `docker compose logs` shows the trainers joining each teacher;
2. a teacher killed by SIGKILL: its container exits, its restart policy brings it back and the
   trainer finishes;
3. `docker stop` of the trainer: supervisord stops torchrun's ranks, which checkpoint and exit;
4. `make down` leaves no container behind.

Skips, with the reason, only where Docker cannot be installed or started, or the base images
cannot be built (no root).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port, wait_for
from deploy import docker_engine, docker_images

ROOT = Path(__file__).resolve().parents[1]

PROJECT = "llama2rwkv-test"
FILES = ["--env-file", "deploy/cpu.env", "-f", "compose.yaml", "-f", "compose.cpu.yaml"]
SERVICE_PORTS = {"teacher-0": 9400, "teacher-1": 9401, "trainer": 9500}  # trainer: 9500 + rank
RANKS = 2
# Removed at the end; kernel-cache stays, so the next run need not compile DeepSpeed's op again.
RUN_VOLUMES = ("rendezvous", "prometheus-data")

# SIGKILL to the teacher program inside its container (by exact argv, never this script).
KILL_TEACHER = """
import os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if argv[1:3] == [b"-m", b"services.teacher"]:
        os.kill(int(pid), signal.SIGKILL)
        print(pid)
"""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class CpuStack:
    """compose.yaml + compose.cpu.yaml under the test's project name, and what a test asks of it."""

    def __init__(self, env: dict[str, str], runs: Path, prometheus: str) -> None:
        self.env, self.runs, self.prometheus_url = env, runs, f"http://{prometheus}"
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        """Progress with the time since set-up (shown with -s, and on a failure)."""
        print(f"[{time.monotonic() - self.t0:6.1f} s] {text}", flush=True)

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        done = subprocess.run(["docker", "compose", *FILES, *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def up(self, run: str, **train: object) -> None:
        """Start the stack with configs/demo_kd.yaml + ``train`` overrides as run ``run``."""
        config = yaml.safe_load((ROOT / "configs" / "demo_kd.yaml").read_text())
        config["train"].update(train)
        (self.runs / f"{run}.yaml").write_text(yaml.safe_dump(config))
        self.env.update(DISTILL_CONFIG=f"/runs/{run}.yaml", RUN_NAME=run)
        self.note(f"up: run {run}")
        self.compose("up", "-d")
        self.note(f"up: run {run}: teachers healthy, trainer started")

    def inspect(self, service: str) -> dict:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        done = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True,
                              check=True, timeout=60)
        return json.loads(done.stdout)[0]

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service).stdout

    def wait_exit(self, service: str, timeout: float) -> int:
        state: dict = {}

        def exited() -> bool:
            state.update(self.inspect(service)["State"])
            return state["Status"] == "exited"

        try:
            wait_for(exited, timeout, f"{service} to exit")
        except AssertionError as err:
            raise AssertionError(f"{err}; its log ends:\n{self.logs(service)[-4000:]}") from None
        self.note(f"{service} exited {state['ExitCode']}")
        return int(state["ExitCode"])

    def wait_log(self, service: str, pattern: str, timeout: float) -> re.Match:
        found: list[re.Match] = []

        def logged() -> bool:
            if self.inspect(service)["State"]["Status"] == "exited":
                raise AssertionError(f"{service} exited before logging {pattern!r}:\n"
                                     f"{self.logs(service)[-4000:]}")
            match = re.search(pattern, self.logs(service))
            if match:
                found.append(match)
            return bool(match)

        wait_for(logged, timeout, f"{service} to log {pattern!r}")
        self.note(f"{service} logged {pattern!r}")
        return found[0]

    def query(self, promql: str) -> dict[str, float]:
        """instance -> value of an instant PromQL query to the stack's Prometheus."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return {r["metric"]["instance"]: float(r["value"][1]) for r in body["data"]["result"]}


@pytest.fixture(scope="module")
def engine():
    try:
        found = docker_engine.ensure(sys.executable)
    except docker_engine.DockerUnavailable as err:
        pytest.skip(f"Docker cannot be installed or started here: {err}")
    yield found
    if found.started_pid:
        docker_engine.stop(found.started_pid)


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    busy = [f"{svc} {port}" for svc, port in SERVICE_PORTS.items() for port in
            ([port] if svc != "trainer" else range(port, port + RANKS)) if _port_busy(port)]
    if busy:
        pytest.fail(f"ports in use: {', '.join(busy)} (compose.yaml's fixed metrics ports): "
                    "another stack runs here; stop it first (make down, make demo-down)")
    if os.geteuid() != 0 and docker_images.missing_bases():
        pytest.skip(f"the Debian base images {docker_images.missing_bases()} are missing and "
                    "building them (debootstrap, chroot) needs root")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    images = subprocess.run([sys.executable, "-m", "deploy.docker_images"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert images.returncode == 0, images.stdout[-3000:] + images.stderr[-3000:]
    timings["bases+wheelhouse"] = time.monotonic() - t0

    from demo.prepare import prepare

    work = tmp_path_factory.mktemp("cpu-stack")
    teacher, _, data = prepare(work, teacher_steps=0, fresh=False)
    runs = work / "runs"
    runs.mkdir()
    env = dict(os.environ, COMPOSE_PROJECT_NAME=PROJECT, MODELS_DIR=str(teacher.parent),
               TEACHER_MODEL=teacher.name, DATA_DIR=str(data), RUNS_DIR=str(runs),
               PROMETHEUS_LISTEN=f"127.0.0.1:{free_port()}", NCCL_NVLS_ENABLE="0",
               IMAGE=f"{PROJECT}:latest")  # never replaces the user's llama2rwkv:latest
    cpu = CpuStack(env, runs, env["PROMETHEUS_LISTEN"])
    t1 = time.monotonic()
    cpu.compose("build", "trainer", timeout=1200)
    timings["image build"] = time.monotonic() - t1
    print(f"container test set-up: {timings}")
    try:
        yield cpu
    finally:
        cpu.compose("down", "--remove-orphans", check=False)
        for volume in RUN_VOLUMES:
            subprocess.run(["docker", "volume", "rm", "-f", f"{PROJECT}_{volume}"],
                           capture_output=True, check=False, timeout=60)


def test_kd_stage_runs_to_exit_0_watched_by_prometheus(stack: CpuStack):
    stack.up("kd", steps=60, val_every=30, log_every=20)
    ps = {s["Service"]: s for s in map(json.loads, stack.compose(
        "ps", "--format", "json").stdout.splitlines())}
    assert {"teacher-0", "teacher-1", "trainer", "prometheus"} <= set(ps), ps
    assert "grafana" not in ps  # no image offline: compose.cpu.yaml leaves it out
    for teacher in ("teacher-0", "teacher-1"):
        assert ps[teacher]["Health"] == "healthy", ps[teacher]  # up -d waited for it

    assert stack.wait_exit("trainer", 600) == 0
    log = stack.logs("trainer")
    assert "done after 60 steps" in log and (stack.runs / "kd" / "summary.json").is_file()

    # Prometheus, Debian's package in its own container, scraped every service.
    teachers = stack.query('up{job="teacher"}')
    assert teachers == {"127.0.0.1:9400": 1.0, "127.0.0.1:9401": 1.0}, teachers
    ranks = stack.query('max_over_time(up{job="trainer"}[15m])')
    assert ranks == {f"127.0.0.1:{9500 + r}": 1.0 for r in range(RANKS)}, ranks
    steps = stack.query("max_over_time(distill_trainer_steps_total[15m])")
    assert steps and all(v > 0 for v in steps.values()), steps

    # Each teacher's log shows its trainer joining (one rank per group).
    for group, service in enumerate(("teacher-0", "teacher-1")):
        assert re.search(rf"group {group}: 1 trainers joined generation \d+",
                         stack.logs(service)), service


def test_crashed_teacher_is_restarted_and_the_trainer_finishes(stack: CpuStack):
    """A teacher that dies (SIGKILL, as from the OOM killer) ends its container, which Docker
    restarts by its policy (`restart: unless-stopped`); the trainer rejoins and finishes.

    Not `docker kill`: Docker counts that as a manual stop and never restarts the container,
    whatever its policy (docs/deploy.md)."""
    # 120 steps: ~30 s of steps left after step 20 here, while the kill takes a second or two
    # (the trainer waits for its teacher from then on); 400 steps only made it run 2 min longer
    stack.up("crash", steps=120, val_every=0, log_every=10)
    stack.wait_log("trainer", r"step 20/120", 300)
    before = stack.inspect("teacher-0")
    killed = subprocess.run(["docker", "exec", before["Id"], "python", "-c", KILL_TEACHER],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0 and killed.stdout.strip(), killed.stdout + killed.stderr
    assert "done after" not in stack.logs("trainer"), "the trainer finished before the kill"

    def back() -> bool:
        state = stack.inspect("teacher-0")
        return (state["RestartCount"] > before["RestartCount"] and state["State"]["Running"]
                and state["State"].get("Health", {}).get("Status") == "healthy")

    wait_for(back, 180, "teacher-0 to be restarted by its policy and healthy again")
    code = stack.wait_exit("trainer", 600)
    assert code == 0, f"the trainer exited {code} after the teacher's restart:\n" \
                      f"{stack.logs('trainer')[-4000:]}"
    assert "done after 120 steps" in stack.logs("trainer")
    joins = re.findall(r"group 0: 1 trainers joined generation (\d+)", stack.logs("teacher-0"))
    assert len(joins) >= 2, f"the trainer did not rejoin the restarted teacher: {joins}"


def test_docker_stop_stops_torchrun_ranks_cleanly(stack: CpuStack):
    stack.up("stop", steps=100000, val_every=0, log_every=10, checkpoint_every=100000)
    stack.wait_log("trainer", r"step 20/100000", 300)
    container = stack.inspect("trainer")["Id"]
    subprocess.run(["docker", "stop", container], check=True, capture_output=True, timeout=330)
    state = stack.inspect("trainer")["State"]
    log = stack.logs("trainer")
    assert state["ExitCode"] == 0, f"exit code {state['ExitCode']}:\n{log[-4000:]}"
    # supervisord sent SIGTERM to the process group: every rank finished its step, checkpointed
    # and exited (no SIGKILL after STOP_WAIT_SECS).
    stopped = re.findall(r"trainer\[(\d)\] INFO stop requested: checkpointed at step (\d+)", log)
    assert {int(r) for r, _ in stopped} == set(range(RANKS)), log[-4000:]
    step = int(stopped[0][1])
    assert (stack.runs / "stop" / "checkpoints" / f"step-{step}").is_dir()
    supervisor_stop = re.findall(r"(?:WARN|INFO) stopped: service \((.*)\)", log)
    assert supervisor_stop and "SIGKILL" not in supervisor_stop[0], supervisor_stop


def test_make_down_removes_the_containers(stack: CpuStack):
    done = subprocess.run(["make", "--no-print-directory", "down"], cwd=ROOT, env=stack.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    left = subprocess.run(["docker", "ps", "-a", "-q", "--filter",
                           f"label=com.docker.compose.project={PROJECT}"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert left == [], f"containers left after make down: {left}"
