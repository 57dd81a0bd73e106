"""Trainer throughput with the teacher service, async prefetch on vs off, in one run.

On a machine with N ≥ 2 GPUs: the teacher service on GPU 0, trainer ranks on GPUs 1..n-1
(one teacher group), a 1B-class Llama-shaped teacher with random weights and its hybrid
student (configs/bench_1b.yaml), stage kd on full bf16 logits. For each trainer count and
each prefetch setting the same job runs; tokens/s and the teacher-wait share are measured
over the steps after warm-up, the teacher busy share from its forward_seconds metric.
Prints a markdown table last.

    python scripts/bench_trainer.py --tokenizer bench/tok --data bench/data2048 --gpus 2,4
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.metrics import scrape  # noqa: E402
WARMUP_STEPS = 5


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("teacher exited during start-up")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError("teacher not healthy in time")


def run(args, model: Path, trainers: int, prefetch: bool, work: Path, env: dict) -> dict:
    name = f"n{trainers}-{'prefetch' if prefetch else 'sync'}"
    out = work / name
    common = ["--config", "configs/bench_1b.yaml", "--teacher.model_path", str(model),
              "--link.rendezvous_dir", str(work / f"rdv-{name}"),
              "--link.trainers_per_group", str(trainers), "--link.prefetch", str(prefetch).lower(),
              "--teacher.metrics_port", "19400", "--train.steps", str(args.steps),
              "--student.kernel", args.kernel]
    teacher = subprocess.Popen([sys.executable, "-m", "services.teacher", *common, "--group", "0",
                                "--device-id", "0"], cwd=ROOT, env=env,
                               stdout=open(work / f"{name}-teacher.log", "w"),
                               stderr=subprocess.STDOUT)
    try:
        wait_healthy(19400, teacher)
        t0 = time.time()
        trainer = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             str(trainers), "-m", "services.trainer", *common, "--data.train_dir", args.data,
             "--train.output_dir", str(out), "--train.device_offset", "1",
             "--train.metrics_port", "19500"], cwd=ROOT, env=env, capture_output=True, text=True)
        (work / f"{name}-trainer.log").write_text(trainer.stdout + trainer.stderr)
        if trainer.returncode != 0:
            print(trainer.stdout[-3000:], trainer.stderr[-3000:])
            raise RuntimeError(f"{name}: trainer failed")
        metrics = scrape(19400)
    finally:
        teacher.send_signal(signal.SIGTERM)
        teacher.wait(120)
    rows = [[json.loads(line) for line in (out / f"steps-rank{r}.jsonl").read_text().splitlines()]
            for r in range(trainers)]
    steady = [[s for s in r if s["step"] > WARMUP_STEPS] for r in rows]
    span = max(s["end"] for s in steady[0]) - min(s["start"] for s in steady[0])
    tokens = sum(s["tokens"] for r in steady for s in r)
    wait = sum(s["teacher_wait"] for s in steady[0])
    step_time = sum(s["seconds"] for s in steady[0])
    fwd = metrics['distill_teacher_forward_seconds_sum{group="0"}']
    batches = metrics['distill_teacher_batches_total{group="0"}']
    return {"run": name, "trainers": trainers, "prefetch": prefetch,
            "tokens_per_s": tokens / span, "teacher_wait_share": wait / step_time,
            "step_s": step_time / len(steady[0]),
            "teacher_forward_ms": 1000 * fwd / max(batches, 1),
            "teacher_busy_share_whole_run": fwd / max(time.time() - t0, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--gpus", default="2", help="comma list of GPU counts to use")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--kernel", default="auto", choices=["auto", "fla", "chunk"])
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trainer-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "NCCL_NVLS_ENABLE": "0",
           "OMP_NUM_THREADS": "4"}
    model = work / "llama-1b"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "shared.tiny", "--output", str(model), "--tokenizer",
                        args.tokenizer, "--hidden-size", "2048", "--layers", "16", "--heads", "32",
                        "--kv-heads", "8", "--intermediate-size", "8192", "--model-vocab-size",
                        "128256", "--dtype", "bfloat16", "--device", "cuda"], cwd=ROOT, env=env,
                       check=True)
    results = []
    for n in [int(x) for x in args.gpus.split(",")]:
        for prefetch in (True, False):
            results.append(run(args, model, n - 1, prefetch, work, env))
            print(json.dumps(results[-1]), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print("| trainers | prefetch | tokens/s (all ranks) | teacher-wait share | step s | "
          "teacher fwd ms | speed-up vs sync |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        base = next(b for b in results if b["trainers"] == r["trainers"] and not b["prefetch"])
        print(f"| {r['trainers']} | {'on' if r['prefetch'] else 'off'} | {r['tokens_per_s']:.0f} | "
              f"{r['teacher_wait_share']:.1%} | {r['step_s']:.3f} | {r['teacher_forward_ms']:.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× |")


if __name__ == "__main__":
    main()
