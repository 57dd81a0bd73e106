#!/usr/bin/env python
"""Tune flash-linear-attention's RWKV kernels on this GPU and write configs fla loads instead.

    # tune (minutes per mixer on a fresh GPU), write fla_configs/<GPU>/{kernel}.json
    python -m benchmarks.tune_fla tune --mixer rwkv7 --heads 32 --head-size 128 64
    # a fresh node with the shipped configs: time the first fwd+bwd (empty Triton cache)
    python -m benchmarks.tune_fla check --mixer rwkv7 rwkv6

``tune`` disables config loading, runs one forward+backward per (heads, head size) so every
kernel autotunes, and merges the winners into the output directory (default: the shipped one
for this GPU, shared/student/ops/fla_configs/<GPU>/). Autotune keys hold block sizes, head
counts and dtypes, not the sequence length or batch, so one shape per head layout covers them.
Anyone can rerun it for another GPU and commit the directory it writes.

Compiling every candidate config dominates tuning (> 6 min for rwkv7 on one H200 process), so
``--compile-workers N`` first runs N processes that each compile (and run) only every N-th
candidate of every kernel, filling Triton's on-disk cache in parallel on the CPU cores; the
tuning run then only loads and times them.

``check`` points ``TRITON_CACHE_DIR`` at an empty directory, loads the configs (strict mode) and
times the first fwd+bwd per mixer, as on a fresh machine; it reports kernels that still tuned.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def fwd_bwd(mixer: str, heads: int, head_size: int, batch: int, length: int) -> float:
    """One forward+backward through our fla wrapper; returns seconds (synchronised)."""
    import torch

    from benchmarks.bench_kernels import make_inputs
    from shared.student.ops import rwkv6_fla, rwkv7_fla

    fn = rwkv6_fla if mixer == "rwkv6" else rwkv7_fla
    inputs = make_inputs(mixer, batch, length, heads, head_size, "cuda")
    leaves = {k: v.to(torch.bfloat16).requires_grad_() for k, v in inputs.items()}
    state = torch.zeros(batch, heads, head_size, head_size, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    o, s = fn(*leaves.values(), initial_state=state)
    (o.float().square().mean() + s.square().mean()).backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def compile_shard(args: argparse.Namespace) -> None:
    """Compile every ``shard_count``-th candidate config of each kernel (into Triton's cache)."""
    os.environ["FLA_CACHE_MODE"] = "disabled"
    from shared.student.ops import fla_kernels

    index, count = args.shard
    cache = fla_kernels._load_cache_module()
    if cache is None:
        sys.exit("flash-linear-attention is not installed")
    full = cache.fla_cache_autotune

    def shard(configs, *rest, **kwargs):
        mine = configs[index::count]
        if len(mine) < 2 and len(configs) >= 2:
            # keep two: the autotuner then skips a config that does not fit (out of shared
            # memory) instead of failing the whole shard, as it does for a single config
            mine = [configs[index % len(configs)], configs[(index + 1) % len(configs)]]
        return full(mine or configs, *rest, **kwargs)
    cache.fla_cache_autotune = shard
    for mixer in args.mixer:
        for head_size in args.head_size:
            fwd_bwd(mixer, args.heads, head_size, args.batch, args.length)


def compile_in_parallel(args: argparse.Namespace, workers: int) -> None:
    import subprocess

    start = time.perf_counter()
    common = ["--mixer", *args.mixer, "--heads", str(args.heads), "--head-size",
              *map(str, args.head_size), "--batch", str(args.batch), "--length", str(args.length)]
    procs = [subprocess.Popen([sys.executable, __file__, "compile-shard", "--shard", str(i),
                               str(workers), *common], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(workers)]
    failed = [p.communicate()[1][-2000:] for p in procs if p.wait() != 0]
    print(f"compiled the candidates of {' '.join(args.mixer)} in {workers} processes: "
          f"{time.perf_counter() - start:.0f} s ({len(failed)} failed)", flush=True)
    if failed:
        print(failed[0], flush=True)


def tune(args: argparse.Namespace) -> None:
    if args.compile_workers > 1:
        compile_in_parallel(args, args.compile_workers)
    os.environ["FLA_CACHE_MODE"] = "disabled"  # measure everything afresh
    import torch

    from shared.student.ops.common import fla_available
    from shared.student.ops.fla_kernels import (
        SHIPPED_DIR,
        dump_tuned,
        gpu_dir_name,
        shipped_config_dir,
    )

    if args.out:
        out = Path(args.out)
    else:  # the GPU's name is only asked for here: with --out no CUDA device is needed yet
        out = shipped_config_dir() or SHIPPED_DIR / gpu_dir_name(torch.cuda.get_device_name())
    if not fla_available():
        sys.exit("flash-linear-attention is not importable here (pip install fla-core==0.6.0 "
                 "flash-linear-attention==0.6.0) or there is no CUDA device")
    for mixer in args.mixer:
        for head_size in args.head_size:
            seconds = fwd_bwd(mixer, args.heads, head_size, args.batch, args.length)
            counts = dump_tuned(out)  # after each shape: a time limit keeps what finished
            print(f"tuned {mixer} H={args.heads} K={head_size}: {seconds:.1f} s; "
                  f"{len(counts)} kernel files, {sum(counts.values())} entries in {out}",
                  flush=True)


class _Misses(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.kernels: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "No cached config found" in msg or "Cached config rejected" in msg:
            self.kernels.add(msg.split("kernel ", 1)[1].split(" ", 1)[0])


def check(args: argparse.Namespace) -> None:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-fresh-")
    if args.config_dir:
        os.environ["FLA_CONFIG_DIR"] = args.config_dir
    misses = _Misses()
    for name in ("_llama2rwkv_fla_cache", "fla.ops.utils.cache"):  # our copy and fla's own
        logging.getLogger(name).setLevel(logging.DEBUG)
        logging.getLogger(name).addHandler(misses)
    from shared.student.ops.common import fla_available
    from shared.student.ops.fla_kernels import prepare_fla

    t0 = time.perf_counter()
    config_dir = prepare_fla()
    if not fla_available():
        sys.exit("flash-linear-attention is not importable here or there is no CUDA device")
    print(f"fla import {time.perf_counter() - t0:.1f} s; FLA_CONFIG_DIR={config_dir} "
          f"FLA_CACHE_MODE={os.environ.get('FLA_CACHE_MODE')}", flush=True)
    print("| mixer | H | K | first fwd+bwd s (fresh Triton cache) | second s "
          "| kernels that tuned |")
    print("|---|---|---|---|---|---|")
    for mixer in args.mixer:
        for head_size in args.head_size:
            misses.kernels.clear()
            first = fwd_bwd(mixer, args.heads, head_size, args.batch, args.length)
            second = fwd_bwd(mixer, args.heads, head_size, args.batch, args.length)
            print(f"| {mixer} | {args.heads} | {head_size} | {first:.1f} | {second:.3f} | "
                  f"{', '.join(sorted(misses.kernels)) or 'none'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("tune", "check", "compile-shard"):
        p = sub.add_parser(name)
        p.add_argument("--mixer", nargs="+", default=["rwkv7", "rwkv6"], choices=["rwkv6", "rwkv7"])
        p.add_argument("--heads", type=int, default=32)
        p.add_argument("--head-size", type=int, nargs="+", default=[128])
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--length", type=int, default=2048)
    sub.choices["tune"].add_argument("--out", default=None, help="config dir (default: shipped)")
    sub.choices["tune"].add_argument("--compile-workers", type=int, default=1,
                                     help="processes that compile the candidates first")
    sub.choices["compile-shard"].add_argument("--shard", type=int, nargs=2, required=True,
                                              metavar=("INDEX", "COUNT"))
    sub.choices["check"].add_argument("--config-dir", default=None,
                                      help="FLA_CONFIG_DIR to check (default: shipped)")
    args = parser.parse_args()
    {"tune": tune, "check": check, "compile-shard": compile_shard}[args.command](args)


if __name__ == "__main__":
    main()
