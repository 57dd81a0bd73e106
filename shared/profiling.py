"""torch.profiler over a window of steps, for the trainer (``train.profile_steps``) and the
teacher (``teacher.profile_batches``): a chrome trace (open in chrome://tracing or Perfetto) and
a table of the top kernels by device time, written when the window closes.

    profiler = StepProfiler("6-7", out_dir, "trainer-rank0")
    for step in ...:
        profiler.begin(step)      # step numbers start at 1
        ...
        profiler.end(step)
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def parse_window(spec: str) -> tuple[int, int] | None:
    """"6-7" -> (6, 7); "6" -> (6, 6); "" -> None."""
    if not spec:
        return None
    first, _, last = spec.partition("-")
    try:
        window = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"profile window {spec!r}: write FIRST-LAST step numbers, "
                         "e.g. 6-7") from None
    if window[0] < 1 or window[1] < window[0]:
        raise ValueError(f"profile window {spec!r}: steps count from 1 and FIRST <= LAST")
    return window


class StepProfiler:
    """Profiles steps ``window`` (inclusive); does nothing when the window is empty."""

    def __init__(self, window: str, out_dir: str | Path, name: str) -> None:
        self.window = parse_window(window)
        self.out_dir = Path(out_dir)
        self.name = name
        self._prof: torch.profiler.profile | None = None

    def begin(self, step: int) -> None:
        if self.window is None or step != self.window[0] or self._prof is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self._prof.__enter__()

    def end(self, step: int) -> None:
        if self._prof is None or step < self.window[1]:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"{self.name}.trace.json"
        prof.export_chrome_trace(f"{trace}.gz")  # torch gzips a path ending in .gz
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        (self.out_dir / f"{self.name}.kernels.txt").write_text(table)
        log.info("profile of steps %d-%d written to %s.gz", *self.window, trace)


class StallWatch:
    """Logs the Python stack of every thread once a step has run ``seconds`` (0 = off): what a
    stalled step waits on (a compile, the data, the teacher, a lock), while it stalls.

    A watcher thread reads ``sys._current_frames()`` under the GIL (faulthandler's watchdog
    reads other threads' frames without it, and crashed a trainer so: SIGSEGV, 2026-12-03).

        watch = StallWatch(10.0, "trainer-rank0")
        watch.begin(step); ...; watch.end()
        watch.close()
    """

    def __init__(self, seconds: float, name: str) -> None:
        import threading

        self.seconds, self.name = seconds, name
        self._lock = threading.Lock()
        self._step: int | None = None
        self._started = 0.0
        self._done = threading.Event()
        self.dumps = 0
        self._thread = None
        if seconds > 0:
            self._thread = threading.Thread(target=self._watch, name=f"{name}-stall-watch",
                                            daemon=True)
            self._thread.start()

    def begin(self, step: int) -> None:
        import time

        with self._lock:
            self._step, self._started = step, time.monotonic()

    def end(self) -> None:
        with self._lock:
            self._step = None

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        import time

        dumped = None
        while not self._done.wait(min(max(self.seconds / 4, 0.005), 1.0)):
            with self._lock:
                step, started = self._step, self._started
            if step is None or step == dumped or time.monotonic() - started < self.seconds:
                continue
            dumped = step
            self.dumps += 1
            log.warning("%s: step %d has run %.1f s (over %g s): the stacks it is in\n%s",
                        self.name, step, time.monotonic() - started, self.seconds,
                        thread_stacks())


def thread_stacks() -> str:
    """Every Python thread's stack but the caller's, innermost call last."""
    import sys
    import threading
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    return "\n".join(f"--- thread {names.get(ident, ident)} ---\n"
                     + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items() if ident != me)
