"""Where a stage's start-up goes, phase by phase, up to its first step (issue 19: a stage took
~35 s to its first step on an H200 and nobody could say where they went).

The trainer marks the end of each phase; the first phase starts when the process did (the
kernel's start time of this process, so interpreter start-up and imports count too). The first
training step is a phase of its own: it pays for kernel compilation and autotuning.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("trainer")


def process_age_seconds() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0, so 'imports' is unknown)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


class StartupClock:
    """Durations of the named start-up phases, in the order they ended."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.monotonic() - process_age_seconds()

    def mark(self, phase: str) -> None:
        """``phase`` ended now: it took the time since the previous mark."""
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        return sum(self.phases.values())

    def report(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"start-up {self.total():.1f} s: {parts}"

    def as_dict(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.phases.items()}
