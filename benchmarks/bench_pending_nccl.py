#!/usr/bin/env python
"""What an NCCL send/recv that waits for its peer costs the compute around it (2 GPUs).

The link of protocol 2 posted the receive of an answer when it sent the request, so on the
trainer's GPU an NCCL kernel waited for the whole student step; the teacher kept header
receives posted while it computed. This measures the mechanism alone: rank 1 (GPU 1, "the
trainer") and rank 0 (GPU 0, "the teacher") time the same bf16 matmul workload

  * with nothing pending (baseline, measured in the same run);
  * while a 1 GB receive from the peer is posted on the computing GPU and not yet matched;
  * while that receive is posted on the *other* GPU (the computing GPU is its sender-to-be);
  * while a send to the peer is posted on the computing GPU and not yet matched;

and profiles one pending case with torch.profiler (kernel names and times). Prints a table last.

    python -m benchmarks.bench_pending_nccl [--size 8192 --reps 40] [--trace DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PAYLOAD = 512 * 1024 * 1024  # bf16 elements: 1 GiB, a logits answer's size


def timed_work(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Milliseconds of ``reps`` matmuls on the current stream (CUDA events: no device sync,
    which would wait for the pending NCCL kernel too)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        torch.mm(a, b)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def worker(rank: int, store_path: str, args: argparse.Namespace, queue) -> None:
    torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, 2)
    store.set_timeout(timedelta(seconds=300))
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("pg", store), rank, 2,
                               dist.ProcessGroupNCCL.Options())
    peer = 1 - rank
    buf = torch.ones(PAYLOAD, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    step = [0]

    def barrier() -> None:
        step[0] += 1
        store.add(f"barrier-{step[0]}", 1)
        while int(store.add(f"barrier-{step[0]}", 0)) < 2:
            time.sleep(0.001)

    def post(op: str):
        with torch.cuda.stream(side):  # like the link: its own stream, no wait on compute
            return getattr(pg, op)([buf], peer, 0)

    (post("send") if rank == 0 else post("recv")).wait()  # connect the pair first
    torch.cuda.synchronize()
    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    timed_work(a, b, 5)
    results = {}
    # (name, computing rank, who posts what first: {rank: op}); the peer posts the matching
    # op only after the measurement.
    scenarios = [("nothing pending", None), ("recv pending on this GPU", "recv-here"),
                 ("recv pending on the peer GPU", "recv-peer"),
                 ("send pending on this GPU", "send-here")]
    for computing in (1, 0):
        for name, case in scenarios:
            for rep in range(args.rounds):
                barrier()
                work = None
                if case == "recv-here" and rank == computing:
                    work = post("recv")
                elif case == "recv-peer" and rank == peer_of(computing):
                    work = post("recv")
                elif case == "send-here" and rank == computing:
                    work = post("send")
                barrier()  # the pending op is posted before the timing starts
                # The profiler synchronises the device when it stops, which waits for the pending
                # receive: in the profiled round the peer matches it after a delay, no barrier.
                profiled = bool(args.trace) and case == "recv-here" and rep == 0
                profile = profiled and rank == computing
                if profiled and rank != computing:
                    time.sleep(3.0)
                if rank == computing:
                    if profile:
                        with torch.profiler.profile(activities=[
                                torch.profiler.ProfilerActivity.CPU,
                                torch.profiler.ProfilerActivity.CUDA]) as prof:
                            ms = timed_work(a, b, args.reps)
                        results["profile"] = prof.key_averages().table(
                            sort_by="cuda_time_total", row_limit=8)
                        prof.export_chrome_trace(os.path.join(args.trace,
                                                              f"pending_recv_gpu{rank}.json"))
                    else:
                        ms = timed_work(a, b, args.reps)
                    results.setdefault((computing, name), []).append(ms)
                if not profiled:
                    barrier()
                if case == "recv-here" and rank == peer_of(computing):
                    work = post("send")
                elif case == "recv-peer" and rank == computing:
                    work = post("send")
                elif case == "send-here" and rank == peer_of(computing):
                    work = post("recv")
                if work is not None:
                    work.wait()
                torch.cuda.synchronize()
    queue.put((rank, results))


def peer_of(rank: int) -> int:
    return 1 - rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=40, help="matmuls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per scenario")
    parser.add_argument("--trace", default=None, help="directory for a chrome trace")
    args = parser.parse_args()
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="pending-nccl-"), "store")
    procs = [ctx.Process(target=worker, args=(r, store, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    merged = {}
    for _ in procs:
        _, results = queue.get(timeout=900)
        merged.update(results)
    for p in procs:
        p.join(60)
    if "profile" in merged:
        print(merged.pop("profile"))
    flops = 2 * args.size ** 3 * args.reps
    print(f"\n| computing GPU | pending NCCL op | matmul ms (median of {args.rounds}) | TFLOP/s | "
          "vs nothing pending |")
    print("|---|---|---|---|---|")
    for gpu, role in ((1, "trainer"), (0, "teacher")):
        base = sorted(merged[(gpu, "nothing pending")])[args.rounds // 2]
        for (g, name), times in merged.items():
            if g == gpu:
                ms = sorted(times)[args.rounds // 2]
                print(f"| {gpu} ({role}) | {name} | {ms:.1f} | {flops / ms / 1e9:.0f} | "
                      f"{base / ms:.2f}× |")


if __name__ == "__main__":
    sys.exit(main())
