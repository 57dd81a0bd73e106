"""benchmarks/step_arms.py's profiled step: the figures bench_steps prints come from its events."""
from __future__ import annotations

import torch

from benchmarks.step_arms import busy_seconds, profile, top_kernels


def test_the_profiled_step_records_the_ops_of_that_step_only() -> None:
    x = torch.randn(64, 64)
    calls = []

    def step() -> None:
        calls.append(1)
        (x @ x).relu().sum()

    result = profile(step, torch.device("cpu"))
    assert len(calls) == 2  # a warm-up step, then the profiled one
    # one step's ops: the warm-up's are not counted (2026-12-02 the events came back empty)
    assert result["top_aten"].get("aten::mm") == 1
    assert result["top_aten"].get("aten::relu") == 1
    assert result["host_self_cpu_s"] > 0 and result["kernels"] == 0


def test_busy_time_is_the_union_of_overlapping_intervals() -> None:
    # microseconds in, seconds out: [0, 10] and [5, 20] overlap, [30, 40] stands alone
    assert busy_seconds([(0, 10), (5, 20), (30, 40)]) == 30 / 1e6


def test_kernels_of_most_time_sum_their_launches() -> None:
    timed = [("gemm", 300.0), ("elementwise", 10.0), ("gemm", 200.0), ("reduce", 40.0)]
    assert top_kernels(timed, n=2) == {"gemm": [2, 0.5], "reduce": [1, 0.04]}
    assert list(top_kernels([("k" * 300, 1.0)])) == ["k" * 100]
