#!/usr/bin/env python
"""Peak memory (and tokens/s) of the all-RWKV-7 student's training step on CPU.

The student has SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads x 64, 3 kv heads,
intermediate 1536, vocabulary 49,152, tied embeddings), random weights from a transformers
LlamaConfig, every layer converted (``convert_teacher``, rwkv7, block + MLP, ``kernel=chunk``).
Each (tree, stage, batch x length) arm runs in a fresh process:

* ``align``: teacher-forced ``align_forward`` on random per-layer inputs, ``align_loss`` against
  random targets; the mixers train (what the trainer trains in align);
* ``kd``: full forward, ``kd_ce_full`` against random bf16 teacher logits (``link.logits:
  bf16``); every parameter trains (``train.trainable: all``);
* the step is forward + backward + torch AdamW (betas 0.9/0.99, the trainer's optimizer without
  DeepSpeed's flat buffers), ``--steps`` steps, one thread.

Reported: ``peak RSS``, the process's peak resident set over the training steps (VmHWM, reset
after the model is built so the converted teacher is not counted; it does include the Python +
torch runtime, the weights, gradients, AdamW state and activations); ``weights`` and ``AdamW``,
the bytes of the parameters and of the optimizer state; ``tensor peak``, the deterministic peak
of the bytes of tensors created during one step (``shared.tensor_memory``: activations,
temporaries, gradients); tokens/s, the median over the steps after the first.

``--baseline COMMIT`` adds arms that import ``shared`` from that commit (``git archive`` into a
temporary directory): the same run measures the tree before a change.

    python -m benchmarks.bench_cpu_memory [--shapes 1x128,2x256] [--stages align,kd]
        [--baseline 44b4a58^] [--steps 3] [--malloc fixed|adaptive|both]

Malloc: ``--malloc fixed`` (the default) fixes glibc's mmap threshold in each arm as the trainer
does with ``train.cpu_malloc: fixed`` (``shared.host_memory.fix_mmap_threshold``);
``--malloc adaptive`` leaves glibc's default (the trainer's), and ``--malloc both`` runs every
arm both ways (docs/student.md, "CPU memory").
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
MIB = 2 ** 20


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_student(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.student import convert_teacher

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}))
    student = convert_teacher(teacher, dict(layers="all", mixer="rwkv7", mode="block",
                                            ffn="mlp")).train()
    del teacher
    gc.collect()
    # the tree before the rename named the knob set_rwkv_backend
    (getattr(student, "set_rwkv_kernel", None) or student.set_rwkv_backend)("chunk")
    return student


def tensor_memory_class() -> type:
    """This tree's ``shared.tensor_memory.TensorMemory``, also when ``shared`` is a baseline's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tensor_memory",
                                                  REPO / "shared" / "tensor_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TensorMemory


def fix_malloc() -> bool:
    """This tree's ``shared.host_memory.fix_mmap_threshold()``, also under a baseline tree."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_host_memory",
                                                  REPO / "shared" / "host_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fix_mmap_threshold()


def child(args: argparse.Namespace) -> dict:
    fixed = args.malloc == "fixed" and fix_malloc()   # before the arm allocates anything
    sys.path.insert(0, args.tree)  # the tree whose ``shared`` is measured
    import torch

    from shared.losses import align_loss, kd_ce_full

    torch.set_num_threads(1)
    batch, length = (int(x) for x in args.shape.split("x"))
    student = build_student(args.layers)
    names = (set(student.mixer_parameter_names()) if args.stage == "align"
             else {n for n, _ in student.named_parameters()})
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(1)
    hidden, vocab = SMOLLM2_135M["hidden_size"], SMOLLM2_135M["vocab_size"]
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if args.stage == "align":
        states = [torch.randn(batch, length, hidden, generator=gen)
                  for _ in range(args.layers + 1)]
    else:
        teacher_logits = torch.randn(batch, length, vocab, generator=gen).bfloat16()

    def step(mem=None) -> None:
        if args.stage == "align":
            outs = student.align_forward(dict(enumerate(states[:-1])), mask)
            loss = align_loss(outs, {i: states[i + 1] for i in outs}, mask)
        else:
            logits = student(ids, attention_mask=mask, use_cache=False).logits
            loss, _, _ = kd_ce_full(logits, teacher_logits, ids, kernel="torch")
        if mem is not None:
            mem.tag = "backward"
        loss.backward()
        if mem is not None:
            mem.tag = "optimizer"
        opt.step()
        opt.zero_grad(set_to_none=True)

    gc.collect()
    reset = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss = peak_rss_bytes()
    label = args.tree_label + ("" if fixed else ", adaptive malloc")
    result = dict(tree=label, stage=args.stage, shape=args.shape, peak_rss=rss,
                  rss_reset=reset, tokens_per_s=batch * length / statistics.median(times[1:]),
                  weights=sum(p.numel() * p.element_size() for p in student.parameters()),
                  adamw=sum(v.numel() * v.element_size() for s in opt.state.values()
                            for v in s.values() if torch.is_tensor(v)))
    with tensor_memory_class()() as mem:
        step(mem)
    result["tensor_peak"] = mem.peak
    return result


def run_arm(tree: Path, label: str, stage: str, shape: str, malloc: str,
            args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu_memory", "--child", "--stage", stage,
           "--shape", shape, "--steps", str(args.steps), "--layers", str(args.layers),
           "--tree", str(tree), "--tree-label", label, "--malloc", malloc]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(tree=label, stage=stage, shape=shape,
                    error=f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x128,2x256", help="batch x length, comma-separated")
    parser.add_argument("--stages", default="align,kd")
    parser.add_argument("--steps", type=int, default=3, help="training steps per arm (>= 2)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--baseline", default="", help="a commit to measure in the same run")
    parser.add_argument("--malloc", default="fixed", choices=["fixed", "adaptive", "both"],
                        help="glibc's mmap threshold fixed (train.cpu_malloc: fixed) or adaptive")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(REPO), help=argparse.SUPPRESS)
    parser.add_argument("--tree-label", default="this tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step allocates AdamW's state)")
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = [(REPO, "this tree")]
        if args.baseline:
            archive = subprocess.run(["git", "archive", args.baseline, "shared"], cwd=REPO,
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees.insert(0, (Path(tmp), f"baseline {args.baseline}"))
        mallocs = ["adaptive", "fixed"] if args.malloc == "both" else [args.malloc]
        rows = [run_arm(tree, label, stage, shape, malloc, args)
                for stage in args.stages.split(",") for shape in args.shapes.split(",")
                for tree, label in trees for malloc in mallocs]
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    print("| tree | stage | B x T | peak RSS MiB | weights MiB | AdamW MiB | tensor peak MiB "
          "| tokens/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tree']} | {r['stage']} | {r['shape']} | {r['error']} | | | | |")
            continue
        print(f"| {r['tree']} | {r['stage']} | {r['shape']} | {r['peak_rss'] / MIB:.0f} "
              f"| {r['weights'] / MIB:.0f} | {r['adamw'] / MIB:.0f} "
              f"| {r['tensor_peak'] / MIB:.0f} | {r['tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
