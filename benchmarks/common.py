"""What several benchmarks share: the repository's root, the environment their child services
run in, and the teacher's health wait."""
from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER_PORT, TRAINER_PORT = 19400, 19500


def service_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH (child services import shared/)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until the teacher started as ``proc`` answers /healthz on ``port``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("teacher exited during start-up")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("teacher not healthy in time")
