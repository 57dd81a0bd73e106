"""The demo's stack: Prometheus and ports for it, the runner's ``up``/``down``, the trainer's log.

:class:`Stack` drives compose.demo.yaml through ``python -m services.runner`` in
``RUN_DIR/stack``, one ``up`` per stage; :func:`watch_trainer` follows a stage's trainer until
it exits and shows the lines worth seeing. :func:`ensure_prometheus` finds (or installs)
Debian's Prometheus, :func:`port_free`/:func:`free_port` choose its port.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo.common import COMPOSE, CONFIGS, ROOT, TEACHER_NAME, DemoError, run, say, step_title

# Fixed by compose.demo.yaml and deploy/prometheus/prometheus.demo.yml.
SERVICE_PORTS = {"teacher": [9400], "trainer": [9500, 9501]}


def ensure_prometheus(install: bool) -> str | None:
    """Path of Debian's prometheus; installed with apt-get when allowed and possible."""
    found = shutil.which("prometheus")
    if found or not install:
        return found
    step_title("Installing Prometheus (Debian package prometheus)")
    if shutil.which("apt-get") is None:
        return None
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return None
        sudo = ["sudo", "-n"]  # never prompt: the demo must not hang on a password
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (sudo + ["apt-get", "update", "-qq"],
                sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "prometheus"]):
        say(f"$ {shlex.join(cmd)}")
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            return None
    return shutil.which("prometheus")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """compose.demo.yaml under the runner, in run_dir/stack."""

    def __init__(self, run_dir: Path, models: Path, data: Path, runs: Path,
                 prometheus_listen: str | None, teacher_name: str = TEACHER_NAME,
                 configs: dict[str, str] | None = None) -> None:
        self.dir = run_dir / "stack"
        self.models, self.data, self.runs = models, data, runs
        self.teacher_name, self.configs = teacher_name, configs or CONFIGS
        self.prometheus_listen = prometheus_listen
        self.env = dict(os.environ)
        # Gloo over loopback: never depend on this machine's hostname resolving.
        self.env.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def runner(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "services.runner", *args, "-f", str(COMPOSE),
                "--run-dir", str(self.dir)]

    def up(self, stage: str, extra: list[str]) -> None:
        cmd = self.runner("up")
        for key, value in (("MODELS_DIR", self.models), ("DATA_DIR", self.data),
                           ("RUNS_DIR", self.runs), ("TEACHER_MODEL", self.teacher_name),
                           ("DISTILL_CONFIG", self.configs[stage]), ("RUN_NAME", stage)):
            cmd += ["--env", f"{key}={value}"]
        if self.prometheus_listen:
            cmd += ["--env", f"PROMETHEUS_LISTEN={self.prometheus_listen}"]
        cmd += ["--extra-args", "trainer=" + shlex.join(extra), "--wait"]
        run(cmd, env=self.env, what="runner up")

    def down(self) -> None:
        if (self.dir / "supervisord.conf").is_file():
            subprocess.run(self.runner("down"), cwd=ROOT, env=self.env, check=False)

    def alive(self) -> bool:
        from services.runner.render import socket_path
        from services.runner.supervisor_control import supervisord_alive

        return supervisord_alive(socket_path(self.dir))

    def trainer_state(self) -> dict[str, Any]:
        from services.runner.render import socket_path
        from services.runner.supervisor_control import rpc_proxy

        return rpc_proxy(socket_path(self.dir)).supervisor.getProcessInfo("trainer")

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"


INTERESTING = (" step ", "validation at", "done:", "training ", "student converted",
               "student loaded", "joined teacher", "ERROR", "Error", "Traceback")


def _show(stage: str, line: str) -> None:
    """Print a trainer log line worth seeing: rank 0's progress, anyone's errors."""
    if "trainer[" in line and "ERROR" not in line and \
            ("trainer[0]" not in line or " INFO " not in line):
        return
    if any(k in line for k in INTERESTING):
        text = line.split(" INFO ", 1)[-1] if " INFO " in line else line
        say(f"  {stage:5} | {text.rstrip()[:220]}")


def run_in_process(stage: str, config: str, teacher: Path, data: Path, out_dir: Path,
                   extra: list[str], timeout: float, log: Path) -> None:
    """One stage as a single trainer rank with the teacher in its process (link.mode
    in_process; the GPU flavour), under torchrun as the stack runs it; its log goes to ``log``
    and the lines worth seeing to the screen."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "1", "-m", "services.trainer", "--config", config, "--teacher.model_path",
           str(teacher), "--data.train_dir", str(data), "--train.output_dir", str(out_dir),
           *extra]
    say(f"$ {shlex.join(cmd)}")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0")
    deadline = time.monotonic() + timeout
    with open(log, "a") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, errors="replace")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sink.write(line)
                for piece in line.split("\r"):
                    _show(stage, piece)
                if time.monotonic() > deadline:
                    raise DemoError(f"stage {stage} did not finish within {timeout:.0f} s; "
                                    f"see {log}")
        finally:
            if proc.poll() is None:
                proc.terminate()
            status = proc.wait()
    if status != 0:
        raise DemoError(f"the {stage} trainer exited with status {status}; its log: {log}")


def watch_trainer(stack: Stack, stage: str, timeout: float, offset: int = 0) -> None:
    """Follow the trainer's log from ``offset`` (supervisord appends every run of the
    program to one file) until it exits; raise unless it exited with status 0."""
    log = stack.log("trainer")
    pending = ""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}

    def follow() -> None:
        nonlocal offset, pending
        try:
            with open(log, errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except OSError:
            return
        lines = (pending + chunk).split("\n")
        pending = lines.pop()
        for line in lines:
            for piece in line.split("\r"):  # progress bars
                _show(stage, piece)

    while True:
        follow()
        try:
            state = stack.trainer_state()
        except Exception as err:  # noqa: BLE001 - supervisord gone: the listener stopped the stack
            follow()
            raise DemoError(f"the stack stopped during stage {stage} (see "
                            f"{stack.dir / 'exit-status.json'} and {stack.dir / 'logs'})") from err
        if state["statename"] in ("EXITED", "FATAL", "STOPPED", "BACKOFF"):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"stage {stage} did not finish within {timeout:.0f} s; see {log}")
        time.sleep(0.5)
    follow()
    if state["statename"] != "EXITED" or state["exitstatus"] != 0:
        raise DemoError(f"the {stage} trainer ended {state['statename']} with status "
                        f"{state.get('exitstatus')}; its log: {log}")
