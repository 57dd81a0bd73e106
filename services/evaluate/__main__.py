"""Evaluate exported students against their teacher on held-out text.

    python -m services.evaluate --teacher MODEL_DIR --student STUDENT_DIR [--student ...] \\
        --data held_out.jsonl [--data name=PREPARED_DIR ...] [--prompts prompts.txt] \\
        [--decode-contexts 1024,4096] --json eval.json --markdown eval.md

Per model and set: perplexity, KL(teacher‖student) per token, top-1 agreement with the teacher,
tokens scored (services/evaluate/scores.py); greedy generations side by side for ``--prompts``;
decode tokens/s and peak memory at ``--decode-contexts``. Prints the Markdown report.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from services.evaluate.heldout import EvaluateError, load_set, parse_named
from services.evaluate.models import (
    check_student,
    check_teacher,
    load_student,
    load_teacher,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    unique_names,
)
from services.evaluate.report import markdown
from services.evaluate.scores import score_sets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.evaluate", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="Hugging Face causal-LM directory (its tokenizer is everyone's)")
    parser.add_argument("--student", action="append", default=[], metavar="[NAME=]DIR",
                        help="an exported student directory (repeatable)")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="held-out set: a prepared dataset dir, .jsonl, .parquet or .txt "
                             "(repeatable)")
    parser.add_argument("--max-tokens", type=int, default=200_000,
                        help="scored tokens per set at most")
    parser.add_argument("--seq-len", type=int, default=1024,
                        help="row length for plain-text sets")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    parser.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda:N")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--prompts", default=None,
                        help="greedy generations for these prompts (.txt one a line, or .jsonl "
                             "with 'prompt')")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per generation")
    parser.add_argument("--decode-contexts", default=None, metavar="N,N,...",
                        help="measure decode speed and memory at these prompt lengths")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="greedy steps timed per decode measurement")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    parser.add_argument("--markdown", default=None, metavar="OUT",
                        help="write the report as Markdown")
    return parser


def _contexts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise EvaluateError(f"--decode-contexts {text!r}: give comma-separated token counts, "
                            "e.g. 1024,4096") from exc
    if not values or min(values) < 1:
        raise EvaluateError(f"--decode-contexts {text!r}: every length must be >= 1")
    return values


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, check, load, score; write the outputs; return the report."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.decode_tokens < 1:
        raise EvaluateError("--batch-size, --max-new-tokens and --decode-tokens must be >= 1")
    contexts = _contexts(args.decode_contexts)
    teacher_config = check_teacher(args.teacher)
    named = [parse_named(spec) for spec in args.student]
    for _, path in named:  # configs and tokenizers only: a wrong directory fails in seconds
        check_student(path, args.teacher, teacher_config)
    names = unique_names(["teacher"] + [n or Path(p).name for n, p in named])
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    tokenizer = load_tokenizer(args.teacher, teacher_config)
    # sets and prompts before any weights: a wrong path fails in seconds
    sets = [load_set(spec, tokenizer, args.teacher, args.max_tokens, args.seq_len)
            for spec in args.data]
    set_names = unique_names([s.name for s in sets])
    for held, name in zip(sets, set_names, strict=True):
        held.name = name
    prompts = None
    if args.prompts:
        from services.evaluate.generation import read_prompts

        prompts = read_prompts(args.prompts)
    teacher = load_teacher(args.teacher, device, dtype, names[0])
    models = [teacher] + [load_student(path, device, dtype, name)
                          for (_, path), name in zip(named, names[1:], strict=True)]

    report: dict[str, Any] = {
        "run": {"device": device.type, "dtype": str(dtype).replace("torch.", ""),
                "batch_size": args.batch_size, "seq_len": args.seq_len,
                "max_tokens": args.max_tokens,
                "command": shlex.join(["python", "-m", "services.evaluate",
                                       *(sys.argv[1:] if argv is None else argv)])},
        "models": [{"name": m.name, "role": m.role, "path": m.path, "parameters": m.parameters}
                   for m in models],
        "sets": [{"name": s.name, "path": s.path, "kind": s.kind, "split": s.split,
                  "rows": len(s.rows), "tokens": s.tokens} for s in sets],
    }
    report["scores"] = score_sets(models, sets, args.batch_size)
    if prompts:
        from services.evaluate.generation import answer_summary, side_by_side

        report["generations"] = side_by_side(models, tokenizer, prompts, args.max_new_tokens)
        report["answers"] = answer_summary(report["generations"])
    if contexts:
        from services.evaluate.decode import decode_table

        vocab = teacher.module.get_output_embeddings().weight.shape[0]
        report["decode"] = decode_table(models, contexts, args.decode_tokens, vocab)
    text = markdown(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    print(text)
    return report


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
