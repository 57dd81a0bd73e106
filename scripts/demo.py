#!/usr/bin/env python3
"""``make demo``: the whole distillation stack on CPU, end to end, in a few minutes.

    python scripts/demo.py [--steps N] [--run-dir runs/demo] [--keep-up] [--fresh]

1. Prometheus from Debian's package (installed with apt-get when missing and possible; the
   demo goes on without it, and says so, when it cannot be installed).
2. A tiny Llama teacher (``python -m shared.tiny``), a small real-text dataset in the
   allenai/c4 layout made from the system's own documentation (scripts/make_c4_sample.py),
   prepared for the trainer (``python -m services.trainer.data c4``, with a held-out
   validation split). A random teacher predicts almost uniformly (perplexity ≈ its vocabulary),
   which leaves nothing to distil, so the teacher first gets a short language-model training
   on the train split (``--teacher-steps``; 0 keeps it random).
3. Stage ``align`` then stage ``kd``, each one ``python -m services.runner up -f
   compose.demo.yaml`` (supervisord: the teacher on CPU, a trainer of two ranks under
   torchrun with DeepSpeed over Gloo, Prometheus scraping them every 2 s), exactly the
   services of compose.yaml. ``kd`` starts from ``align``'s exported student
   (``--student.init_from``). Both stages validate mid-run and at the end.
4. Greedy generation with the exported student and its RNN-state cache, next to the teacher's.
5. The Grafana dashboard's panels, drawn from Prometheus (scripts/render_dashboard.py), and a
   summary: steps, tokens/s, teacher-wait share, KL at start and end, where everything is.

The stack is always stopped at the end (``runner down``), also on an error or Ctrl-C, unless
``--keep-up`` is given: then the teacher and Prometheus stay up for inspection (the trainer
has finished) until ``python -m services.runner down -f compose.demo.yaml --run-dir
RUN_DIR/stack``. ``--steps`` (or ``DEMO_STEPS``) sets the optimizer steps of each stage.
Everything goes under ``--run-dir`` (default runs/demo): models/, c4/, data/, runs/ (the
stages' outputs), stack/ (supervisord, logs, Prometheus data), dashboard.png and
demo-summary.json. The teacher and the data are reused by the next demo unless ``--fresh``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPOSE = ROOT / "compose.demo.yaml"
CONFIGS = {"align": "configs/demo_align.yaml", "kd": "configs/demo_kd.yaml"}
STAGES = ("align", "kd")
TEACHER_NAME = "tiny-llama"
# Fixed by compose.demo.yaml and deploy/prometheus/prometheus.demo.yml.
SERVICE_PORTS = {"teacher": [9400], "trainer": [9500, 9501]}
MAX_LEN = 128
VALIDATION_SIZE = 64
PRETRAIN_STAMP = "demo_pretraining.json"


class DemoError(RuntimeError):
    """A failure reported as one paragraph (what went wrong, where to look), exit status 1."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step_title(text: str) -> None:
    say(f"\n==> {text}")


def run(cmd: list[str], quiet: bool = False, env: dict[str, str] | None = None,
        what: str | None = None) -> subprocess.CompletedProcess:
    """Run a command in the repository; its output is shown unless ``quiet``."""
    say(f"$ {shlex.join(str(c) for c in cmd)}")
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None, check=False)
    if done.returncode != 0:
        tail = ("\n" + "\n".join(done.stdout.splitlines()[-30:])) if quiet and done.stdout else ""
        raise DemoError(f"{what or cmd[0]} failed (exit status {done.returncode}){tail}")
    return done


# --------------------------------------------------------------------------- tools


def ensure_prometheus(install: bool) -> str | None:
    """Path of Debian's prometheus; installed with apt-get when allowed and possible."""
    found = shutil.which("prometheus")
    if found or not install:
        return found
    step_title("Installing Prometheus (Debian package prometheus)")
    if shutil.which("apt-get") is None:
        return None
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return None
        sudo = ["sudo", "-n"]  # never prompt: the demo must not hang on a password
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (sudo + ["apt-get", "update", "-qq"],
                sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "prometheus"]):
        say(f"$ {shlex.join(cmd)}")
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            return None
    return shutil.which("prometheus")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- teacher and data


