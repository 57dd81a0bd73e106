#!/usr/bin/env python
"""Benchmark the student's WKV kernels: flash-linear-attention's Triton chunk kernels vs our
pure-PyTorch chunked path, for RWKV-6 and RWKV-7, forward and forward+backward, plus parity.

Default shapes are one 8B layer (hidden 4096, 32 heads x 128, T=2048, batch 1-3, bf16):

    python -m benchmarks.bench_kernels                 # GPU, needs flash-linear-attention==0.6.0
    python -m benchmarks.bench_kernels --smoke         # tiny shapes; also runs on CPU (no fla rows)

Levels: ``op`` times the WKV operator alone; ``layer`` times a whole RWKV time-mix module
(projections, LoRAs, GroupNorm) with each kernel. Times are medians over ``--reps`` runs after
``--warmup`` runs, measured with CUDA events (perf_counter on CPU). The timing table is printed
last.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shared.student.layers import RWKV6TimeMix, RWKV7TimeMix
from shared.student.ops import (
    RWKV7_LOG_DECAY_MIN,
    fla_available,
    rwkv6_chunked,
    rwkv6_fla,
    rwkv7_chunked,
    rwkv7_fla,
)


def make_inputs(mixer: str, b: int, t: int, h: int, d: int, device: str,
                seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    def rn(*shape): return torch.randn(*shape, generator=g, device=device)
    if mixer == "rwkv6":
        w = -torch.exp(torch.empty(b, t, h, d, device=device).uniform_(-6, 0.5, generator=g))
        return {"r": rn(b, t, h, d) * 0.5, "k": rn(b, t, h, d) * 0.5, "v": rn(b, t, h, d), "w": w,
                "u": rn(h, d) * 0.5}
    kk = F.normalize(rn(b, t, h, d), dim=-1)
    return {"r": rn(b, t, h, d) * 0.5, "w": RWKV7_LOG_DECAY_MIN * torch.sigmoid(rn(b, t, h, d)),
            "k": rn(b, t, h, d) * 0.5, "v": rn(b, t, h, d), "a": -kk,
            "b": kk * torch.sigmoid(rn(b, t, h, d))}


def op_fn(mixer: str, path: str, chunk: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if path == "fla":
        return rwkv6_fla if mixer == "rwkv6" else rwkv7_fla
    chunked = rwkv6_chunked if mixer == "rwkv6" else rwkv7_chunked
    return lambda *args, initial_state=None: chunked(*args, initial_state=initial_state,
                                                     chunk_size=chunk)


def median_ms(fn: Callable[[], object], warmup: int, reps: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fwd_bwd(fn, leaves: dict[str, torch.Tensor], state: torch.Tensor,  # noqa: ANN001, ANN201
            do: torch.Tensor):
    o, s = fn(*leaves.values(), initial_state=state)
    loss = (o.float() * do).sum() + s.float().square().sum() * 1e-3
    return o, s, torch.autograd.grad(loss, list(leaves.values()) + [state])


def parity(mixer: str, path: str, b: int, args: argparse.Namespace) -> dict[str, float]:
    """``path`` in bf16 vs the float32 PyTorch chunked path on the same (bf16-rounded) inputs."""
    inputs = make_inputs(mixer, b, args.seq, args.heads, args.head_size, args.device, seed=1)
    inputs = {k: v.bfloat16() for k, v in inputs.items()}
    state = torch.randn(b, args.heads, args.head_size, args.head_size, device=args.device) * 0.1
    do = torch.randn(b, args.seq, args.heads, args.head_size, device=args.device)
    results = []
    for fn, dtype in ((op_fn(mixer, "torch", args.chunk), torch.float32),
                      (op_fn(mixer, path, args.chunk), torch.bfloat16)):
        leaves = {k: v.to(dtype).requires_grad_(True) for k, v in inputs.items()}
        results.append(fwd_bwd(fn, leaves, state.clone().requires_grad_(True), do))
    (o_ref, s_ref, g_ref), (o, s, g) = results
    names = list(inputs) + ["h0"]
    grads = {f"d{n}": rel(a, r) for n, a, r in zip(names, g, g_ref, strict=True)}
    return {"o": rel(o, o_ref), "state": rel(s, s_ref)} | grads


def bench_op(mixer: str, path: str, b: int, args: argparse.Namespace) -> tuple[float, float, float]:
    fn = op_fn(mixer, path, args.chunk)
    leaves = {k: v.bfloat16().requires_grad_(True) for k, v in make_inputs(
        mixer, b, args.seq, args.heads, args.head_size, args.device).items()}
    state = torch.randn(b, args.heads, args.head_size, args.head_size, device=args.device) * 0.1
    state.requires_grad_(True)
    do = torch.randn(b, args.seq, args.heads, args.head_size, device=args.device)
    with torch.no_grad():
        fwd = median_ms(lambda: fn(*leaves.values(), initial_state=state), args.warmup, args.reps,
                        args.device)
    return fwd, *_timed_backward(lambda: fwd_bwd(fn, leaves, state, do), args)


def bench_layer(mixer: str, path: str, b: int,
                args: argparse.Namespace) -> tuple[float, float, float]:
    cls = RWKV6TimeMix if mixer == "rwkv6" else RWKV7TimeMix
    extra = {} if mixer == "rwkv6" else {"is_first": False}
    torch.manual_seed(0)
    layer = cls(args.hidden, args.heads, args.head_size, layer_idx=8, num_layers=32,
                kernel="fla" if path == "fla" else "chunk", chunk_size=args.chunk, **extra)
    layer = layer.to(device=args.device, dtype=torch.bfloat16)
    x = torch.randn(b, args.seq, args.hidden, device=args.device, dtype=torch.bfloat16,
                    requires_grad=True)
    v_first = None if mixer == "rwkv6" else torch.randn(b, args.seq, args.heads * args.head_size,
                                                        device=args.device, dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = median_ms(lambda: layer(x, v_first=v_first), args.warmup, args.reps, args.device)

    def step():  # noqa: ANN202
        out = layer(x, v_first=v_first)[0]
        return torch.autograd.grad(out.float().square().mean(), [x] + list(layer.parameters()))
    return fwd, *_timed_backward(step, args)


def _timed_backward(step: Callable[[], object], args: argparse.Namespace) -> tuple[float, float]:
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = median_ms(step, args.warmup, args.reps, args.device)
    peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if args.device == "cuda"
            else float("nan"))
    return ms, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, few reps (runs on CPU too)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=16, help="chunk length of the PyTorch path")
    parser.add_argument("--mixers", nargs="+", default=["rwkv6", "rwkv7"],
                        choices=["rwkv6", "rwkv7"])
    parser.add_argument("--levels", nargs="+", default=["op", "layer"], choices=["op", "layer"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.batch, args.seq, args.heads, args.head_size, args.hidden = [1, 2], 100, 2, 32, 64
        args.warmup, args.reps = 1, 3
    paths = ["fla", "torch"] if args.device == "cuda" and fla_available() else ["torch"]
    if args.device == "cuda" and "fla" not in paths:
        print("WARNING: flash-linear-attention not importable; only the PyTorch path is timed",
              flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device}; torch {torch.__version__}; shapes: T={args.seq} H={args.heads} "
          f"K=V={args.head_size} hidden={args.hidden} bf16", flush=True)

    parity_rows = []
    for mixer in args.mixers:
        for path in paths:
            errs = parity(mixer, path, args.batch[0], args)
            parity_rows.append((mixer, path, errs))
            print(f"parity {mixer} {path}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()),
                  flush=True)

    rows = []
    for level in args.levels:
        for mixer in args.mixers:
            for b in args.batch:
                times = {}
                for path in paths:
                    try:
                        bench = bench_op if level == "op" else bench_layer
                        times[path] = bench(mixer, path, b, args)
                    except torch.cuda.OutOfMemoryError:
                        times[path] = None
                        torch.cuda.empty_cache()
                    print(f"{level} {mixer} B={b} {path}: {times[path]}", flush=True)
                rows.append((level, mixer, b, times))

    print("\n### Parity (bf16 path vs float32 PyTorch chunked reference; relative error "
          "||a-b||/||b||)\n")
    keys = sorted({k for _, _, e in parity_rows for k in e},
                  key=lambda k: (k != "o", k != "state", k))
    print("| mixer | path | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for mixer, path, errs in parity_rows:
        cells = " | ".join(f"{errs[k]:.1e}" if k in errs else "" for k in keys)
        print(f"| {mixer} | {path} | {cells} |")

    print(f"\n### WKV timings (median ms; T={args.seq}, {args.heads}x{args.head_size}, bf16, "
          f"{args.device})\n")
    print("| level | mixer | B | path | fwd ms | fwd+bwd ms | fwd+bwd peak MiB "
          "| fwd+bwd speed-up vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for level, mixer, b, times in rows:
        base = times.get("torch")
        for path, t in times.items():
            if t is None:
                print(f"| {level} | {mixer} | {b} | {path} | OOM | OOM | OOM | |")
                continue
            speed = f"{base[1] / t[1]:.1f}x" if base and path != "torch" else ""
            print(f"| {level} | {mixer} | {b} | {path} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.0f} "
                  f"| {speed} |")


if __name__ == "__main__":
    main()
