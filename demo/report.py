"""What the demo shows of its results: generation with the student, and the summary.

:func:`generate` continues a held-out prompt greedily with the exported student (through its
RNN-state cache) and with the teacher; :func:`stage_summary` reads a stage's summary.json,
:func:`kl_summary` picks the KL figures of both stages, and :func:`print_summary` prints the
closing table of ``make demo``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from demo.common import COMPOSE, DemoError, quiet_transformers, run, say

PROMPTS = Path(__file__).with_name("prompts.txt")

# --------------------------------------------------------------------------- generation


def generate(student_dir: Path, teacher_dir: Path, val_text: str, new_tokens: int) -> dict:
    """Greedy continuations of a held-out prompt: the student (RNN-state cache) and teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shared.student  # noqa: F401 - registers rwkv_hybrid with AutoModelForCausalLM

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir), trust_remote_code=False)
    words = val_text.split()
    prompt = " ".join(words[:8])
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out: dict[str, Any] = {"prompt": prompt, "max_new_tokens": new_tokens}
    for name, path in (("student", student_dir), ("teacher", teacher_dir)):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                     trust_remote_code=False).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 use_cache=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - t0
        new = gen.sequences[0, ids["input_ids"].shape[1]:]
        entry = {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": int(len(new)),
                 "seconds": seconds, "class": type(model).__name__,
                 "cache": type(gen.past_key_values).__name__}
        if hasattr(gen.past_key_values, "rwkv_state_nbytes"):
            entry["rwkv_state_bytes"] = int(gen.past_key_values.rwkv_state_nbytes())
            entry["kv_bytes"] = int(gen.past_key_values.kv_nbytes())
            entry["rwkv_layers"] = list(getattr(model.config, "rwkv_layers", []))
        out[name] = entry
    return out


def validation_text(c4: Path) -> str:
    import gzip

    from services.data.c4_sample import VALIDATION_NAME

    with gzip.open(c4 / "en" / VALIDATION_NAME, "rt") as f:
        for line in f:  # prose, not a man page's "NAME" header
            text = json.loads(line)["text"]
            words = text.split()
            if len(words) >= 8 and not words[0].isupper():
                return text
    return "The license grants you the right to"


def evaluate(teacher: Path, students: dict[str, str], data: Path, out: Path, max_tokens: int,
             seq_len: int, new_tokens: int, threads: int | None = None) -> dict[str, Any]:
    """``python -m services.evaluate``: perplexity, KL and top-1 agreement of each student
    against the teacher on the held-out split, and greedy answers to demo/prompts.txt side by
    side; the JSON and Markdown reports go to ``out``."""
    cmd = [sys.executable, "-m", "services.evaluate", "--teacher", str(teacher)]
    for name, path in students.items():
        cmd += ["--student", f"{name}={path}"]
    cmd += ["--data", f"validation={data}", "--prompts", str(PROMPTS), "--max-tokens",
            str(max_tokens), "--seq-len", str(seq_len), "--batch-size", "8",
            "--max-new-tokens", str(new_tokens), "--json", str(out / "evaluation.json"),
            "--markdown", str(out / "evaluation.md")]
    # On a busy CPU, OpenMP threads that spin waiting for each other make it several times
    # slower: the CPU demo gives it one, as compose.demo.yaml gives each service.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    run(cmd, quiet=True, env=env, what="services.evaluate")
    return {"json": str(out / "evaluation.json"), "markdown": str(out / "evaluation.md"),
            "report": json.loads((out / "evaluation.json").read_text())}


