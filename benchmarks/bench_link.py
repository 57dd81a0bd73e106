"""Teacher-link transfer bandwidth over NCCL vs a raw NCCL send/recv of the same bytes.

Runs on a machine with ≥ 2 GPUs. The teacher service (GPU 1) answers requests for
3×2048 full bf16 logits over a 128,256-token vocabulary (1.58 GB, Llama-3's shape) from a
trainer in this process (GPU 0); the raw baseline sends the same number of bytes between the
same GPUs with a ProcessGroupNCCL built on a FileStore, in the same run. Also reports the NCCL
transport the link used (from NCCL_DEBUG=INFO). Prints a markdown table last.

    python -m benchmarks.bench_link [--reps 10] [--batch 3 --length 2048 --vocab 128256]
"""
from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from benchmarks.common import ROOT, service_env
from shared.metrics import scrape


def raw_worker(rank: int, store_path: str, numel: int, reps: int, queue) -> None:
    torch.cuda.set_device(1 - rank)            # rank 0 = trainer on GPU 0, rank 1 = GPU 1
    store = dist.FileStore(store_path, 2)
    pg = dist.ProcessGroupNCCL(store, rank, 2, dist.ProcessGroupNCCL.Options())
    buf = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    if rank == 1:
        buf.normal_()
    times = []
    for i in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        work = pg.send([buf], 0, 0) if rank == 1 else pg.recv([buf], 1, 0)
        work.wait()
        torch.cuda.synchronize()
        if i >= 3:                              # the first transfers set up the connection
            times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(times)


def histogram(port: int, name: str, labels: str) -> tuple[float, float]:
    """(sum, count) of one histogram series of the teacher's /metrics."""
    values = scrape(port)
    pick = lambda suffix: next((v for k, v in values.items()  # noqa: E731
                                if k.startswith(f"{name}_{suffix}{{") and labels in k), 0.0)
    return pick("sum"), pick("count")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    from shared.config import load_config
    from shared.fingerprint import tokenizer_fingerprint
    from shared.link import RequestSpec, TeacherClient
    from shared.tiny import make_tiny_llama

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-link-"))
    model = make_tiny_llama(work / "teacher", hidden_size=256, layers=2, heads=4, kv_heads=2,
                            model_vocab_size=args.vocab, dtype="bfloat16")
    port = 19400
    cfg_path = work / "link.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "teacher": {"model_path": str(model), "device": "cuda", "metrics_port": port,
                    "max_tokens_per_request": 1 << 20, "max_batch_tokens": 1 << 16},
        "link": {"rendezvous_dir": str(work / "rdv"), "trainers_per_group": 1,
                 "timeout_seconds": 120}}))
    env = service_env(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,P2P", NCCL_NVLS_ENABLE="0")
    log_path = work / "teacher.log"
    teacher = subprocess.Popen([sys.executable, "-m", "services.teacher", "--config",
                                str(cfg_path), "--group", "0", "--device-id", "1"], cwd=ROOT,
                               env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    torch.cuda.set_device(0)
    cfg = load_config(cfg_path)
    client = TeacherClient(cfg.link, 0, 0, torch.device("cuda", 0),
                           tokenizer_fingerprint(model))
    client.connect()
    ids = torch.randint(0, 500, (args.batch, args.length))
    lengths = torch.full((args.batch,), args.length)
    spec = RequestSpec(logits="bf16")
    for _ in range(3):
        client.request(ids, lengths, spec).result()
    before = histogram(port, "distill_teacher_transfer_seconds", 'direction="send"')
    rtts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        client.request(ids, lengths, spec).result()
        torch.cuda.synchronize()
        rtts.append(time.perf_counter() - t0)
    after = histogram(port, "distill_teacher_transfer_seconds", 'direction="send"')
    fwd = histogram(port, "distill_teacher_forward_seconds", 'group="0"')
    client.close()
    teacher.send_signal(signal.SIGTERM)
    teacher.wait(60)
    nbytes = args.batch * args.length * args.vocab * 2
    link_send = (after[0] - before[0]) / max(after[1] - before[1], 1)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = str(work / "raw-store")
    procs = [ctx.Process(target=raw_worker, args=(r, store, nbytes // 2, args.reps, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    raw = statistics.median(queue.get(timeout=600))
    for p in procs:
        p.join(60)

    log = log_path.read_text()
    transports = sorted(set(re.findall(r"via (P2P/\S+|NET/\S+|SHM\S*)", log)))
    print(f"teacher forward mean {fwd[0] / max(fwd[1], 1) * 1e3:.1f} ms over {int(fwd[1])} batches")
    print()
    rtt = statistics.median(rtts)
    print(f"| what ({args.batch}×{args.length}×{args.vocab} bf16 = {nbytes / 1e9:.2f} GB) "
          "| seconds | GB/s |")
    print("|---|---|---|")
    print(f"| raw NCCL send/recv GPU1→GPU0 (median of {args.reps}) | {raw:.4f} "
          f"| {nbytes / raw / 1e9:.0f} |")
    print(f"| link: teacher send of the logits (mean of {args.reps}) | {link_send:.4f} "
          f"| {nbytes / link_send / 1e9:.0f} |")
    print(f"| link: trainer round trip incl. forward (median) | {rtt:.4f} "
          f"| {nbytes / rtt / 1e9:.0f} |")
    print(f"| link send / raw | {raw / link_send:.2f}× of raw bandwidth | |")
    print(f"| NCCL transport teacher↔trainer | {', '.join(transports) or 'not found in log'} | |")


if __name__ == "__main__":
    main()
