"""The demo's teacher and data: made once under the run directory, reused while they fit.

A tiny Llama teacher (``python -m shared.tiny``) given a short language-model training so
that it has something to distil, a C4-layout sample of the system's documentation
(``python -m services.data.c4_sample``), and that sample prepared for the trainer with a held-out
validation split (``python -m services.data c4``). :func:`prepare` is the entry point;
run as a script it prepares a run directory alone, for the CPU stack in Docker (make up-cpu):

    python -m demo.prepare --run-dir runs/cpu [--teacher-steps N] [--fresh]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from demo.common import TEACHER_NAME, quiet_transformers, run, say, step_title

MAX_LEN = 128
VALIDATION_SIZE = 64
PRETRAIN_STAMP = "demo_pretraining.json"


def c4_ready(c4: Path) -> bool:
    from services.data.c4_sample import TRAIN_NAME, VALIDATION_NAME

    return (c4 / "en" / TRAIN_NAME).is_file() and (c4 / "en" / VALIDATION_NAME).is_file()


def data_ready(data: Path, teacher: Path) -> bool:
    from shared.data_card import check_tokenizer_fingerprint
    from shared.fingerprint import tokenizer_fingerprint

    if not (data / "card.json").is_file():
        return False
    try:
        check_tokenizer_fingerprint(data, tokenizer_fingerprint(teacher))
    except Exception:  # noqa: BLE001 - any mismatch or unreadable card: prepare again
        return False
    return True


def teacher_ready(teacher: Path, steps: int) -> bool:
    try:
        stamp = json.loads((teacher / PRETRAIN_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (teacher / "config.json").is_file() and stamp.get("steps") == steps


def pretrain_teacher(teacher: Path, data: Path, steps: int, micro_batch: int = 16,
                     lr: float = 5e-3, seed: int = 0) -> dict[str, float]:
    """A short causal-LM training of the tiny teacher on the train split (AdamW, cosine)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.data_loader import TrainBatches
    from shared.losses import ce_loss

    quiet_transformers()
    torch.manual_seed(seed)
    # One thread: tiny matrices gain little from more, and OpenMP threads that spin on a
    # busy machine can make every step several times slower.
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    model.train()
    batches = TrainBatches(data, micro_batch, seed=seed).forever()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 15)
    first = last = float("nan")
    t0 = time.monotonic()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = next(batches)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = ce_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = float(loss.detach())
        if step == 0:
            first = last
        if step == 0 or (step + 1) % 50 == 0 or step + 1 == steps:
            say(f"  teacher LM step {step + 1}/{steps}: loss {last:.3f} "
                f"(perplexity {math.exp(last):.0f}), {time.monotonic() - t0:.0f} s")
    model.save_pretrained(str(teacher))
    stamp = {"steps": steps, "micro_batch_size": micro_batch, "lr": lr, "seed": seed,
             "first_loss": first, "last_loss": last, "data": str(data),
             "note": "tiny random Llama (python -m shared.tiny) given a short LM training by "
                     "python -m demo so that it has something to distil"}
    (teacher / PRETRAIN_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def make_c4(c4: Path, max_mb: float) -> None:
    """The C4-format sample of the system's documentation, unless it is already there."""
    if not c4_ready(c4):
        step_title(f"C4-format sample of the system's documentation: {c4}")
        run([sys.executable, "-m", "services.data.c4_sample", "--output", c4, "--max-mb",
             str(max_mb)], what="services.data.c4_sample")


def tokenise(c4: Path, teacher: Path, data: Path, max_len: int, validation_size: int) -> None:
    """The sample prepared for the trainer with the teacher's tokenizer (length buckets, a
    held-out validation split)."""
    step_title(f"Preparing the data with {teacher.name}'s tokenizer: {data}")
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))  # 2 cores: one worker, as before
    run([sys.executable, "-m", "services.data", "c4", "--local_c4_dir", c4, "--languages", "en",
         "--split", "train", "--tokenizer", teacher, "--output_dir", data, "--max_len",
         str(max_len), "--buckets", str(max(32, max_len // 4)), "--long_docs", "split",
         "--validation_size", str(validation_size), "--num_proc", str(workers), "--overwrite"],
        quiet=True,
        what="data preparation")
    splits = json.loads((data / "card.json").read_text())["splits"]
    say(f"  {splits['train']['samples']} train / {splits['validation']['samples']} "
        f"validation samples of at most {max_len} tokens, {splits['train']['tokens']} "
        f"train tokens")


def prepare(run_dir: Path, teacher_steps: int, fresh: bool) -> tuple[Path, Path, Path]:
    """Tiny teacher, C4 sample and prepared data under run_dir, reused when already there."""
    models, c4, data = run_dir / "models", run_dir / "c4", run_dir / "data"
    teacher = models / TEACHER_NAME
    if fresh:
        for path in (teacher, c4, data):
            shutil.rmtree(path, ignore_errors=True)
    new_teacher = not teacher_ready(teacher, teacher_steps)
    if new_teacher:
        step_title(f"Tiny teacher: {teacher}")
        shutil.rmtree(teacher, ignore_errors=True)
        run([sys.executable, "-m", "shared.tiny", "--output", teacher], quiet=True,
            what="shared.tiny")
    else:
        say(f"\n==> Reusing the teacher {teacher} (--fresh to make a new one)")
    make_c4(c4, 2)
    if new_teacher or not data_ready(data, teacher):
        tokenise(c4, teacher, data, MAX_LEN, VALIDATION_SIZE)
    if new_teacher:
        if teacher_steps > 0:
            step_title(f"Teaching the tiny teacher some English ({teacher_steps} LM steps on "
                       "the train split)")
            pretrain_teacher(teacher, data, teacher_steps)
        else:
            (teacher / PRETRAIN_STAMP).write_text(json.dumps({"steps": 0}) + "\n")
    return teacher, c4, data


def prepare_real(run_dir: Path, teacher: Path, c4_mb: float, max_len: int,
                 validation_size: int, fresh: bool) -> tuple[Path, Path]:
    """The C4 sample and its data tokenised for the real teacher (which needs no training)."""
    c4 = run_dir / ("c4" if c4_mb == 2 else f"c4-{c4_mb:g}mb")
    data = run_dir / f"data-{teacher.name}-{max_len}"
    if fresh:
        for path in (c4, data):
            shutil.rmtree(path, ignore_errors=True)
    make_c4(c4, c4_mb)
    if not data_ready(data, teacher) or \
            json.loads((data / "card.json").read_text()).get("max_len") != max_len:
        tokenise(c4, teacher, data, max_len, validation_size)
    return c4, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Make the demo's tiny teacher and data in a run "
                                 "directory (models/, c4/, data/), reused while they fit.")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--teacher-steps", type=int, default=600,
                    help="LM training steps of the tiny teacher (0: keep it random)")
    ap.add_argument("--fresh", action="store_true", help="make a new teacher and dataset")
    args = ap.parse_args(argv)
    teacher, _, data = prepare(args.run_dir.resolve(), args.teacher_steps, args.fresh)
    say(f"teacher {teacher}\ndata    {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
