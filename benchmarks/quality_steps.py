"""The quality experiment's steps that are not training stages (benchmarks/quality.py): each
command run with its log, the data each arm trains on (the corpus packed, the teacher's own
conversations, the corpus as conversations) and the control's random start."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Set on SIGTERM (a device call's time limit, sent to the whole process group): every stage
# running gets it too, checkpoints and exits; this process waits for them, then stops, so the
# call does not end while a checkpoint is half written and the same command resumes the stage.
STOPPING = threading.Event()


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; return its seconds; raise on failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, check=False)
    if STOPPING.is_set():
        raise SystemExit(f"stopped by SIGTERM after {' '.join(cmd[:3])} exited "
                         f"{done.returncode} (its log: {log}); the same command resumes")
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def prepare_data(corpus: Path, teacher: Path, work: Path, max_len: int = 1024) -> Path:
    """The training corpus packed into rows of ``max_len`` (work/data/train, or train<max_len>
    for another length)."""
    out = work / "data" / ("train" if max_len == 1024 else f"train{max_len}")
    if (out / "card.json").is_file():
        return out
    run([sys.executable, "-m", "services.data", "text", "--paths", str(corpus / "train.jsonl"),
         "--tokenizer", str(teacher), "--output_dir", str(out), "--max_len", str(max_len),
         "--pack", "--long_docs", "split",  # truncate kept 3.7M of ~10M tokens (2026-12-01)
         "--pack_fill",  # rows 100 % full, not 91 % (runs before 2026-12-03's eighth: whole)
         "--num_proc", str(min(16, os.cpu_count() or 1)), "--overwrite"],
        work / f"{out.name}-data.log")
    return out


def chat_data(teacher: Path, work: Path, conversations: int) -> Path:
    """Conversations the teacher writes (self-instruct) as a kd dataset (services.data)."""
    out, chats = work / "data" / "chat", work / "chats.jsonl"
    if (out / "card.json").is_file():
        return out
    # 2026-12-02 on the H200, 256 rows a batch and 256 tokens a turn: 2.5 conversations/s
    # beside a training stage, one row in three kept; on CPU the dropped replies were all
    # "unfinished" (21 of 32 ran past 256 tokens). So: replies up to 768 tokens (a conversation
    # still fits a 1024-token row), questions up to 128, 1024 rows a batch (a 135M teacher's
    # step is host-bound at small widths, issue 19). Not yet measured on the GPU.
    run([sys.executable, "-m", "services.data", "generate", "--teacher", str(teacher),
         "--output", str(chats), "--conversations", str(conversations), "--device", "auto",
         "--batch_size", "1024", "--max_new_tokens", "768", "--max_user_tokens", "128"],
        work / "chat-generate.log")
    return chat_rows(chats, teacher, out)


def chat_rows(conversations: Path, teacher: Path, out: Path) -> Path:
    """Conversations (``{"messages": ...}`` lines) in the teacher's chat template, packed into
    1024-token rows, not padded (packed rows train in one pass on fla: student.packed_layout)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "services.data", "chat", "--paths", str(conversations),
         "--tokenizer", str(teacher), "--output_dir", str(out), "--max_len", "1024", "--pack",
         "--num_proc", str(min(16, os.cpu_count() or 1)), "--overwrite"],
        out.parent / f"{out.name}-data.log")
    return out


def wrapped_data(corpus: Path, teacher: Path, work: Path) -> Path:
    """The training corpus as conversations (``services.data wrap``: a user asks for a page,
    the assistant writes it), a kd dataset in the chat template (the ``wrap`` arm)."""
    from benchmarks.quality_corpus import WRAP_ASK, WRAP_ASK_MORE

    out, conversations = work / "data" / "wrap", work / "wrapped.jsonl"
    if (out / "card.json").is_file():
        return out
    run([sys.executable, "-m", "services.data", "wrap", "--paths", str(corpus / "train.jsonl"),
         "--output", str(conversations), "--ask", WRAP_ASK, "--ask_more", WRAP_ASK_MORE],
        work / "wrap-conversations.log")
    return chat_rows(conversations, teacher, out)


def random_student(teacher: Path, out: Path) -> Path:
    """The control's start: the all-RWKV-7 student's architecture, every weight re-drawn."""
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from shared.student import convert_teacher, save_student
from shared.student.layers import _RWKVModule
torch.manual_seed(0)
teacher = AutoModelForCausalLM.from_pretrained({str(teacher)!r}, dtype=torch.float32)
student = convert_teacher(teacher, {{"layers": "all", "mixer": "rwkv7", "mode": "block"}})
with torch.no_grad():
    for p in student.parameters():
        p._is_hf_initialized = False
    for m in student.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif type(m).__name__.endswith("RMSNorm"):
            m.weight.fill_(1.0)
    for m in student.modules():
        if isinstance(m, _RWKVModule):
            m.reset_parameters()  # RWKV-LM's own initialisation of the new layers
save_student(student, AutoTokenizer.from_pretrained({str(teacher)!r}), {str(out)!r})
"""
    if not (out / "config.json").is_file():
        run([sys.executable, "-c", code], out.with_suffix(".log"))
    return out
