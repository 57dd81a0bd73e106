"""Host time the trainer spends reading one micro batch (shared/data_loader.TrainBatches: rows
from the memory-mapped buckets, then collate), in this tree and, with ``--baseline-tree``, an
older checkout, alternated in fresh processes on the same prepared dataset (issue 19: the step
reads its batches in the training process's own thread, so at a host-bound shape each
millisecond here is a millisecond of the step).

    python -m benchmarks.bench_loader --data DIR [--micro-batch 32] [--baseline-tree OLD]

DIR: a dataset of ``python -m services.data`` (e.g. ``text --pack --pack_fill --max_len 1024``).
A Markdown table last: ms per micro batch (the median of ``--repeats`` runs of ``--batches``
batches each, after ``--warmup``), tokens per batch, the ratio to the first tree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT

CHILD = """
import json, sys, time
from shared.data_loader import TrainBatches
data, mbs, warmup, batches, repeats = sys.argv[1], *map(int, sys.argv[2:6])
stream = TrainBatches(data, mbs).forever()
for _ in range(warmup):
    next(stream)
runs, tokens = [], 0
for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(batches):
        tokens = int(next(stream)["lengths"].sum())
    runs.append((time.perf_counter() - t) / batches)
print(json.dumps({"seconds": runs, "tokens": tokens}))
"""


def measure(tree: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.data), str(args.micro_batch),
                          str(args.warmup), str(args.batches), str(args.repeats)],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the trees")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="an older checkout of this repository, measured alternately")
    args = parser.parse_args(argv)
    trees = [("ours", ROOT)]
    if args.baseline_tree is not None:
        if not (args.baseline_tree / "shared/data_loader.py").is_file():
            parser.error(f"--baseline-tree {args.baseline_tree}: no shared/data_loader.py there")
        trees.insert(0, ("baseline", args.baseline_tree.resolve()))
    seconds: dict[str, list[float]] = {name: [] for name, _ in trees}
    tokens = {}
    for _ in range(args.rounds):
        for name, tree in trees:
            result = measure(tree, args)
            seconds[name] += result["seconds"]
            tokens[name] = result["tokens"]
    first = statistics.median(seconds[trees[0][0]])
    print("| tree | ms per micro batch (median) | min–max ms | tokens in the last batch | "
          "ratio |\n|---|---|---|---|---|")
    for name, _ in trees:
        ms = [s * 1e3 for s in seconds[name]]
        median = statistics.median(seconds[name])
        print(f"| {name} | {median * 1e3:.2f} | {min(ms):.2f}–{max(ms):.2f} | {tokens[name]:,} "
              f"| {first / median:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