# --------------------------------------------------------------------------- summary


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def stage_summary(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "summary.json"
    if not path.is_file():
        raise DemoError(f"{path} is missing: the trainer did not finish its run")
    s = json.loads(path.read_text())
    h = s.get("history", {})
    return {"summary_json": str(path), "steps": s["steps"], "tokens": s["tokens"],
            "tokens_per_second": s["tokens_per_second"],
            "teacher_wait_share": s["teacher_wait_share"], "student": s["student"],
            "train_first": h.get("first"), "train_last": h.get("last"),
            "val_first": h.get("first_val"), "val_last": h.get("last_val")}


def kl_summary(stages: dict[str, dict], val_every: int) -> dict[str, Any]:
    """KL(teacher ‖ student) of both stages: validation at mid-run and at the end, and kd's
    training batches at its first and last step."""
    a, k = stages["align"], stages["kd"]
    return {"align_val_first": _get(a, "val_first", "kl"),
            "align_val_last": _get(a, "val_last", "kl"),
            "align_val_first_step": val_every,
            "kd_val_first": _get(k, "val_first", "kl"), "kd_val_last": _get(k, "val_last", "kl"),
            "kd_val_first_step": val_every,
            "kd_train_first": _get(k, "train_first", "kl"),
            "kd_train_last": _get(k, "train_last", "kl")}


def print_summary(result: dict[str, Any]) -> None:
    st = result["stages"]
    a, k = st["align"], st["kd"]
    say("\n" + "=" * 78)
    say("llama2rwkv demo: summary")
    say("=" * 78)
    say(f"{'stage':6} {'steps':>5} {'tokens/s':>9} {'teacher wait':>13}  "
        "train loss (first → last)")
    for name, s in st.items():
        part = "align" if name == "align" else "kl"
        say(f"{name:6} {s['steps']:>5} {s['tokens_per_second']:>9.0f} "
            f"{100 * s['teacher_wait_share']:>12.1f}%  {part} "
            f"{_fmt(_get(s, 'train_first', part), '.4g')} → "
            f"{_fmt(_get(s, 'train_last', part), '.4g')}")
    kl = result["kl"]
    say("KL(teacher ‖ student) per token, held-out validation split:")
    say(f"  align: {_fmt(kl['align_val_first'])} (step {kl['align_val_first_step']}) → "
        f"{_fmt(kl['align_val_last'])} (end)")
    say(f"  kd:    {_fmt(kl['kd_val_first'])} (step {kl['kd_val_first_step']}) → "
        f"{_fmt(kl['kd_val_last'])} (end)")
    say(f"  kd on its training batches: {_fmt(kl['kd_train_first'])} at step 1 → "
        f"{_fmt(kl['kd_train_last'])} at step {k['steps']}")
    say(f"Perplexity on validation: teacher {_fmt(_get(k, 'val_last', 'teacher_ppl'), '.1f')}, "
        f"student {_fmt(_get(a, 'val_last', 'student_ppl'), '.1f')} after align, "
        f"{_fmt(_get(k, 'val_last', 'student_ppl'), '.1f')} after kd")
    g = result.get("generation")
    if g:
        s = g["student"]
        say(f"Greedy generation ({g['max_new_tokens']} new tokens), prompt {g['prompt']!r}:")
        say(f"  student: {s['text']!r}")
        say(f"           ({s['class']}, cache {s['cache']}: RWKV state "
            f"{s.get('rwkv_state_bytes', 0) / 1024:.1f} KiB for layers {s.get('rwkv_layers')}, "
            f"KV {s.get('kv_bytes', 0) / 1024:.1f} KiB)")
        say(f"  teacher: {g['teacher']['text']!r}")
    say(f"Student (HF format): {k['student']}")
    say(f"Align student:       {a['student']}")
    say(f"Run outputs:         {Path(k['summary_json']).parent.parent} (steps-rank*.jsonl, "
        "summary.json, checkpoints)")
    say(f"Service logs:        {result['logs']}")
    if result.get("prometheus_url"):
        say(f"Prometheus:          {result['prometheus_url']}"
            + ("" if result.get("kept_up")
               else " (stopped with the stack; it was up during the run)"))
    else:
        say(f"Prometheus:          not run ({result.get('prometheus_note')})")
    if result.get("dashboard"):
        say(f"Dashboard picture:   {result['dashboard']}")
    say(f"Took {result['seconds']:.0f} s.")
    if result.get("kept_up"):
        say(f"The teacher and Prometheus are still up. Stop them with:\n  "
            f"{sys.executable} -m services.runner down -f {COMPOSE} "
            f"--run-dir {result['stack_dir']}")
    e = result.get("evaluation")
    if e:
        say(f"\nEvaluation (python -m services.evaluate; {e['markdown']}, {e['json']}):\n")
        say(Path(e["markdown"]).read_text().rstrip())
