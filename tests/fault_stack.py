"""The fault suite's stack: compose.demo.yaml under ``python -m services.runner`` (real
supervisord), with two teachers and a trainer of two ranks, and the means to hurt it.

One trainer per teacher group (``link.trainers_per_group 1``, groups 0 and 1, so a second
teacher service ``teacher-1`` next to compose.demo.yaml's ``teacher``): a teacher that
batches several trainers' requests pads them to a common length, and on CPU the rounding of
a row then depends on which rows it was batched with, i.e. on timing. With one trainer per
group every forward holds exactly one request, so the answers, and the final student, are
bit-identical from run to run (docs/deploy.md, "What survives what").

The shipped compose.demo.yaml runs as it is (its trainer command, with ``torchrun
--max-restarts``); an override file (a second ``-f``, as compose merges it) adds
``teacher-1`` and moves the healthchecks to free ports, and ``--extra-args`` moves the
metrics ports and sets one trainer per group, so the suite never needs the demo's fixed ports.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from conftest import ROOT, free_port, process_state, torchrun_workers, wait_for
from shared.metrics import scrape

COMPOSE_DEMO = ROOT / "compose.demo.yaml"
TEACHERS = ("teacher", "teacher-1")  # groups 0 and 1; trainer rank r talks to group r


def _healthcheck(port: int) -> list[str]:
    return ["CMD", "python", "-c", "import urllib.request; "
            f"urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=5)"]


def write_override(path: Path, teacher_port: int) -> Path:
    """compose override: a teacher for group 1 (a copy of the demo's teacher), healthchecks
    on this stack's ports, and the trainer waiting for both teachers."""
    demo = yaml.safe_load(COMPOSE_DEMO.read_text())  # anchors and merge keys resolved
    second = copy.deepcopy(demo["services"]["teacher"])
    cmd = second["command"]
    cmd[cmd.index("--group") + 1] = "1"
    second["healthcheck"]["test"] = _healthcheck(teacher_port + 1)
    path.write_text(yaml.safe_dump({"services": {
        "teacher": {"healthcheck": {"test": _healthcheck(teacher_port)}},
        "teacher-1": second,
        "trainer": {"depends_on": {"teacher-1": {"condition": "service_healthy"}}},
    }}))
    return path


@dataclass
class FaultStack:
    """One stack: its runner directory, its output directory, its ports."""

    dir: Path
    models: Path        # MODELS_DIR (holds the teacher TEACHER_MODEL)
    teacher_model: str
    data: Path          # DATA_DIR
    runs: Path          # RUNS_DIR
    config: Path        # DISTILL_CONFIG
    run_name: str = "fault"

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.teacher_port = free_port()
        self.trainer_port = free_port()
        self.override = write_override(self.dir / "override.yaml", self.teacher_port)

    @property
    def out(self) -> Path:
        return self.runs / self.run_name

    def runner(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "services.runner", *args, "-f", str(COMPOSE_DEMO),
                "-f", str(self.override), "--run-dir", str(self.dir / "run"),
                "--env-file", os.devnull]

    def up(self) -> None:
        cmd = self.runner("up", "--services", "trainer", "--wait", "--timeout", "300")
        for key, value in (("MODELS_DIR", self.models), ("TEACHER_MODEL", self.teacher_model),
                           ("DATA_DIR", self.data), ("RUNS_DIR", self.runs),
                           ("DISTILL_CONFIG", self.config), ("RUN_NAME", self.run_name)):
            cmd += ["--env", f"{key}={value}"]
        teacher = f"--teacher.metrics_port {self.teacher_port} --link.trainers_per_group 1"
        cmd += ["--extra-args", f"teacher={teacher}", "--extra-args", f"teacher-1={teacher}",
                "--extra-args", f"trainer=--train.metrics_port {self.trainer_port} "
                "--link.trainers_per_group 1"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"runner up failed:\n{done.stdout}{done.stderr}\n{self.logs()}"

    def down(self) -> None:
        subprocess.run(self.runner("down"), cwd=ROOT, capture_output=True, timeout=300)

    def down_async(self) -> subprocess.Popen:
        """``runner down`` in the background (the caller waits for it)."""
        return subprocess.Popen(self.runner("down"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultStack]:
        """``up``; always ``down`` at the end."""
        try:
            self.up()
            yield self
        finally:
            self.down()

    # ---------------------------------------------------------------- supervisord
    def info(self, program: str) -> dict[str, Any]:
        from services.runner.cli import rpc_proxy
        from services.runner.render import socket_path

        return rpc_proxy(socket_path(self.dir / "run")).supervisor.getProcessInfo(program)

    def pid(self, program: str) -> int:
        """PID of a RUNNING program (waits for a restarted one)."""
        holder: dict[str, int] = {}

        def running() -> bool:
            info = self.info(program)
            holder["pid"] = info["pid"]
            return info["statename"] == "RUNNING" and info["pid"] > 0

        wait_for(running, 120, f"{program} running")
        return holder["pid"]

    def workers(self) -> dict[int, int]:
        """{rank: pid} of the trainer's worker processes (torchrun's children)."""
        return torchrun_workers(self.pid("trainer"))

    def wait_workers(self) -> dict[int, int]:
        holder: dict[str, dict[int, int]] = {}

        def both() -> bool:
            holder["w"] = self.workers()
            return len(holder["w"]) == 2
        wait_for(both, 120, "both trainer workers")
        return holder["w"]

    def wait_exit(self, timeout: float = 420) -> dict[str, Any]:
        """Wait until the trainer program stopped; its supervisord info."""
        holder: dict[str, Any] = {}

        def stopped() -> bool:
            holder["info"] = self.info("trainer")
            return holder["info"]["statename"] in ("EXITED", "FATAL", "STOPPED", "BACKOFF")
        try:
            wait_for(stopped, timeout, "the trainer to finish")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None
        return holder["info"]

    def logs(self, tail: int = 6000) -> str:
        out = []
        for name in ("trainer", *TEACHERS):
            path = self.dir / "run" / "logs" / f"{name}.log"
            if path.is_file():
                out.append(f"--- {name}.log\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def log(self, program: str = "trainer") -> str:
        return (self.dir / "run" / "logs" / f"{program}.log").read_text(errors="replace")

    # ---------------------------------------------------------------- the run's outputs
    def steps(self, rank: int = 0) -> list[dict]:
        """Complete records of the rank's steps file (a line being written is left out)."""
        path = self.out / f"steps-rank{rank}.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().split("\n"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def last_step(self, rank: int = 0) -> int:
        records = self.steps(rank)
        return records[-1]["step"] if records else 0

    def wait_step(self, step: int, rank: int = 0, timeout: float = 300) -> int:
        """Wait until ``rank`` recorded ``step``; the last recorded step."""
        try:
            wait_for(lambda: self.last_step(rank) >= step, timeout, f"rank {rank} at step {step}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None
        return self.last_step(rank)

    def latest_checkpoint(self) -> int:
        pointer = self.out / "checkpoints" / "latest"
        return int(pointer.read_text().split("-")[1]) if pointer.is_file() else 0

    def metric(self, name: str) -> float:
        """A trainer metric summed over both ranks (0 for a rank that does not answer)."""
        total = 0.0
        for rank in (0, 1):
            try:
                values = scrape(self.trainer_port + rank, timeout=2)
            except OSError:
                continue
            total += sum(v for k, v in values.items() if k.split("{")[0] == name)
        return total


def signal_pending(pid: int, sig: signal.Signals) -> bool:
    """Whether ``sig`` waits to be delivered to ``pid`` (a stopped process keeps it pending)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (int(sig) - 1)
    return any(int(line.split()[1], 16) & bit for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:")))


def signal_process(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)
    if sig == signal.SIGKILL:  # gone before the caller looks at what it left behind
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process_state(pid) in (None, "Z"):
                return
            time.sleep(0.01)
