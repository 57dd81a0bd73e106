#!/usr/bin/env python
"""Tune flash-linear-attention's RWKV kernels on this GPU and write configs fla loads instead.

    # tune, rwkv7 first, (heads x head size) shapes, into fla_configs/<GPU>/{kernel}.json
    python -m benchmarks.tune_fla tune --mixer rwkv7 rwkv6 --shapes 9x64 32x64 --compile-workers 16
    # a fresh node with the shipped configs: time the first fwd+bwd (empty Triton cache)
    python -m benchmarks.tune_fla check --mixer rwkv7 rwkv6 --shapes 32x128
    # as a training process does (shipped + kept configs): run twice, the second tunes nothing
    python -m benchmarks.tune_fla first-step --mixer rwkv7 --shapes 9x64 --no-shipped

``tune`` runs one forward+backward per mixer, shape and initial state (given, and none as in
training) so every kernel autotunes, and merges the winners into the output directory (default:
the shipped one for this GPU, shared/student/ops/fla_configs/<GPU>/). It loads what that
directory already holds (strict mode) and tunes only the keys missing there, so a second head
count at a known head size costs one or two kernels, and a run cut by a time limit is resumed by
the next; ``--retune`` measures everything afresh. Autotune keys (fla 0.6.0) hold block sizes
(from the head size), dtypes, whether optional tensors (the initial state) are given, and, for
``wu_fwd_kernel`` (rwkv7) and ``chunk_gla_fwd_kernel_o`` (rwkv6) only, the head count; not the
sequence length or batch. Anyone can rerun it for another GPU and commit what it writes.

Compiling every candidate config dominates tuning (> 6 min for rwkv7 on one H200 process), so
``--compile-workers N`` first runs N processes that each compile (and run) only every N-th
candidate of every kernel, filling Triton's on-disk cache in parallel on the CPU cores; the
tuning run then only loads and times them.

``check`` points ``TRITON_CACHE_DIR`` at an empty directory, loads the shipped configs (strict)
and times the first fwd+bwd per mixer, as on a fresh machine; it reports kernels that still
tuned. ``first-step`` does the same through the configs a training process uses (shipped, and
what earlier runs kept in $LLAMA2RWKV_KERNEL_CACHE or ~/.cache/llama2rwkv), and keeps what it
tunes.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def shape(text: str) -> tuple[int, int]:
    """``HEADSxHEAD_SIZE`` (e.g. ``9x64``) as a pair of ints."""
    heads, _, size = text.lower().partition("x")
    if not (heads.isdigit() and size.isdigit() and int(heads) > 0 and int(size) > 0):
        raise argparse.ArgumentTypeError(f"shape {text!r}: give HEADSxHEAD_SIZE, e.g. 9x64")
    return int(heads), int(size)


def fwd_bwd(mixer: str, heads: int, head_size: int, batch: int, length: int,
            with_state: bool) -> float:
    """One forward+backward through our fla wrapper; returns seconds (synchronised)."""
    import torch

    from benchmarks.bench_kernels import make_inputs
    from shared.student.ops import rwkv6_fla, rwkv7_fla

    fn = rwkv6_fla if mixer == "rwkv6" else rwkv7_fla
    inputs = make_inputs(mixer, batch, length, heads, head_size, "cuda")
    leaves = {k: v.to(torch.bfloat16).requires_grad_() for k, v in inputs.items()}
    state = (torch.zeros(batch, heads, head_size, head_size, device="cuda", requires_grad=True)
             if with_state else None)
    torch.cuda.synchronize()
    start = time.perf_counter()
    o, s = fn(*leaves.values(), initial_state=state)
    (o.float().square().mean() + s.square().mean()).backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def runs(args: argparse.Namespace):
    """(mixer, heads, head size, with state) in the order asked: mixers outermost."""
    for mixer in args.mixer:
        for heads, head_size in args.shapes:
            for state in args.states:
                yield mixer, heads, head_size, state == "given"


def compile_shard(args: argparse.Namespace) -> None:
    """Compile every ``shard_count``-th candidate config of each kernel (into Triton's cache).

    With ``FLA_CONFIG_DIR`` set (an incremental ``tune``), kernels with a config there compile
    that one only."""
    os.environ["FLA_CACHE_MODE"] = "strict" if "FLA_CONFIG_DIR" in os.environ else "disabled"
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
    for mixer, heads, head_size, with_state in runs(args):
        fwd_bwd(mixer, heads, head_size, args.batch, args.length, with_state)


def compile_in_parallel(args: argparse.Namespace, workers: int) -> None:
    start = time.perf_counter()
    common = ["--mixer", *args.mixer, "--shapes", *(f"{h}x{k}" for h, k in args.shapes),
              "--states", *args.states, "--batch", str(args.batch), "--length", str(args.length)]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.tune_fla", "compile-shard",
                               "--shard", str(i), str(workers), *common],
                              cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    failed = [p.communicate()[1][-2000:] for p in procs if p.wait() != 0]
    print(f"compiled the candidates of {' '.join(args.mixer)} in {workers} processes: "
          f"{time.perf_counter() - start:.0f} s ({len(failed)} failed)", flush=True)
    if failed:
        print(failed[0], flush=True)


def tune(args: argparse.Namespace) -> None:
    from shared.student.ops.fla_kernels import SHIPPED_DIR, current_gpu, dump_tuned

    gpu = current_gpu()
    if gpu is None and not args.out:
        sys.exit("no CUDA device here: tune on the GPU the configs are for")
    out = Path(args.out) if args.out else SHIPPED_DIR / gpu
    if args.retune:
        os.environ["FLA_CACHE_MODE"] = "disabled"  # measure everything afresh
        os.environ.pop("FLA_CONFIG_DIR", None)
    else:  # load what is there, tune the rest (shards inherit this, see compile_shard)
        out.mkdir(parents=True, exist_ok=True)
        os.environ.update(FLA_CONFIG_DIR=str(out.resolve()), FLA_CACHE_MODE="strict")
    if args.compile_workers > 1:
        compile_in_parallel(args, args.compile_workers)
    from shared.student.ops.common import fla_available

    if not fla_available():
        sys.exit("flash-linear-attention is not importable here (pip install fla-core==0.6.0 "
                 "flash-linear-attention==0.6.0) or there is no CUDA device")
    from shared.student.ops.fla_kernels import tuned_in_this_process

    # a time limit's SIGTERM ends the run between two kernel timings: the keys tuned by then
    # are written too, and the next (incremental) tune goes on from there
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        for mixer, heads, head_size, with_state in runs(args):
            before = len(tuned_in_this_process())
            seconds = fwd_bwd(mixer, heads, head_size, args.batch, args.length, with_state)
            counts = dump_tuned(out)
            print(f"tuned {mixer} H={heads} K={head_size} "
                  f"state={'given' if with_state else 'none'}: {seconds:.1f} s, "
                  f"{len(tuned_in_this_process()) - before} keys tuned; {len(counts)} kernel "
                  f"files, {sum(counts.values())} entries in {out}", flush=True)
    finally:
        counts = dump_tuned(out)
        print(f"{len(tuned_in_this_process())} keys tuned in all; {sum(counts.values())} "
              f"entries in {out}", flush=True)


def first_steps(args: argparse.Namespace, config_dir: str | None) -> None:
    """Time the first and second fwd+bwd of each run; print a table row per run."""
    from shared.student.ops.common import fla_available
    from shared.student.ops.fla_kernels import tuned_in_this_process

    if not fla_available():
        sys.exit("flash-linear-attention is not importable here or there is no CUDA device")
    print(f"FLA_CONFIG_DIR={config_dir} FLA_CACHE_MODE={os.environ.get('FLA_CACHE_MODE')} "
          f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR')}", flush=True)
    print("| mixer | H | K | initial state | first fwd+bwd s | second s | keys tuned | kernels |")
    print("|---|---|---|---|---|---|---|---|")
    for mixer, heads, head_size, with_state in runs(args):
        before = len(tuned_in_this_process())
        first = fwd_bwd(mixer, heads, head_size, args.batch, args.length, with_state)
        second = fwd_bwd(mixer, heads, head_size, args.batch, args.length, with_state)
        tuned = tuned_in_this_process()[before:]
        print(f"| {mixer} | {heads} | {head_size} | {'given' if with_state else 'none'} | "
              f"{first:.1f} | {second:.3f} | {len(tuned)} | "
              f"{', '.join(sorted(set(tuned))) or 'none'} |", flush=True)


def check(args: argparse.Namespace) -> None:
    from shared.student.ops.fla_kernels import prepare_fla, shipped_config_dir

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-fresh-")
    config_dir = args.config_dir or shipped_config_dir()
    if config_dir is None:
        sys.exit("no configs ship for this GPU: give --config-dir")
    os.environ["FLA_CONFIG_DIR"] = str(config_dir)  # these files alone: nothing merged or kept
    first_steps(args, prepare_fla())


def first_step(args: argparse.Namespace) -> None:
    if args.compile_workers > 1:  # shards tune nothing and keep nothing (disabled mode)
        os.environ["TRITON_CACHE_DIR"] = args.triton_cache or tempfile.mkdtemp(prefix="triton-")
        compile_in_parallel(args, args.compile_workers)
    elif not args.triton_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-fresh-")
    if args.triton_cache:
        os.environ["TRITON_CACHE_DIR"] = args.triton_cache
    from shared.student.ops.fla_kernels import prepare_fla

    first_steps(args, prepare_fla(include_shipped=not args.no_shipped))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("tune", "check", "first-step", "compile-shard"):
        p = sub.add_parser(name)
        p.add_argument("--mixer", nargs="+", default=["rwkv7", "rwkv6"], choices=["rwkv6", "rwkv7"])
        p.add_argument("--shapes", type=shape, nargs="+", default=[(32, 128)],
                       help="HEADSxHEAD_SIZE each (default 32x128, the 8B layer)")
        p.add_argument("--states", nargs="+", choices=["given", "none"],
                       default=["none"] if name == "first-step" else ["given", "none"],
                       help="initial state passed or not (training passes none)")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--length", type=int, default=2048)
        if name in ("tune", "first-step"):
            p.add_argument("--compile-workers", type=int, default=1,
                           help="processes that compile the candidates first (one per CPU core)")
    sub.choices["tune"].add_argument("--out", default=None, help="config dir (default: shipped)")
    sub.choices["tune"].add_argument("--retune", action="store_true",
                                     help="ignore the configs already in --out, tune everything")
    sub.choices["check"].add_argument("--config-dir", default=None,
                                      help="FLA_CONFIG_DIR to check (default: shipped)")
    sub.choices["first-step"].add_argument("--no-shipped", action="store_true",
                                           help="leave the shipped configs out (a shape we do "
                                                "not ship)")
    sub.choices["first-step"].add_argument("--triton-cache", default=None,
                                           help="TRITON_CACHE_DIR (default: a fresh one)")
    sub.choices["compile-shard"].add_argument("--shard", type=int, nargs=2, required=True,
                                              metavar=("INDEX", "COUNT"))
    args = parser.parse_args()
    {"tune": tune, "check": check, "first-step": first_step,
     "compile-shard": compile_shard}[args.command](args)


if __name__ == "__main__":
    main()
