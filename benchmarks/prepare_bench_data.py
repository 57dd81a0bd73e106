#!/usr/bin/env python
"""The benchmarks' tokenizer and data, from Debian's documentation (no network): bench/tok (a
byte-level BPE of 8,000 entries) and bench/data2048, rows of exactly 2048 tokens wherever the
text allows — documents are joined into ~1 MB texts and split, so shapes stay fixed and a
benchmark times training, not the compilation of new shapes.

    python -m benchmarks.prepare_bench_data [--out bench] [--max-mb 4]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench")
    parser.add_argument("--max-mb", type=float, default=4.0)
    args = parser.parse_args()
    from shared.tiny import train_tokenizer

    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    subprocess.run([sys.executable, "-m", "services.data.c4_sample", "--output", str(tmp / "c4"),
                    "--max-mb", str(args.max_mb)], cwd=ROOT, check=True, capture_output=True)
    texts = [json.loads(line)["text"]
             for line in gzip.open(tmp / "c4/en/c4-train.00000-of-01024.json.gz", "rt")]
    joined, current = [], []
    for text in texts:
        current.append(text)
        if sum(map(len, current)) > 1_000_000:
            joined.append("\n\n".join(current))
            current = []
    joined.append("\n\n".join(current))
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in joined))
    if not (out / "tok" / "tokenizer.json").is_file():
        train_tokenizer(out / "tok", vocab_size=8000)
    subprocess.run([sys.executable, "-m", "services.data", "text", "--paths", str(corpus),
                    "--tokenizer", str(out / "tok"), "--output_dir", str(out / "data2048"),
                    "--max_len", "2048", "--long_docs", "split", "--overwrite"], cwd=ROOT,
                   check=True)


if __name__ == "__main__":
    main()
