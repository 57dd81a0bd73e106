"""benchmarks/device_run.sh cuts each step's limit to what is left of the device call.

A device call killed at its own limit brings nothing back and loses its machine (the files
outside the repository, the GGUF assembled there); so a step's ``timeout`` must end, with the
teardown's reserve, before the call does. ``PYTHON=true`` makes the ``imports`` step a no-op:
these tests read only the script's own lines.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_run(tmp_path: Path, started_ago: int, step: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON="true", OUT=str(tmp_path / "out"),
               CALL_STARTED=str(int(time.time()) - started_ago), CALL_LIMIT="600",
               CALL_RESERVE="45")
    return subprocess.run(["bash", "benchmarks/device_run.sh", step], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_step_limit_is_cut_to_the_time_left_in_the_call(tmp_path: Path) -> None:
    run = device_run(tmp_path, started_ago=500, step="imports:300")
    assert run.returncode == 0, run.stdout + run.stderr
    header = next(line for line in run.stdout.splitlines() if line.startswith("== imports ("))
    limit = int(header.split("limit ")[1].split("s)")[0])
    assert 50 <= limit <= 55, header      # 600 - 45 - 500, less the seconds this test took
    assert "cut to the" in run.stdout


def test_a_step_keeps_its_limit_when_the_call_has_room(tmp_path: Path) -> None:
    run = device_run(tmp_path, started_ago=0, step="imports:30")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== imports (limit 30s)" in run.stdout
    assert "cut to the" not in run.stdout


def test_no_step_starts_past_the_call_s_reserve(tmp_path: Path) -> None:
    run = device_run(tmp_path, started_ago=590, step="imports:300")
    assert run.returncode == 1
    assert "not run, no time left in the call" in run.stdout
    assert "== imports (limit" not in run.stdout
