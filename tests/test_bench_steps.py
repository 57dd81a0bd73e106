"""benchmarks/step_arms.py's profiled step: the figures bench_steps prints come from its events."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.step_arms import (
    RandomBatches,
    annotation,
    busy_seconds,
    kernel_kinds,
    profile,
    top_kernels,
)


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


def test_kernel_time_is_summed_by_kind_most_first() -> None:
    # names as the H200's profile shows them (cuBLAS, fla, inductor, ATen, our loss)
    timed = [("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 900.0),
             ("chunk_dplr_bwd_kernel_intra_tensorcore", 500.0),
             ("triton_poi_fused_add_mul_sigmoid_0", 300.0),
             ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", 200.0),
             ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", 50.0),
             ("kd_ce_rows", 100.0), ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", 100.0),
             ("mystery", 1.0)]
    assert kernel_kinds(timed) == {
        "gemm": [2, 1.0], "fla rwkv7": [1, 0.5], "inductor fused": [1, 0.3],
        "copy / fill": [1, 0.2], "our kd loss": [1, 0.1], "elementwise / reduce": [1, 0.05],
        "other": [1, 0.001]}


def test_the_profilers_own_step_range_is_no_kernel() -> None:
    # on the GPU's timeline ProfilerStep#N spans the whole step: counted as a kernel it made
    # every profile of 2026-12-02 read "busy 99-100 %"
    assert annotation(SimpleNamespace(name="ProfilerStep*", is_user_annotation=False))
    assert annotation(SimpleNamespace(name="mine", is_user_annotation=True))
    assert not annotation(SimpleNamespace(name="nvjet_sm90_tst_256x128", is_user_annotation=False))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("a range"):
            torch.ones(4).sum()
    flags = {e.name: annotation(e) for e in prof.events()}
    assert flags["a range"] and not flags["aten::sum"]   # torch marks its user ranges


def test_vary_packing_draws_new_documents_every_batch() -> None:
    def documents(batch: dict) -> list[int]:   # per row: how many times the positions restart
        return (batch["position_ids"] == 0).sum(dim=1).tolist()

    fixed = RandomBatches(4, 64, 97, docs_per_row=4).forever()
    first = next(fixed)
    assert documents(first) == [4] * 4
    assert torch.equal(next(fixed)["position_ids"], first["position_ids"])
    varying = RandomBatches(4, 64, 97, docs_per_row=4, vary_packing=True).forever()
    batches = [next(varying) for _ in range(8)]
    counts = [n for b in batches for n in documents(b)]
    assert all(1 <= n <= 7 for n in counts) and len(set(counts)) > 1, counts
    assert not torch.equal(batches[0]["position_ids"], batches[1]["position_ids"])
    assert all(b["position_ids"].shape == (4, 64) for b in batches)
