"""benchmarks/gpu_idle.py: a profiled step's idle GPU time, put on the host op it fell in."""
from __future__ import annotations

from types import SimpleNamespace

from benchmarks.gpu_idle import HostOp, gaps, host_ops, idle_by_host_op


def test_gaps_are_the_idle_stretches_around_the_kernels() -> None:
    kernels = [(10, 20), (15, 30), (60, 70), (71, 90)]  # overlapping, then a 1 us gap
    assert gaps(kernels, 0, 100, min_us=5) == [(0, 10), (30, 60), (90, 100)]
    assert gaps(kernels, 0, 100, min_us=20) == [(30, 60)]


def test_idle_time_goes_to_the_deepest_op_holding_it() -> None:
    sync = HostOp("aten::_local_scalar_dense", 35, 55)
    forward = HostOp("DeepSpeedEngine.forward", 0, 58, thread=1,
                     children=[HostOp("aten::mm", 1, 9), HostOp("aten::item", 32, 56,
                                                                children=[sync])])
    backward = HostOp("ChunkBackward", 85, 99, thread=2)  # another thread: the autograd one
    kernels = [(2, 30), (60, 80)]
    out = idle_by_host_op(kernels, [forward, backward], 0, 100, min_us=1)
    assert out["gaps"] == 3 and out["idle_ms"] == (2 + 30 + 20) / 1e3
    assert out["by_op"] == {  # most time first
        "DeepSpeedEngine.forward > aten::_local_scalar_dense": [1, 0.03],  # 30-60, mid 45
        "ChunkBackward": [1, 0.02],                                        # 80-100, mid 90
        "DeepSpeedEngine.forward > aten::mm": [1, 0.002],                  # 0-2, mid 1
    }


def test_a_gap_in_no_op_is_python_after_the_op_that_ended_last() -> None:
    ops = [HostOp("aten::add", 0, 10), HostOp("aten::mul", 40, 50)]
    out = idle_by_host_op([(0, 10), (40, 50)], ops, 0, 50, min_us=1)
    assert out["by_op"] == {"(Python between ops) after aten::add": [1, 0.03]}


def test_the_profilers_tree_loses_its_step_range_and_runtime_calls() -> None:
    def event(name, start, end, parent=None):
        e = SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                            thread=7, cpu_parent=parent, cpu_children=[])
        if parent is not None:
            parent.cpu_children.append(e)
        return e

    step = event("ProfilerStep#1", 0, 100)
    mm = event("aten::mm", 10, 20, step)
    event("cudaLaunchKernel", 12, 13)        # linked to aten::mm, no parent of its own
    event("aten::view", 14, 15, mm)
    loose = event("aten::add", 30, 40)
    tops = host_ops([step, mm, loose, *mm.cpu_children])
    assert [(t.name, [c.name for c in t.children]) for t in tops] == [
        ("aten::mm", ["aten::view"]), ("aten::add", [])]
