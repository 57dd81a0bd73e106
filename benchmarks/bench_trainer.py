#!/usr/bin/env python
"""Trainer throughput with the teacher service: prefetch on vs off in A/B pairs, the reference
protocol, and the student alone, in one run.

On a machine with ≥ 2 GPUs: one teacher service on GPU 0 serves every arm (each trainer run
joins a new generation); trainer ranks on GPUs 1..n; a Llama-shaped teacher with random weights
(``--shape``) and its hybrid student (``--config``), stage kd.

A first, unmeasured run warms the teacher's and Triton's caches. Arms, each run in a fresh
output directory:
  prefetch   link.prefetch true  (the default)        ┐ alternated --pairs times:
  sync       link.prefetch false                      ┘ on, off, on, off, ...
  reference  link.prefetch false, link.logits fp32    the reference project's serial protocol
  student    benchmarks/bench_student.py on a trainer GPU: no teacher traffic (logits made once)

Per run: tokens/s over the steps after warm-up, median step time, the share of step time spent
waiting for the teacher, the teacher's mean forward time and its busy share (forward time over
step time). Medians over the pairs. Prints a markdown table last.

    python -m benchmarks.bench_trainer --tokenizer bench/tok --data bench/data2048 \\
        --config configs/bench_8b_layers.yaml --shape 8b-layers --pairs 2 --steps 14
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from itertools import pairwise
from pathlib import Path

from benchmarks.common import ROOT, TEACHER_PORT, TRAINER_PORT, service_env, wait_healthy
from shared.metrics import scrape

WARMUP_STEPS = 4
SHAPES = {  # hidden, layers, heads, kv heads, MLP, vocab
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b-layers": (4096, 8, 32, 8, 14336, 128256),
    "tiny": (128, 16, 4, 2, 256, 8000),  # CPU dry runs of this script
}


def teacher_forward() -> tuple[float, float]:
    m = scrape(TEACHER_PORT)
    return (m['distill_teacher_forward_seconds_sum{group="0"}'],
            m['distill_teacher_forward_seconds_count{group="0"}'])


def stall_report(steps: list[dict]) -> str:
    """Where a run's stalled time went: the slowest steps (time inside a step: its teacher
    wait, forward, backward, optimizer) and the longest gaps between one step's end and the
    next one's start (outside the steps: logging, a checkpoint, a pause of the process)."""
    slow = sorted(steps, key=lambda s: -s["seconds"])[:3]
    gaps = sorted(((b["start"] - a["end"], b["step"]) for a, b in pairwise(steps)),
                  reverse=True)[:3]
    return ("slowest steps: " + ", ".join(f"#{s['step']} {s['seconds']:.2f} s (teacher wait "
                                          f"{s['teacher_wait']:.2f} s)" for s in slow)
            + "; longest gaps before: " + ", ".join(f"#{n} {g:.2f} s" for g, n in gaps))


def run_trainer(args, common: list[str], name: str, extra: list[str], work: Path, env: dict,
                trainers: int, profiled: int = 0) -> dict:
    """One trainer run; its last ``profiled`` steps ran under torch.profiler and are left out."""
    out = work / name  # a fresh directory per run: nothing appended to an earlier steps file
    before = teacher_forward()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(trainers), "-m", "services.trainer", *common, *extra, "--data.train_dir", args.data,
         "--train.output_dir", str(out), "--train.device_offset", str(args.device_offset),
         "--train.metrics_port", str(TRAINER_PORT)], cwd=ROOT, env=env, capture_output=True,
        text=True)
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise RuntimeError(f"{name}: trainer failed")
    after = teacher_forward()
    steps = [json.loads(line) for line in (out / "steps-rank0.jsonl").read_text().splitlines()]
    steady = [s for s in steps if WARMUP_STEPS < s["step"] <= args.steps - profiled]
    tokens = sum(s["tokens"] for s in steady) * trainers
    span = max(s["end"] for s in steady) - min(s["start"] for s in steady)
    step_s = statistics.median(s["seconds"] for s in steady)
    fwd_ms = 1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1)
    mean_step = span / len(steady)
    if mean_step > 1.2 * step_s:
        print(f"warning: {name}: mean step {mean_step:.3f} s vs median {step_s:.3f} s: some steps "
              "stalled (new shapes compiling?); use fixed-length data and more steps. "
              f"{stall_report(steady)}", flush=True)
    per_step = statistics.median(s["tokens"] for s in steady) * trainers
    return {"run": name, "tokens_per_s": tokens / span, "step_s": step_s, "mean_step_s": mean_step,
            "median_tokens_per_s": per_step / step_s,  # robust to a stalled step
            "teacher_wait_share": sum(s["teacher_wait"] for s in steady)
            / sum(s["seconds"] for s in steady),
            "teacher_forward_ms": fwd_ms, "teacher_busy_share": fwd_ms / 1e3 / step_s}


