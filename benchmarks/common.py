"""What several benchmarks share: the repository's root, the environment their child services
run in, the teacher's health wait, and NAME='--section.key value' arguments."""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
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


def named_overrides(flag: str, example: str) -> Callable[[str], tuple[str, list[str]]]:
    """An argparse type for ``flag``'s NAME='--section.key value ...' values: (NAME, the words)."""
    def parse(text: str) -> tuple[str, list[str]]:
        name, sep, overrides = text.partition("=")
        if not sep or not name or not overrides.strip().startswith("--"):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: write NAME='--section.key value "
                                             f"...', e.g. {example}")
        return name, overrides.split()
    return parse
