"""Training-step speed at real model sizes, one GPU, the teacher in-process (issue 19).

Random weights at the real shapes (``135m``: SmolLM2-135M, ``1b``: Llama-3.2-1B, ``tiny``: CPU
runs), random token ids. Arms, each group in a fresh process (benchmarks/step_arms.py):
  trainer  our trainer's step (``loop.train_step``: DeepSpeed engine, DistillObjective, the
           in-process teacher), per student layout (``hybrid``: every other layer RWKV-7,
           ``all``: every layer) and stage (``kd``, ``align``);
  plain    the same student and objective in a plain PyTorch loop (fp32 weights, bf16
           autocast, fused AdamW): the baseline issue 19 compares with;
  teacher  the in-process teacher's forward alone.
Per arm: tokens/s of the median step, p90/p50 step time, MFU, and of one profiled step: its
self CPU time (host), its summed kernel time, GPU busy (the union of its kernels' intervals over
the median unprofiled step: the profiler's host work stretches the profiled one), kernel
launches and aten ops (its op table goes to WORKDIR/logs/*.ops.txt).
``--baseline-tree DIR`` runs the arms also from an older checkout (PYTHONPATH=DIR),
``--variant NAME='--k v'`` ours again with config overrides, interleaved per group, with ratios
to the first tree (baseline, else ours). A Markdown table last.

    python -m benchmarks.bench_steps --shapes 135m --layers hybrid all --micro-batches 8 32 \
        --workdir $OUT/bench-steps --json $OUT/bench_steps.json
    python -m benchmarks.bench_steps --shape tiny --device cpu --steps 2      # a CPU check
``--docs-per-row N`` packs N documents of random lengths into each row (position_ids
restart; ``--vary-packing``: new lengths every step, as real packed data has), and
``--variant seg='--student.packed_layout segments'`` measures the one-pass layout against it.
Extra ``--section.key value`` arguments are config overrides for every tree's arms (the
baseline's too: an A/B of the code at one configuration); a variant's come after them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import named_overrides

ROOT = Path(__file__).resolve().parents[1]
ARMS_SCRIPT = Path(__file__).with_name("step_arms.py")
DEFAULT_BATCHES = {"135m": ([8, 32], 1024), "1b": ([16], 2048), "tiny": ([2], 64)}
PEAK_BF16 = 989e12  # an unknown card: the H100/H200 SXM datasheet's dense bf16


def flops_per_token(r: dict) -> float:
    """Model FLOPs per token of an arm (shared/flops.py): the student's training step plus,
    the teacher being in-process on the same GPU, the teacher's forward; the teacher arm only
    the latter. Rows are full length, so the attention span is the row length."""
    from transformers import AutoConfig

    from shared import flops
    from shared.student import RWKVHybridConfig

    kd = r["stage"] == "kd"
    teacher = flops.teacher_flops_per_token(AutoConfig.from_pretrained(r["model_dir"]), r["seq"],
                                            logits=kd)
    if r["arm"] == "teacher":
        return teacher
    student = RWKVHybridConfig.from_dict(r["student_config"])
    return teacher + flops.training_flops_per_token(student, None, r["seq"], r["stage"])


def with_mfu(r: dict) -> dict:
    if r.get("error") or r.get("device") != "cuda":
        return r
    from shared.flops import PEAK_BF16_FLOPS

    r["flops_per_token"] = flops_per_token(r)
    peak = next((v for k, v in PEAK_BF16_FLOPS if k in r["device_name"]), PEAK_BF16)
    r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    return r


def run_group(spec: dict, tree: Path, env: dict, timeout: float, log_dir: Path) -> list[dict]:
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree),
                                                               env.get("PYTHONPATH")]))}
    name = "-".join([spec["tree"], spec["shape"], spec["layers"], spec["stage"], *spec["arms"]])
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, str(ARMS_SCRIPT), json.dumps(spec)], cwd=tree,
                              env=env, capture_output=True, text=True, timeout=timeout)
        output, failed = proc.stdout + proc.stderr, proc.returncode != 0
    except subprocess.TimeoutExpired as err:
        output, failed = f"{err.stdout or ''}{err.stderr or ''}\ntimed out", True
    (log_dir / f"{name}.log").write_text(output if isinstance(output, str) else str(output))
    results = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    print(f"{name}: {len(results)} result(s) in {time.time() - t0:.0f} s"
          + (f"; FAILED, log {log_dir / name}.log:\n{output[-2000:]}" if failed else ""),
          flush=True)
    if failed:
        results.append({**spec, "arm": "+".join(spec["arms"]), "error": output[-300:]})
    for r in results:
        r["device"] = spec["device"]
    return [with_mfu(r) for r in results]


def specs_for(args: argparse.Namespace, shape: str, work: Path) -> list[dict]:
    batches, seq = DEFAULT_BATCHES[shape]
    common = {"shape": shape, "seq": args.seq or seq,
              "micro_batches": args.micro_batches or batches, "steps": args.steps,
              "warmup": args.warmup, "profile": not args.no_profile, "device": args.device,
              "docs_per_row": args.docs_per_row, "vary_packing": args.vary_packing,
              "model_dir": str(work / f"teacher-{shape}"), "log_dir": str(work / "logs")}
    specs, teacher_done = [], False
    for layers in args.layers:
        for stage in args.stages:
            arms = [a for a in ("plain", "trainer") if a in args.arms]
            if "teacher" in args.arms and not teacher_done and stage == "kd":
                arms.insert(0, "teacher")   # once per shape: it does not depend on the student
                teacher_done = True
            if arms:
                specs.append({**common, "layers": layers, "stage": stage, "arms": arms})
    return specs


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict], reference: str | None) -> str:
    """One row per arm; with several trees, tokens/s over the ``reference`` tree's same arm."""
    head = ("| tree | shape | layers | stage | arm | batch | tokens/s | p90/p50 | MFU | host s | "
            "kernel s | GPU busy | kernels | aten ops | peak GiB |"
            + (f" vs {reference} |" if reference else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    def key(r: dict) -> tuple:
        return r["shape"], r["layers"], r["stage"], r["arm"], r.get("micro_batch")
    references = {key(r): r for r in results if r.get("tree") == reference and not r.get("error")}
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['tree']} | {r['shape']} | {r['layers']} | {r['stage']} | "
                         f"{r['arm']} | failed: see the logs |")
            continue
        row = (f"| {r['tree']} | {r['shape']} | {r['layers']} | {r['stage']} | {r['arm']} | "
               f"{r['micro_batch']}×{r['seq']} | {r['tokens_per_s']:.0f} | "
               f"{r['p90_over_p50']:.2f} | {cell(r.get('mfu'), '.3f')} | "
               f"{cell(r.get('host_self_cpu_s'), '.3f')} | {cell(r.get('kernel_s'), '.3f')} | "
               f"{cell(r.get('gpu_busy'), '.0%')} | {cell(r.get('kernels'), 'd')} | "
               f"{cell(r.get('aten_ops'), 'd')} | {cell(r.get('peak_gib'), '.1f')} |")
        if reference:
            base = references.get(key(r))
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and base is not r else None
            row += f" {cell(ratio, '.2f')}{'×' if ratio else ''} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", "--shape", nargs="+", default=["135m"],
                        choices=["135m", "1b", "tiny"])
    parser.add_argument("--layers", nargs="+", default=["hybrid", "all"],
                        choices=["hybrid", "all"])
    parser.add_argument("--stages", nargs="+", default=["kd"], choices=["kd", "align"])
    parser.add_argument("--arms", nargs="+", default=["trainer", "plain", "teacher"],
                        choices=["trainer", "plain", "teacher"])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=None,
                        help="rows per micro step (default per shape: 135m 8 32, 1b 16)")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per row (default per shape: 135m 1024, 1b 2048)")
    parser.add_argument("--docs-per-row", type=int, default=1,
                        help="packed rows: this many documents of random lengths in each row")
    parser.add_argument("--vary-packing", action="store_true",
                        help="with --docs-per-row: new random document lengths every step of "
                             "the trainer arm (real packed data; a fixed layout never recompiles)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--baseline-tree", default=None, type=Path,
                        help="an older checkout of this repository, measured in the same run")
    parser.add_argument("--baseline-arms", nargs="+", default=None,
                        choices=["trainer", "plain", "teacher"],
                        help="the baseline tree's arms (default: --arms)")
    parser.add_argument("--variant", action="append", default=[],
                        type=named_overrides("--variant", "compile='--train.compile default'"),
                        help="NAME='--section.key value ...': our tree again with these config "
                        "overrides, as tree ours:NAME (repeatable)")
    parser.add_argument("--variant-arms", nargs="+", default=None,
                        choices=["trainer", "plain", "teacher"],
                        help="the variants' arms (default: --arms)")
    parser.add_argument("--workdir", default=None, type=Path,
                        help="teacher checkpoints and logs (default: a new temporary dir)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per arm group")
    parser.add_argument("--json", default=None, type=Path, help="write every result here")
    args, overrides = parser.parse_known_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.baseline_tree is not None and not (args.baseline_tree / "services/trainer").is_dir():
        parser.error(f"--baseline-tree {args.baseline_tree} is not a checkout of this repository "
                     "(no services/trainer); give the root of one, e.g. a git worktree")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-steps-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "4"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    trees = [("ours", ROOT, overrides, args.arms)]
    trees += [(f"ours:{name}", ROOT, overrides + extra, args.variant_arms or args.arms)
              for name, extra in args.variant]
    if args.baseline_tree is not None:
        # the same config overrides: an A/B of the code at one configuration
        trees.insert(0, ("baseline", args.baseline_tree.resolve(), overrides,
                         args.baseline_arms or args.arms))
    reference = trees[0][0] if len(trees) > 1 else None
    results: list[dict] = []
    for shape in args.shapes:
        for spec in specs_for(args, shape, work):
            for name, tree, extra, arms in trees:  # interleaved: baseline, ours, variants, ...
                arms = [a for a in spec["arms"] if a in arms]
                if arms:
                    results += run_group({**spec, "arms": arms, "tree": name, "overrides": extra},
                                         tree, env, args.timeout, work / "logs")
                    # so far, in case the whole run is cut short
                    (work / "results.json").write_text(json.dumps(results, indent=1))
                    (work / "table.md").write_text(table(results, reference) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for r in results:
        if r.get("top_aten"):
            top = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in r["top_aten"].items())
            print(f"- {r['tree']} {r['shape']} {r['layers']} {r['stage']} {r['arm']} "
                  f"{r['micro_batch']}: top aten ops per step: {top}")
        if r.get("top_kernels"):
            top = "; ".join(f"{k} x{n} {ms:.1f} ms" for k, (n, ms) in
                            list(r["top_kernels"].items())[:10])
            print(f"  kernels of most time: {top}")
        if r.get("kernel_kinds"):
            kinds = "; ".join(f"{k} x{n} {ms:.1f} ms" for k, (n, ms) in r["kernel_kinds"].items())
            print(f"  kernel time by kind: {kinds}")
        if r.get("idle") and "by_op" in r["idle"]:
            where = "; ".join(f"{k} x{n} {ms:.1f} ms" for k, (n, ms) in
                              list(r["idle"]["by_op"].items())[:8])
            print(f"  GPU idle {r['idle']['idle_ms']:.1f} ms in {r['idle']['gaps']} gaps, "
                  f"during: {where}")
    print(f"\nresults and logs in {work}; MFU: shared/flops.py's student step + teacher forward "
          "over the card's datasheet bf16 peak; host s = self CPU time of one profiled step; "
          "GPU busy = the union of its kernels' intervals / the median unprofiled step\n")
    print(table(results, reference))


if __name__ == "__main__":
    main()
