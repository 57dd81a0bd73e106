#!/usr/bin/env python
"""Recovery from a killed teacher over NCCL: kill -9 the teacher mid-run, start it again (as
supervisord or Docker's restart policy would), and measure how long the trainer lost.

Teacher service on GPU 0, one trainer rank on GPU 1 (kd, full bf16 logits, prefetch on), a
Llama-shaped teacher of 4 layers (hidden 2048, vocabulary 128,256, random weights). At step
``--kill-at`` the teacher gets SIGKILL and a new teacher process starts at once. Reported: the
teacher's start-up time (process start to /healthz), the seconds the trainer lost (its
``distill_trainer_teacher_reconnect_seconds`` and its log), whether every step ran exactly
once. Prints a table last. Also runs on CPU (Gloo) with a smaller teacher.

    python -m benchmarks.bench_reconnect --tokenizer bench/tok --data bench/data2048
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, TEACHER_PORT, service_env, wait_healthy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--kill-at", type=int, default=10)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.device_count() >= 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-reconnect-"))
    env = service_env(NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="4")
    model = work / "teacher"
    size = ["2048", "4", "16", "8", "128256"] if cuda else ["256", "4", "4", "2", "8000"]
    subprocess.run([sys.executable, "-m", "shared.tiny", "--output", str(model), "--tokenizer",
                    args.tokenizer, "--hidden-size", size[0], "--layers", size[1], "--heads",
                    size[2], "--kv-heads", size[3], "--model-vocab-size", size[4], "--dtype",
                    "bfloat16" if cuda else "float32", "--device", "cuda" if cuda else "cpu"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    common = ["--config", "configs/bench_1b.yaml", "--teacher.model_path", str(model),
              "--link.rendezvous_dir", str(work / "rdv"), "--link.timeout_seconds", "30",
              "--link.heartbeat_seconds", "1", "--teacher.metrics_port", str(TEACHER_PORT),
              "--train.steps", str(args.steps), "--student.layers", "1,3", "--student.mixer",
              "rwkv7", "--student.kernel", "chunk", "--data.micro_batch_size", "1"]
    if not cuda:
        common += ["--teacher.device", "cpu", "--data.max_len", "256"]

    def start_teacher(n: int) -> tuple[subprocess.Popen, float]:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "services.teacher", *common, "--group",
                                 "0", "--device-id", "0"], cwd=ROOT, env=env,
                                stdout=open(work / f"teacher{n}.log", "w"),
                                stderr=subprocess.STDOUT)
        wait_healthy(TEACHER_PORT, proc)
        return proc, time.monotonic() - t0

    teacher, first_start = start_teacher(1)
    out = work / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "services.trainer", *common, "--data.train_dir", args.data, "--train.output_dir",
         str(out), "--train.device_offset", "1" if cuda else "0", "--train.metrics_port", "0"],
        cwd=ROOT, env=env, stdout=open(work / "trainer.log", "w"), stderr=subprocess.STDOUT)
    steps_file = out / "steps-rank0.jsonl"
    restart = None
    try:
        while trainer.poll() is None:
            done = len(steps_file.read_text().splitlines()) if steps_file.is_file() else 0
            if restart is None and done >= args.kill_at:
                killed_at = time.time()
                teacher.send_signal(signal.SIGKILL)
                teacher.wait()
                teacher, restart = start_teacher(2)
            time.sleep(0.05)
    finally:
        teacher.send_signal(signal.SIGTERM)
        teacher.wait(120)
    log = (work / "trainer.log").read_text()
    steps = [json.loads(line)["step"] for line in steps_file.read_text().splitlines()]
    back = re.findall(r"back on generation (\d+) after ([\d.]+) s", log)
    after_kill = [s for s in map(json.loads, steps_file.read_text().splitlines())
                  if s["end"] > killed_at]
    first_after = after_kill[0] if after_kill else None
    print(f"trainer exit code {trainer.returncode}; log in {work / 'trainer.log'}\n")
    print(f"| {'NCCL, 2 GPUs' if cuda else 'Gloo, CPU'} | value |")
    print("|---|---|")
    print(f"| teacher killed after step | {args.kill_at} |")
    print(f"| teacher start-up, first / after the kill (process to /healthz) | "
          f"{first_start:.1f} s / {restart or float('nan'):.1f} s |")
    rejoined = back[0][1] + " s, generation " + back[0][0] if back else "no"
    print(f"| trainer rejoined (its log) | {rejoined} |")
    if first_after:
        print(f"| kill to the end of the next step | {first_after['end'] - killed_at:.1f} s "
              f"(a normal step: {after_kill[-1]['seconds']:.2f} s) |")
    print(f"| steps run / expected, each once | {len(steps)} / {args.steps}, "
          f"{'yes' if steps == list(range(1, args.steps + 1)) else 'NO'} |")
    sys.exit(0 if trainer.returncode == 0 and back else 1)


if __name__ == "__main__":
    main()
