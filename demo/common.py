"""What every part of ``make demo`` (``python -m demo``) shares.

The repository's paths,
the demo's compose file, stage configs and teacher name, the one-paragraph
:class:`DemoError`, and how the demo talks: :func:`say`, :func:`step_title`, :func:`run` for
commands, :func:`quiet_transformers` for Hugging Face's progress bars.
"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMPOSE = ROOT / "compose.demo.yaml"
CONFIGS = {"align": "configs/demo_align.yaml", "kd": "configs/demo_kd.yaml"}
TEACHER_NAME = "tiny-llama"


class DemoError(RuntimeError):
    """A failure reported as one paragraph (what went wrong, where to look), exit status 1."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step_title(text: str) -> None:
    say(f"\n==> {text}")


def run(cmd: list[str], quiet: bool = False, env: dict[str, str] | None = None,
        what: str | None = None) -> subprocess.CompletedProcess:
    """Run a command in the repository; its output is shown unless ``quiet``."""
    say(f"$ {shlex.join(str(c) for c in cmd)}")
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None, check=False)
    if done.returncode != 0:
        tail = ("\n" + "\n".join(done.stdout.splitlines()[-30:])) if quiet and done.stdout else ""
        raise DemoError(f"{what or cmd[0]} failed (exit status {done.returncode}){tail}")
    return done


def quiet_transformers() -> None:
    """No progress bars for loading/saving tiny checkpoints in the demo's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
