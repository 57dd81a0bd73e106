#!/usr/bin/env python
"""What resetting state at packed-document boundaries costs the student.

Rows of ``--seq`` tokens are packed greedily with documents whose lengths follow a seeded
log-normal distribution (median ``--median-doc`` tokens). For each student (every other layer
converted, and all layers) it times forward + backward of one micro batch three ways:

* ``reset``: position ids restart per document (attention: block-diagonal mask; RWKV: each
  document from a zero state, run as length-grouped batches of whole documents) — what the
  trainer does with ``--pack`` data;
* ``no reset``: the same rows as if each were one long document (the baseline: what the rows
  cost when documents are allowed to see each other);
* ``one per row``: the same documents, one per row, padded to the longest (what packing avoids).

    python -m benchmarks.bench_packing                 # CPU-sized defaults
    python -m benchmarks.bench_packing --device cuda --hidden 4096 --heads 32 --kv-heads 8 \\
        --seq 2048

Times are medians over ``--reps`` after one warm-up; the table (tokens/s and ratios against
``no reset`` in the same run) is printed last.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from shared.student import convert_teacher
from shared.tiny import tiny_teacher


def pack(seq: int, rows: int, median: float, seed: int) -> list[list[int]]:
    """Document lengths per row, packed greedily in order (as ``--pack`` does)."""
    gen = torch.Generator().manual_seed(seed)
    out, row, used = [], [], 0
    while len(out) < rows:
        n = int(min(seq, max(4, torch.empty(1).log_normal_(float(torch.tensor(median).log()), 1.0,
                                                             generator=gen).item())))
        if used + n > seq:
            out.append(row)
            row, used = [], 0
        row.append(n)
        used += n
    return out


def timed(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--median-doc", type=float, default=150.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mixer", default="rwkv7", choices=["rwkv6", "rwkv7"])
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    teacher = tiny_teacher("llama", layers=args.layers, hidden=args.hidden, heads=args.heads,
                           kv_heads=args.kv_heads, vocab=1000)
    rows = pack(args.seq, args.batch, args.median_doc, seed=0)
    docs = [n for row in rows for n in row]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=gen)
    lengths = torch.tensor([sum(row) for row in rows])
    positions = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        at = 0
        for n in row:
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = positions[r, at - 1] + 1 + torch.arange(args.seq - at)
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    longest = max(docs)
    single = torch.randint(3, 1000, (len(docs), longest), generator=gen)
    single_mask = (torch.arange(longest)[None] < torch.tensor(docs)[:, None]).long()
    tokens = int(lengths.sum())
    print(f"{args.batch} rows of {args.seq}: {len(docs)} documents, {tokens} real tokens, "
          f"lengths {min(docs)}..{longest} (median {statistics.median(docs):.0f})", flush=True)

    results = []
    dev = args.device
    for name, layers in (("every other layer", list(range(1, args.layers, 2))),
                         ("all layers", "all")):
        student = convert_teacher(teacher, dict(layers=layers, mixer=args.mixer))
        student = student.to(dev, dtype).train()

        def step(model=student, **batch):  # model bound now: the closure outlives this iteration
            def run():
                model.zero_grad(set_to_none=True)
                out = model(**{k: v.to(dev) for k, v in batch.items()}, use_cache=False)
                out.logits.float().mean().backward()
            return run

        base = timed(step(input_ids=ids, attention_mask=mask), args.reps, dev)
        reset = timed(step(input_ids=ids, attention_mask=mask, position_ids=positions),
                      args.reps, dev)
        per_row = timed(step(input_ids=single, attention_mask=single_mask), args.reps, dev)
        for how, sec in (("no reset (baseline)", base), ("reset per document", reset),
                         ("one document per row", per_row)):
            results.append((name, how, tokens / sec, base / sec))
        print(f"{name}: done", flush=True)

    print(f"\n| student ({args.mixer}) | rows | real tokens/s (fwd+bwd) | vs no reset |")
    print("|---|---|---|---|")
    for name, how, tps, ratio in results:
        print(f"| {name} | {how} | {tps:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
