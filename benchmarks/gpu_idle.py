"""Where a profiled step leaves the GPU idle, and what the host was doing meanwhile (issue 19).

The profile's "GPU busy" says how much of a step the device worked, not why it waited. Here
every gap between the kernels (the union of their intervals, and the stretch before the first
and after the last within the step) of at least ``min_us`` is put on the host op running at the
gap's midpoint: the deepest op (any thread) whose interval holds it, named with its top-level
op (``"DeepSpeedEngine.forward > aten::copy_"``); a gap in no op is Python between ops, named
after the op that ended last before it on the step's thread. Summed by name, the list says
which code the GPU waits on: a sync (``aten::_local_scalar_dense``), a kernel launcher's Python
(fla's), the optimizer's host loop, the data.
"""
from __future__ import annotations

import bisect
import collections
import re
from dataclasses import dataclass, field


@dataclass
class HostOp:
    """A host op of the profile: name, interval (microseconds), thread, its child ops."""

    name: str
    start: float
    end: float
    thread: int = 0
    children: list[HostOp] = field(default_factory=list)


def gaps(kernels: list[tuple[float, float]], start: float, end: float,
         min_us: float) -> list[tuple[float, float]]:
    """The idle stretches of at least ``min_us`` within [start, end] around ``kernels``."""
    out, reach = [], start
    for k0, k1 in sorted(kernels):
        if k0 - reach >= min_us:
            out.append((reach, k0))
        reach = max(reach, k1)
    if end - reach >= min_us:
        out.append((reach, end))
    return out


def _deepest(tops: list[HostOp], starts: list[float], t: float) -> list[HostOp] | None:
    """The chain of ops (top-level first) that holds time ``t`` on one thread, or None."""
    i = bisect.bisect_right(starts, t) - 1
    if i < 0 or tops[i].end < t:
        return None
    chain = [tops[i]]
    while True:
        inner = [c for c in chain[-1].children if c.start <= t <= c.end]
        if not inner:
            return chain
        chain.append(inner[0])


def idle_by_host_op(kernels: list[tuple[float, float]], top_ops: list[HostOp], start: float,
                    end: float, min_us: float = 20.0, n: int = 15) -> dict:
    """The step's idle GPU time and the ``n`` host ops it fell in: ``{"idle_ms", "gaps",
    "by_op": {name: [gaps, ms]}}`` (``top_ops``: the top-level ops of every thread)."""
    threads: dict[int, list[HostOp]] = collections.defaultdict(list)
    for op in sorted(top_ops, key=lambda o: o.start):
        threads[op.thread].append(op)
    # one thread's top-level ops do not overlap: their starts and their ends are both sorted
    starts = {t: [o.start for o in ops] for t, ops in threads.items()}
    ends = {t: [o.end for o in ops] for t, ops in threads.items()}
    total: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    found = gaps(kernels, start, end, min_us)
    for g0, g1 in found:
        mid = (g0 + g1) / 2
        chains = [c for t, ops in threads.items() if (c := _deepest(ops, starts[t], mid))]
        if chains:
            chain = max(chains, key=len)
            name = chain[0].name if len(chain) == 1 else f"{chain[0].name} > {chain[-1].name}"
        else:
            ended = [ops[i - 1] for t, ops in threads.items()
                     if (i := bisect.bisect_right(ends[t], mid))]
            last = max(ended, key=lambda o: o.end).name if ended else "the step's start"
            name = f"(Python between ops) after {last}"
        total[name[:120]][0] += 1
        total[name[:120]][1] += (g1 - g0) / 1e3
    top = sorted(total.items(), key=lambda kv: -kv[1][1])[:n]
    return {"idle_ms": round(sum(g1 - g0 for g0, g1 in found) / 1e3, 3), "gaps": len(found),
            "by_op": {name: [count, round(ms, 3)] for name, (count, ms) in top}}


def host_ops(events) -> list[HostOp]:
    """torch.profiler's CPU FunctionEvents as HostOp trees, their top-level ops returned (the
    profiler's own ``ProfilerStep#N`` range, which holds the whole step, left out: its children
    are the top level)."""
    made: dict[int, HostOp] = {}

    def step_range(e) -> bool:
        return e.name.startswith("ProfilerStep")

    def runtime_call(e) -> bool:  # cudaLaunchKernel & co.: linked to their op, not nested in it
        return re.match(r"cu[A-Z]|cuda", e.name) is not None

    def convert(e) -> HostOp:
        if id(e) not in made:
            made[id(e)] = HostOp(e.name, e.time_range.start, e.time_range.end, e.thread,
                                 [convert(c) for c in sorted(e.cpu_children,
                                                             key=lambda c: c.time_range.start)])
        return made[id(e)]

    return [convert(e) for e in events if not step_range(e) and not runtime_call(e) and
            (e.cpu_parent is None or step_range(e.cpu_parent))]
