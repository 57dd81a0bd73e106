"""shared/host_memory.py: with glibc's mmap threshold fixed, the memory a CPU step frees goes
back to the kernel; with glibc's adaptive threshold it stays resident (what the trainer on CPU
avoids). Each case runs in a fresh interpreter: the threshold is process-wide."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from pathlib import Path
import torch

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    from shared.host_memory import fix_mmap_threshold
    assert fix_mmap_threshold()
torch.ones(10)
before = rss()
for _ in range(3):  # what a step's activations do: large blocks allocated, touched, freed
    x, y = torch.ones(4 * 2**20), torch.ones(2 * 2**20)  # 16 and 8 MiB
    del x, y
print((rss() - before) / 2**20)
"""


def retained_mib(malloc: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, malloc], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_a_fixed_threshold_returns_freed_blocks_and_the_adaptive_one_keeps_them() -> None:
    assert retained_mib("adaptive") >= 16   # glibc raised its threshold: the heap kept them
    assert retained_mib("fixed") < 4


def test_the_environment_s_threshold_wins(monkeypatch) -> None:
    from shared.host_memory import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