def c4_ready(c4: Path) -> bool:
    from make_c4_sample import TRAIN_NAME, VALIDATION_NAME  # noqa: E402 (scripts/)

    return (c4 / "en" / TRAIN_NAME).is_file() and (c4 / "en" / VALIDATION_NAME).is_file()


def data_ready(data: Path, teacher: Path) -> bool:
    from services.trainer.data.loader import check_tokenizer_fingerprint
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


def quiet_transformers() -> None:
    """No progress bars for loading/saving tiny checkpoints in the demo's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pretrain_teacher(teacher: Path, data: Path, steps: int, micro_batch: int = 16,
                     lr: float = 5e-3, seed: int = 0) -> dict[str, float]:
    """A short causal-LM training of the tiny teacher on the train split (AdamW, cosine)."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.data.loader import TrainBatches
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
                     "scripts/demo.py so that it has something to distil"}
    (teacher / PRETRAIN_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def prepare(run_dir: Path, teacher_steps: int, fresh: bool) -> tuple[Path, Path, Path]:
    """Teacher, C4 sample and prepared data under run_dir, reused when already there."""
    models, c4, data = run_dir / "models", run_dir / "c4", run_dir / "data"
    teacher = models / TEACHER_NAME
    if fresh:
        for path in (teacher, c4, data):
            shutil.rmtree(path, ignore_errors=True)
    py = sys.executable
    new_teacher = not teacher_ready(teacher, teacher_steps)
    if new_teacher:
        step_title(f"Tiny teacher: {teacher}")
        shutil.rmtree(teacher, ignore_errors=True)
        run([py, "-m", "shared.tiny", "--output", teacher], quiet=True, what="shared.tiny")
    else:
        say(f"\n==> Reusing the teacher {teacher} (--fresh to make a new one)")
    if not c4_ready(c4):
        step_title(f"C4-format sample of the system's documentation: {c4}")
        run([py, ROOT / "scripts" / "make_c4_sample.py", "--output", c4, "--max-mb", "2"],
            what="make_c4_sample.py")
    if new_teacher or not data_ready(data, teacher):
        step_title(f"Preparing the data: {data}")
        run([py, "-m", "services.trainer.data", "c4", "--local_c4_dir", c4, "--languages", "en",
             "--split", "train", "--tokenizer", teacher, "--output_dir", data, "--max_len",
             str(MAX_LEN), "--buckets", "32", "--long_docs", "split", "--validation_size",
             str(VALIDATION_SIZE), "--overwrite"], quiet=True, what="data preparation")
        card = json.loads((data / "card.json").read_text())
        splits = card["splits"]
        say(f"  {splits['train']['samples']} train / {splits['validation']['samples']} "
            f"validation samples of at most {MAX_LEN} tokens, {splits['train']['tokens']} "
            f"train tokens")
    if new_teacher:
        if teacher_steps > 0:
            step_title(f"Teaching the tiny teacher some English ({teacher_steps} LM steps on "
                       "the train split)")
            pretrain_teacher(teacher, data, teacher_steps)
        else:
            (teacher / PRETRAIN_STAMP).write_text(json.dumps({"steps": 0}) + "\n")
    return teacher, c4, data


# --------------------------------------------------------------------------- the stack


class Stack:
    """compose.demo.yaml under the runner, in run_dir/stack."""

    def __init__(self, run_dir: Path, models: Path, data: Path, runs: Path,
                 prometheus_listen: str | None) -> None:
        self.dir = run_dir / "stack"
        self.models, self.data, self.runs = models, data, runs
        self.prometheus_listen = prometheus_listen
        self.env = dict(os.environ)
        # Gloo over loopback: never depend on this machine's hostname resolving.
        self.env.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def runner(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "services.runner", *args, "-f", str(COMPOSE),
                "--run-dir", str(self.dir)]

    def up(self, stage: str, extra: list[str]) -> None:
        cmd = self.runner("up")
        for key, value in (("MODELS_DIR", self.models), ("DATA_DIR", self.data),
                           ("RUNS_DIR", self.runs), ("TEACHER_MODEL", TEACHER_NAME),
                           ("DISTILL_CONFIG", CONFIGS[stage]), ("RUN_NAME", stage)):
            cmd += ["--env", f"{key}={value}"]
        if self.prometheus_listen:
            cmd += ["--env", f"PROMETHEUS_LISTEN={self.prometheus_listen}"]
        cmd += ["--extra-args", "trainer=" + shlex.join(extra), "--wait"]
        run(cmd, env=self.env, what="runner up")

    def down(self) -> None:
        if (self.dir / "supervisord.conf").is_file():
            subprocess.run(self.runner("down"), cwd=ROOT, env=self.env, check=False)

    def alive(self) -> bool:
        from services.runner.cli import supervisord_alive
        from services.runner.render import socket_path

        return supervisord_alive(socket_path(self.dir))

    def trainer_state(self) -> dict[str, Any]:
        from services.runner.cli import rpc_proxy
        from services.runner.render import socket_path

        return rpc_proxy(socket_path(self.dir)).supervisor.getProcessInfo("trainer")

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"


INTERESTING = (" step ", "validation at", "done:", "training ", "student converted",
               "student loaded", "joined teacher", "ERROR", "Error", "Traceback")


def _show(stage: str, line: str) -> None:
    """Print a trainer log line worth seeing: rank 0's progress, anyone's errors."""
    if "trainer[" in line and "ERROR" not in line and \
            ("trainer[0]" not in line or " INFO " not in line):
        return
    if any(k in line for k in INTERESTING):
        text = line.split(" INFO ", 1)[-1] if " INFO " in line else line
        say(f"  {stage:5} | {text.rstrip()[:220]}")


def watch_trainer(stack: Stack, stage: str, timeout: float, offset: int = 0) -> None:
    """Follow the trainer's log from ``offset`` (supervisord appends every run of the
    program to one file) until it exits; raise unless it exited with status 0."""
    log = stack.log("trainer")
    pending = ""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}

    def follow() -> None:
        nonlocal offset, pending
        try:
            with open(log, "r", errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except OSError:
            return
        lines = (pending + chunk).split("\n")
        pending = lines.pop()
        for line in lines:
            for piece in line.split("\r"):  # progress bars
                _show(stage, piece)

    while True:
        follow()
        try:
            state = stack.trainer_state()
        except Exception:  # noqa: BLE001 - supervisord gone: the listener stopped the stack
            follow()
            raise DemoError(f"the stack stopped during stage {stage} (see "
                            f"{stack.dir / 'exit-status.json'} and {stack.dir / 'logs'})")
        if state["statename"] in ("EXITED", "FATAL", "STOPPED", "BACKOFF"):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"stage {stage} did not finish within {timeout:.0f} s; see {log}")
        time.sleep(0.5)
    follow()
    if state["statename"] != "EXITED" or state["exitstatus"] != 0:
        raise DemoError(f"the {stage} trainer ended {state['statename']} with status "
                        f"{state.get('exitstatus')}; its log: {log}")


