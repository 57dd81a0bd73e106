"""Packed rows filled to the row length against whole documents: the trainer's kd speed on the
same text (issue 19; ``python -m services.data --pack_fill``, docs/data.md).

    python -m benchmarks.bench_packfill --tokenizer bench/smoltok --teacher-config CONFIG.json \
        --data whole=DIR --data fill=DIR --work /root/packfill [--steps 60] [--trainer-args ...]

Each ``--data`` is a dataset made by ``services.data text --pack`` (with or without
``--pack_fill``) from the same documents; the first is the baseline. The teacher is the model of
``--teacher-config`` (a Hugging Face config.json, e.g. SmolLM2-135M's) with random weights and
the data's tokenizer: speed does not depend on the weights. Each dataset trains one kd stage of
``--config`` (default the hybrid recipe, configs/smollm2_hybrid_kd.yaml) in its own process;
per step, tokens/s is its real (unpadded) tokens over its seconds, and the table shows medians
over the steps after ``--skip`` (compilation and warm-up). Last it prints the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.quality_steps import ROOT, run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def random_teacher(config_file: Path, tokenizer: Path, out: Path) -> Path:
    """A model of ``config_file``'s architecture, random bf16 weights, the given tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_file)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out / name)
    return out


def stage_steps(name: str, data: Path, teacher: Path, args: argparse.Namespace) -> list[dict]:
    """Train one kd stage on ``data``; its per-step records (steps-rank0.jsonl)."""
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "services.trainer", "--config", str(args.config),
           "--teacher.model_path", str(teacher), "--data.train_dir", str(data),
           "--train.output_dir", str(out), "--train.steps", str(args.steps),
           "--train.save_at_end", "false", *args.trainer_args.split()]
    run(cmd, args.work / f"{name}.log")  # raises with the log's tail on failure
    return [json.loads(line) for line in (out / "steps-rank0.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="the data's tokenizer")
    parser.add_argument("--teacher-config", type=Path, required=True, help="a config.json")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DIR",
                        help="a packed dataset; the first is the baseline")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/smollm2_hybrid_kd.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out")
    parser.add_argument("--trainer-args", default="", help="more --section.key value pairs")
    args = parser.parse_args(argv)
    if args.skip >= args.steps:
        parser.error("--skip must be below --steps")
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = random_teacher(args.teacher_config, args.tokenizer, args.work / "teacher")
    rows, base = [], None
    for spec in args.data:
        name, _, path = spec.partition("=")
        card = json.loads((Path(path) / "card.json").read_text())
        train = card["splits"]["train"]
        steps = stage_steps(name, Path(path), teacher, args)[args.skip:]
        tps = statistics.median(s["tokens"] / s["seconds"] for s in steps)
        base = base or tps
        rows.append(f"| {name} | {train['samples']:,} | "
                    f"{train['tokens'] / (train['samples'] * card['max_len']):.3f} | "
                    f"{statistics.median(s['tokens'] for s in steps):,.0f} | "
                    f"{statistics.median(s['seconds'] for s in steps):.3f} | {tps:,.0f} | "
                    f"{tps / base:.2f}x |")
    print("| data | rows | row fill | tokens/step | step s | tokens/s | vs first |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
