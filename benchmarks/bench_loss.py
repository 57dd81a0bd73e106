#!/usr/bin/env python
"""The fused KL + CE alone on a GPU: the Triton kernel (shared/kd_ce_triton.py) against the
chunked PyTorch path (its reference, the baseline) in the same run, forward + backward at the
kd stage's shape (default 2 × 2048 tokens, Llama-3's 128,256-token vocabulary, bf16 logits).

    python -m benchmarks.bench_loss [--rows 4096] [--vocab 128256] [--reps 20]

Prints a markdown table last: milliseconds per forward + backward (median of CUDA-event
timings), the bytes the kernel must move (both logits read twice, the gradient written once)
over that time, and the speed-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from shared.losses import kd_ce_full


def time_kernel(kernel: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                reps: int) -> float:
    times = []
    for i in range(reps + 3):
        x = student.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss, _, _ = kd_ce_full(x, teacher, labels, 1.0, 0.1, 1.0, kernel=kernel)
        loss.backward()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096, help="tokens per micro batch")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, args.rows // 2, args.vocab)
    student = torch.randn(shape, generator=g, device="cuda").mul_(3).to(torch.bfloat16)
    teacher = torch.randn(shape, generator=g, device="cuda").mul_(3).to(torch.bfloat16)
    labels = torch.randint(0, args.vocab, shape[:2], generator=g, device="cuda")
    labels[:, :16] = -100
    moved = 5 * student.numel() * student.element_size()  # 2 reads of s and t, 1 write
    results = {k: time_kernel(k, student, teacher, labels, args.reps) for k in ("torch", "triton")}
    print(f"\n{torch.cuda.get_device_name()}, {args.rows} tokens × {args.vocab} vocabulary, "
          f"bf16 logits, kl 0.1 + ce 1.0, forward + backward, median of {args.reps}\n")
    print("| kernel | ms | GB/s of the kernel's minimum traffic | vs torch |")
    print("|---|---|---|---|")
    for kernel, ms in results.items():
        print(f"| {kernel} | {ms:.2f} | {moved / ms / 1e6:.0f} | "
              f"{results['torch'] / ms:.1f}× |")


if __name__ == "__main__":
    main()