# --------------------------------------------------------------------------- generation


def generate(student_dir: Path, teacher_dir: Path, val_text: str, new_tokens: int) -> dict:
    """Greedy continuations of a held-out prompt: the student (RNN-state cache) and teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shared.student  # noqa: F401 - registers rwkv_hybrid with AutoModelForCausalLM

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    words = val_text.split()
    prompt = " ".join(words[:8])
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out: dict[str, Any] = {"prompt": prompt, "max_new_tokens": new_tokens}
    for name, path in (("student", student_dir), ("teacher", teacher_dir)):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
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

    from make_c4_sample import VALIDATION_NAME  # noqa: E402 (scripts/)

    with gzip.open(c4 / "en" / VALIDATION_NAME, "rt") as f:
        for line in f:  # prose, not a man page's "NAME" header
            text = json.loads(line)["text"]
            words = text.split()
            if len(words) >= 8 and not words[0].isupper():
                return text
    return "The license grants you the right to"


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


def print_summary(result: dict[str, Any]) -> None:
    st = result["stages"]
    a, k = st["align"], st["kd"]
    say("\n" + "=" * 78)
    say("llama2rwkv demo: summary")
    say("=" * 78)
    say(f"{'stage':6} {'steps':>5} {'tokens/s':>9} {'teacher wait':>13}  train loss (first → last)")
    for name, s in st.items():
        part = "align" if name == "align" else "kl"
        say(f"{name:6} {s['steps']:>5} {s['tokens_per_second']:>9.0f} "
            f"{100 * s['teacher_wait_share']:>12.1f}%  {part} "
            f"{_fmt(_get(s, 'train_first', part), '.4g')} → {_fmt(_get(s, 'train_last', part), '.4g')}")
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
            + ("" if result.get("kept_up") else " (stopped with the stack; it was up during the run)"))
    else:
        say(f"Prometheus:          not run ({result.get('prometheus_note')})")
    if result.get("dashboard"):
        say(f"Dashboard picture:   {result['dashboard']}")
    say(f"Took {result['seconds']:.0f} s.")
    if result.get("kept_up"):
        say(f"The teacher and Prometheus are still up. Stop them with:\n  "
            f"{sys.executable} -m services.runner down -f {COMPOSE} --run-dir {result['stack_dir']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    try:
        default_steps = int(os.environ.get("DEMO_STEPS") or 100)
    except ValueError:
        ap.error(f"DEMO_STEPS={os.environ['DEMO_STEPS']!r} is not a number of steps")
    ap.add_argument("--steps", type=int, default=default_steps,
                    help="optimizer steps of each stage (env DEMO_STEPS; default 100)")
    ap.add_argument("--teacher-steps", type=int, default=600,
                    help="LM training steps that give the tiny teacher something to teach "
                         "(0: keep it random)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--keep-up", action="store_true",
                    help="leave the teacher and Prometheus running at the end")
    ap.add_argument("--fresh", action="store_true", help="make a new teacher and dataset")
    ap.add_argument("--no-install", action="store_true",
                    help="never apt-get install prometheus (run without it when missing)")
    ap.add_argument("--prometheus-port", type=int, default=9090,
                    help="Prometheus's port (a free one is taken when it is busy)")
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens to generate")
    ap.add_argument("--stage-timeout", type=float, default=900.0, help="seconds per stage")
    ap.add_argument("--no-dashboard", action="store_true", help="don't draw dashboard.png")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (each stage validates mid-run and at the end)")
    args.run_dir = args.run_dir.resolve()
    return args


def demo(args: argparse.Namespace, stack_holder: list) -> dict[str, Any]:
    t0 = time.time()
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"llama2rwkv CPU demo in {run_dir}: {args.steps} steps of align, then {args.steps} "
        "of kd")

    prometheus = ensure_prometheus(not args.no_install)
    prometheus_note = None
    listen = None
    if prometheus is None:
        prometheus_note = ("Debian's prometheus is not installed and could not be installed "
                           "here (needs apt-get as root or passwordless sudo); install it with "
                           "`sudo apt-get install prometheus` or `bash "
                           "scripts/install_ci_tools.sh` to get metrics and the dashboard")
        say(f"\nNOTE: continuing without Prometheus: {prometheus_note}")
    else:
        port = args.prometheus_port
        if not port_free(port):
            new = free_port()
            say(f"\nNOTE: port {port} is busy (another Prometheus?); the demo's Prometheus "
                f"listens on {new}")
            port = new
        listen = f"127.0.0.1:{port}"

    runs = run_dir / "runs"
    stack = Stack(run_dir, run_dir / "models", run_dir / "data", runs, listen)
    stack_holder.append(stack)
    if stack.alive():
        stack.down()  # a previous demo of this run dir, left up with --keep-up
    busy = [f"{svc} {p}" for svc, ports in SERVICE_PORTS.items() for p in ports
            if not port_free(p)]
    if busy:
        raise DemoError(f"ports in use: {', '.join(busy)} (compose.demo.yaml's fixed metrics "
                        "ports). Another stack runs here: stop it first, e.g. `python -m "
                        "services.runner down -f compose.demo.yaml [--run-dir DIR]`")

    teacher, c4, data = prepare(run_dir, args.teacher_steps, args.fresh)

    for stage in STAGES:
        shutil.rmtree(runs / stage, ignore_errors=True)  # a finished run would just resume
    shutil.rmtree(stack.dir, ignore_errors=True)         # fresh logs, rendezvous, TSDB
    stages: dict[str, dict] = {}
    windows: dict[str, list[float]] = {}
    val_every = max(1, args.steps // 2)
    for i, stage in enumerate(STAGES):
        step_title(f"Stage {stage} ({CONFIGS[stage]}): teacher + 2 trainer ranks"
                   + (" + Prometheus" if prometheus else "") + " under supervisord")
        extra = ["--train.steps", str(args.steps), "--train.val_every", str(val_every)]
        if stage == "kd":
            extra += ["--student.init_from", stages["align"]["student"]]
        started = time.time()
        if i > 0:
            stack.down()  # the next stage is the next `up`, as on a GPU node
        log = stack.log("trainer")
        offset = log.stat().st_size if log.is_file() else 0
        stack.up(stage, extra)
        watch_trainer(stack, stage, args.stage_timeout, offset)
        windows[stage] = [started, time.time()]
        stages[stage] = stage_summary(runs / stage)
        s = stages[stage]
        say(f"  {stage} done: {s['steps']} steps, {s['tokens_per_second']:.0f} tokens/s, "
            f"teacher wait {100 * s['teacher_wait_share']:.1f}%, student in {s['student']}")

    step_title("Greedy generation with the exported student (RNN-state cache)")
    generation = generate(Path(stages["kd"]["student"]), teacher, validation_text(c4),
                          args.new_tokens)
    say(f"  prompt:  {generation['prompt']!r}\n  student: {generation['student']['text']!r}\n"
        f"  teacher: {generation['teacher']['text']!r}")

    prometheus_url = f"http://{listen}" if listen else None
    dashboard = None
    if prometheus_url and not args.no_dashboard:
        step_title("Drawing the Grafana dashboard's panels from Prometheus")
        sys.path.insert(0, str(ROOT / "scripts"))
        from render_dashboard import PrometheusError, render

        time.sleep(2.5)  # one more scrape of the teacher
        try:
            start = windows["align"][0] - 20  # the stack's life; before it, Prometheus had none
            drawn = render(prometheus_url, run_dir / "dashboard.png", start, time.time())
            dashboard = str(run_dir / "dashboard.png")
            empty = [t for t, n in drawn.items() if n == 0]
            say(f"  {dashboard}: {len(drawn)} panels"
                + (f" (no data: {', '.join(empty)})" if empty else ""))
        except PrometheusError as err:
            say(f"  NOTE: could not draw the dashboard: {err}")

    a, k = stages["align"], stages["kd"]
    kl = {"align_val_first": _get(a, "val_first", "kl"), "align_val_last": _get(a, "val_last", "kl"),
          "align_val_first_step": val_every,
          "kd_val_first": _get(k, "val_first", "kl"), "kd_val_last": _get(k, "val_last", "kl"),
          "kd_val_first_step": val_every,
          "kd_train_first": _get(k, "train_first", "kl"), "kd_train_last": _get(k, "train_last", "kl")}
    return {"run_dir": str(run_dir), "steps": args.steps, "stages": stages, "kl": kl,
            "windows": windows, "generation": generation, "teacher": str(teacher),
            "data": str(data), "c4": str(c4), "stack_dir": str(stack.dir),
            "logs": str(stack.dir / "logs"), "prometheus_url": prometheus_url,
            "prometheus_note": prometheus_note, "dashboard": dashboard,
            "kept_up": bool(args.keep_up), "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    stack_holder: list[Stack] = []
    ok = False
    try:
        result = demo(args, stack_holder)
        (args.run_dir / "demo-summary.json").write_text(json.dumps(result, indent=1) + "\n")
        print_summary(result)
        ok = True
        return 0
    except DemoError as err:
        say(f"\ndemo: error: {err}")
        return 1
    except KeyboardInterrupt:
        say("\ndemo: interrupted")
        return 130
    finally:
        if stack_holder and not (ok and args.keep_up):
            say("\n==> Stopping the stack")
            stack_holder[0].down()


if __name__ == "__main__":
    sys.exit(main())
