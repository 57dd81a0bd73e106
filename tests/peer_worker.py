"""A torchrun rank for the peer-watch tests: all-reduces in a loop with the watch on.

    torchrun --nproc-per-node 2 tests/peer_worker.py BACKEND TIMEOUT OUT_DIR

Phase 1: rank 1 sleeps 3 x TIMEOUT before its first all-reduce while rank 0 waits in it (on a
GPU: in the NCCL kernel's completion): a slow but live peer, which must not count as lost.
Phase 2: all-reduces until the test stops or kills a rank. Each rank appends its progress to
OUT_DIR/rank-R.txt (its pid first).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from services.trainer.peers import start_peer_watch


def main() -> None:
    backend, timeout, out_dir = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    progress = (out_dir / f"rank-{rank}.txt").open("a", buffering=1)
    progress.write(f"pid {os.getpid()}\n")
    watch = start_peer_watch(timeout)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    watch.arm()
    x = torch.ones(1024, device=device)
    if rank == 1:
        time.sleep(3 * timeout)
    dist.all_reduce(x)
    progress.write(f"phase1 {float(x[0])}\n")
    step = 0
    while True:
        dist.all_reduce(x)
        step += 1
        progress.write(f"step {step} {float(x[0]) > 0}\n")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
