"""Host memory of CPU training: glibc malloc's mmap threshold.

Why: glibc serves a large block (over its mmap threshold, 128 KiB at start) with its own mmap
and returns it to the kernel when freed, but every such free also raises the threshold (up to
32 MiB on 64-bit), so after the first training step the activations of a CPU step come from the
heap, and the heap keeps what was freed resident. Measured (benchmarks/bench_cpu_memory.py, an
all-RWKV-7 SmolLM2-135M-shaped student, align 1 x 128 tokens): 2,124 MiB peak RSS with the
adaptive threshold, 1,731 MiB with it fixed at 128 KiB (docs/student.md, "CPU memory").

What: ``fix_mmap_threshold`` sets the threshold once (``mallopt(M_MMAP_THRESHOLD, ...)``, which
also turns the adaptive raising off), what ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment
does at start-up. The trainer calls it on the CPU when ``train.cpu_malloc`` is ``fixed``. Not by
default: every block over 128 KiB is then a fresh mapping whose pages fault in again, and the
same align steps ran at 0.39x the speed (26.9 against 69.2 tokens/s, 2026-12-01).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it was applied. False where
    the C library is not glibc, or where the environment already sets
    ``MALLOC_MMAP_THRESHOLD_`` (the user's choice wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