def run_student(args, model: Path, work: Path, env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.bench_student", "--config", args.config, "--model",
           str(model), "--data", args.data, "--steps", str(args.steps), "--train.device_offset",
           str(args.device_offset), "--train.output_dir", str(work / "student"), "--modes",
           *args.student_modes]
    if args.trace:
        cmd += ["--trace", args.trace]
    if args.kernel:
        cmd += ["--student.kernel", args.kernel]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (work / "student.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise RuntimeError("student-only run failed")
    return [json.loads(line[7:]) for line in result.stdout.splitlines()
            if line.startswith("RESULT ")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/bench_1b.yaml")
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--trainers", type=int, default=1, help="trainer ranks (GPUs 1..n)")
    parser.add_argument("--pairs", type=int, default=2, help="prefetch on/off pairs")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--kernel", default=None, choices=["auto", "fla", "chunk"])
    parser.add_argument("--student-modes", nargs="*", default=["none", "converted"],
                        help="gradient checkpointing modes of the student-only arm ([] skips it)")
    parser.add_argument("--trace", default=None, help="profiles (teacher, trainer, student) here")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    args.device_offset = 1 if cuda else 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trainer-"))
    env = service_env(NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="4")
    hidden, layers, heads, kv, mlp, vocab = SHAPES[args.shape]
    model = work / f"teacher-{args.shape}"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "shared.tiny", "--output", str(model), "--tokenizer",
                        args.tokenizer, "--hidden-size", str(hidden), "--layers", str(layers),
                        "--heads", str(heads), "--kv-heads", str(kv), "--intermediate-size",
                        str(mlp), "--model-vocab-size", str(vocab), "--dtype",
                        "bfloat16" if cuda else "float32", "--device", "cuda" if cuda else "cpu"],
                       cwd=ROOT, env=env, check=True)
    common = ["--config", args.config, "--teacher.model_path", str(model),
              "--link.rendezvous_dir", str(work / "rdv"), "--link.trainers_per_group",
              str(args.trainers), "--teacher.metrics_port", str(TEACHER_PORT), "--train.steps",
              str(args.steps)]
    if args.kernel:
        common += ["--student.kernel", args.kernel]
    teacher_extra = []
    if args.trace:  # the teacher's forwards of the first run's steady steps
        teacher_extra = ["--teacher.profile_batches", f"{WARMUP_STEPS + 3}-{WARMUP_STEPS + 4}",
                         "--teacher.profile_dir", args.trace]
    teacher = subprocess.Popen([sys.executable, "-m", "services.teacher", *common, *teacher_extra,
                                "--group", "0", "--device-id", "0"], cwd=ROOT, env=env,
                               stdout=open(work / "teacher.log", "w"), stderr=subprocess.STDOUT)
    arms = {"prefetch": ["--link.prefetch", "true"], "sync": ["--link.prefetch", "false"],
            "reference": ["--link.prefetch", "false", "--link.logits", "fp32"]}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    try:
        wait_healthy(TEACHER_PORT, teacher)
        # An unmeasured first run: the teacher's per-shape caches (cuDNN attention plans) and
        # Triton's disk cache fill here, not inside whichever arm would run first (2026-11-30:
        # that made the first arm look 2-10x slower than the ones after it).
        run_trainer(args, common, "warmup", arms["prefetch"], work, env, args.trainers)
        order = [arm for _ in range(args.pairs) for arm in ("prefetch", "sync")] + ["reference"]
        for i, arm in enumerate(order):
            extra = list(arms[arm])
            profiled = 2 if args.trace and i < 2 else 0  # prefetch on and off, once each
            if profiled:
                # The last steps, left out of the figures: a profiled step is slower, and the
                # trace's export after the window took seconds (2026-11-30 call B: the profiled
                # first pair's "stalled steps", mean 1.4-1.6 s against medians of 0.26-0.31 s).
                extra += ["--train.profile_steps", f"{args.steps - 1}-{args.steps}"]
            runs[arm].append(run_trainer(args, common, f"run{i:02d}-{arm}", extra, work, env,
                                         args.trainers, profiled))
            for f in (work / f"run{i:02d}-{arm}").glob("trainer-rank0.*"):
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                f.rename(Path(args.trace) / f"{arm}-{f.name}")
            print(json.dumps(runs[arm][-1]), flush=True)
    finally:
        teacher.send_signal(signal.SIGTERM)
        teacher.wait(120)
    student = run_student(args, model, work, env) if args.student_modes else []
    for r in student:
        print(json.dumps(r), flush=True)

    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])
    (work / "results.json").write_text(json.dumps({"runs": runs, "student": student}, indent=1))
    print(f"\n{args.shape} shapes, {args.trainers} trainer rank(s), steps {WARMUP_STEPS + 1}-"
          f"{args.steps} of each run, medians over {args.pairs} pair(s)\n")
    print("| arm | runs | tokens/s (median step) | tokens/s (span) | step s | teacher wait | "
          "teacher fwd ms | teacher busy |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        print(f"| {arm} | {len(runs[arm])} | {med(arm, 'median_tokens_per_s'):.0f} | "
              f"{med(arm, 'tokens_per_s'):.0f} | "
              f"{med(arm, 'step_s'):.3f} | {med(arm, 'teacher_wait_share'):.1%} | "
              f"{med(arm, 'teacher_forward_ms'):.0f} | {med(arm, 'teacher_busy_share'):.0%} |")
    for r in student:
        print(f"| student alone, checkpointing {r['mode']} | 1 | "
              f"{r['tokens_per_step'] / r['step_s']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s']:.3f} | - | - | - | MFU {r['mfu']:.3f} |")
    print()
    # Ratios of median steps (same tokens per step): one stalled step does not move them.
    pairs = [s["step_s"] / p["step_s"]
             for p, s in zip(runs["prefetch"], runs["sync"], strict=True)]
    print(f"- prefetch vs sync tokens/s, per pair: {', '.join(f'{x:.2f}×' for x in pairs)}")
    print(f"- prefetch vs reference tokens/s: "
          f"{med('reference', 'step_s') / med('prefetch', 'step_s'):.2f}×")
    print(f"- teacher forward prefetch vs sync: "
          f"{med('prefetch', 'teacher_forward_ms') / med('sync', 'teacher_forward_ms'):.2f}×")
    alone = next((r for r in student if r["mode"] == "none"), None)
    if alone:
        print(f"- prefetch step vs student-alone step (same checkpointing): "
              f"{med('prefetch', 'step_s') / alone['step_s']:.3f}×")


if __name__ == "__main__":
    main()
