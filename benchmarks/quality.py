"""The quality experiment (issue 18): SmolLM2-135M-Instruct distilled on one GPU, its arms.

    python -m benchmarks.quality --teacher DIR --corpus bench/quality --work /root/quality \
        --out $OUT [--hybrid-steps 120,480] [--rwkv7-steps 250,1250] [--parallel]

Arms, each through the product's own commands (``python -m services.data``,
``python -m services.trainer``, ``python -m services.evaluate``) and recipes
(configs/smollm2_*.yaml):

* ``hybrid``: layers 1, 3, ..., 29 as RWKV-7 blocks: align (mixers only, teacher-forced), then
  kd (all parameters, KL at T = 1); ``rwkv7``: all 30 layers RWKV-7, the same two stages;
* ``rad``: all 30 layers RAD-RWKV7 (``student.rwkv7_variant: rad``: no token shift, no bonus,
  the teacher's RoPE on r/k) with an untied lm_head, the same two stages and steps as ``rwkv7``;
* ``chat`` / ``wrap`` (need ``rwkv7``): ``--chat-steps`` more kd steps after rwkv7's kd, on
  conversations the teacher wrote (``services.data generate``, ``--chat-conversations``, made
  while the other arms train) / on the corpus itself as conversations (``services.data wrap``:
  a user asks for a page by its title, the reply is the page): does chat-formatted data end the
  all-RWKV-7 student's chat collapse, and is it the template or the teacher's replies?
* ``control``: the all-RWKV-7 architecture from a random initialisation, CE only (``sft``), on
  as many tokens as ``rwkv7``'s two stages (one stage, twice the per-stage time limit);
* ``mixwrap``, ``flat``, ``mix`` (need ``rwkv7``): rwkv7's kd again from its align export, as
  many steps: on the documents half plain, half wrapped (``data.mix_dirs``) / at RADLADS' flat
  lr 1e-5 (the recipe decays 1e-4 -> 1e-5) / on RADLADS' step-3 loss (KL 0.5 + CE 0.5);
* ``hflat``, ``hlayers``, ``hhigh`` (need ``hybrid``): hybrid's kd again from its align
  export, as many steps: at the flat 1e-5 / training only the converted layers
  (``train.trainable: rwkv_layers``) / from 6e-4, not the recipe's 3e-4: what the kd stage's
  step does to the unseen domain;
* ``rwkv7wrap``: rwkv7's align, then its kd on ``mixwrap``'s data, one lineage alone on the GPU
  (no rwkv7 kd stage beside it), for the long runs;
* ``long`` (needs ``rwkv7``): RADLADS' step 3 after rwkv7's kd, as many steps again: rows of
  ``--long-context`` tokens (4,096), as many per micro batch as keep 32 x 1024 tokens per step,
  lr 7e-6, KL 0.5 + CE 0.5.

``--kd-variant NAME@PARENT='--section.key value ...'`` adds an arm of its own: PARENT's kd
stage again from PARENT's align export, as many steps, on PARENT's kd data, with these
arguments (a learning-rate sweep without a new arm here); ``--arm-args ARM.kd='...'`` (or
``ARM.align``) changes one stage of an arm, ``--arm-args ARM='...'`` both.

A stage that finished in an earlier run with the same command is reused (its
``quality_stage.json``; with another command it is refused), so an experiment longer than one
device call runs over several on a machine kept warm. The corpus: ``python -m
benchmarks.quality_corpus [--broad]`` (held-out files of its domain; the Debian handbook, a
domain the training never sees). ``--parallel`` runs the arms at once (three students at 32 x
1024 a micro batch did not fit one H200; one all-RWKV-7 arm at its recipe's 32 x 1024 beside
three hybrid kd stages at 16 x 1024 did, 2026-12-04).
Each stage's figures come from its summary.json, the evaluation's from services.evaluate.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import named_overrides
from benchmarks.quality_steps import (
    ROOT,
    STOPPING,
    chat_data,
    prepare_data,
    random_student,
    run,
    wrapped_data,
)

CONFIGS = {
    "hybrid": ("configs/smollm2_hybrid_align.yaml", "configs/smollm2_hybrid_kd.yaml"),
    "rwkv7": ("configs/smollm2_rwkv7_align.yaml", "configs/smollm2_rwkv7_kd.yaml"),
    "rad": ("configs/smollm2_rwkv7_align.yaml", "configs/smollm2_rwkv7_kd.yaml"),
    "rwkv7wrap": ("configs/smollm2_rwkv7_align.yaml", "configs/smollm2_rwkv7_kd.yaml"),
}
# what an arm's own kd stage trains on when not the plain corpus ("train+wrap": data.train_dir
# the corpus, data.mix_dirs its wrapped conversations) and what it changes in the kd recipe
KD_DATA = {"rwkv7wrap": ("train+wrap", ["--data.mix_weights", "1,1"])}
# what an arm changes in the conversion (its align stage; kd starts from that export)
CONVERSION = {"rad": ["--student.rwkv7_variant", "rad", "--student.untie_embeddings", "true"]}
PROMPTS = ROOT / "benchmarks" / "quality_prompts.txt"


def train_stage(name: str, config: str, steps: int, teacher: Path, data: Path, work: Path,
                init_from: Path | None, extra: list[str]) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "services.trainer", "--config", config,
           "--teacher.model_path", str(teacher), "--data.train_dir", str(data),
           "--train.output_dir", str(out), "--train.steps", str(steps),
           "--train.metrics_port", "0", "--train.checkpoint_every", str(10 ** 6), *extra]
    if init_from is not None:
        cmd += ["--student.init_from", str(init_from)]
    record = out / "quality_stage.json"  # a stage done in an earlier device call is reused
    if record.is_file() and (done := json.loads(record.read_text())).get("command") == cmd:
        print(f"{name}: reused from an earlier run ({record})", flush=True)
        return done["result"]
    if record.is_file():  # the trainer would resume the old run's last checkpoint and stop
        changed = sorted(set(cmd) ^ set(done.get("command", [])))
        raise RuntimeError(f"{name} finished before in {out} with another command (differing "
                           f"words: {' '.join(changed)[:300]}); remove {out} or use another "
                           "--work to train it again")
    seconds = run(cmd, work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    # the steps it ran: train.time_limit_seconds may stop a stage before the steps it was given
    result = {"stage": name, "steps": summary["steps"], "steps_planned": steps,
              "tokens": summary["tokens"], "seconds": seconds,
              "tokens_per_second": summary["tokens_per_second"], "student": summary["student"],
              "mfu": summary.get("mfu")}
    record.write_text(json.dumps({"command": cmd, "result": result}))
    return result


RECIPE_TOKENS_PER_STEP = 32 * 1024  # configs/smollm2_rwkv7_kd.yaml: 32 rows of 1024
# arms that continue another arm's student: (that arm, which of its stages' export, the data
# this arm's one kd stage trains on, what it changes in the kd recipe)
CONTINUES = {
    "chat": ("rwkv7", -1, "chat", []),
    "wrap": ("rwkv7", -1, "wrap", []),
    "flat": ("rwkv7", 0, "train", ["--train.lr_init", "1e-5", "--train.lr_final", "1e-5"]),
    "mix": ("rwkv7", 0, "train", ["--train.kl_weight", "0.5", "--train.ce_weight", "0.5"]),
    # rwkv7's kd stage again from its align export, on the documents half plain, half wrapped
    # as conversations (data.mix_dirs): the chat format at equal tokens with rwkv7's kd
    "mixwrap": ("rwkv7", 0, "train+wrap", ["--data.mix_weights", "1,1"]),
    # RADLADS' step 3: a longer context, lr 7e-6, KL 0.5 + CE 0.5 (rows: long_context_args)
    "long": ("rwkv7", -1, "long", ["--train.lr_init", "7e-6", "--train.lr_final", "7e-6",
                                   "--train.kl_weight", "0.5", "--train.ce_weight", "0.5"]),
    # the hybrid's kd again from its align export: does a kd stage that moves the teacher's
    # own weights less keep the unseen domain? RADLADS' flat 1e-5, or only the RWKV layers
    "hflat": ("hybrid", 0, "train", ["--train.lr_init", "1e-5", "--train.lr_final", "1e-5"]),
    "hlayers": ("hybrid", 0, "train", ["--train.trainable", "rwkv_layers"]),
    # a larger step: the flat 1e-5 lost to 1e-4 (2026-12-02), 1e-4 to 3e-4 (2026-12-03, the
    # recipe's since); does 6e-4 win again?
    "hhigh": ("hybrid", 0, "train", ["--train.lr_init", "6e-4"]),
}


def long_context_args(context: int) -> list[str]:
    """Rows of ``context`` tokens, as many per micro batch as keep the recipe's tokens per step
    (after the other stage arguments, so a smoke run's small rows do not undo them)."""
    rows = max(1, RECIPE_TOKENS_PER_STEP // context)
    return ["--data.max_len", str(context), "--data.micro_batch_size", str(rows)]


def continue_arm(arm: str, spec: tuple, steps: int, teacher: Path, work: Path,
                 extra: list[str], parent: Future, data_for: Callable[[str], Path],
                 long_context: int) -> list:
    """One kd stage from another arm's student (``spec``: a CONTINUES entry), its data made
    first (the teacher's conversations, or the corpus at the long context) while the other arms
    train."""
    parent_arm, stage, data, changes = spec
    data_dir, mix = data_args(data, data_for)
    start = Path(parent.result()[stage]["student"])
    rows = long_context_args(long_context) if data == "long" else []
    return [train_stage(f"{arm}-kd", CONFIGS[parent_arm][1], steps, teacher, data_dir, work, start,
                        [*mix, *changes, *extra, *rows])]


def data_args(data: str, data_for: Callable[[str], Path]) -> tuple[Path, list[str]]:
    """A stage's data.train_dir and its data.mix_dirs arguments: "train+wrap" is the corpus,
    then its wrapped conversations mixed in."""
    first, *mixed = data.split("+")
    mix = ["--data.mix_dirs", ",".join(str(data_for(m)) for m in mixed)] if mixed else []
    return data_for(first), mix


def stage_time_limit(extra: list[str], stages: int) -> list[str]:
    """``extra`` with its ``--train.time_limit_seconds`` (a per-stage limit) times ``stages``: the
    control's one stage stands for the distilled arms' two, and stopped at 181 of its 350 steps
    on 2026-12-02 under the per-stage limit, with 57 % of their tokens."""
    out = list(extra)
    for i, arg in enumerate(out[:-1]):
        if arg == "--train.time_limit_seconds":
            out[i + 1] = str(float(out[i + 1]) * stages)
    return out


def run_arm(arm: str, steps: tuple[int, ...], teacher: Path, data: Path, work: Path,
            extra: dict[str, list[str]], data_for: Callable[[str], Path]) -> list:
    """``extra``: more trainer arguments per stage ("align", "kd"; the control's one stage
    takes "kd"'s)."""
    if arm == "control":
        start = random_student(teacher, work / "control-init")
        total = steps[0] + steps[1]
        return [train_stage("control-sft", CONFIGS["rwkv7"][1], total, teacher, data, work, start,
                            ["--train.stage", "sft", "--train.ce_weight", "1.0",
                             "--train.lr_init", "1e-3", "--train.lr_final", "1e-5",
                             *stage_time_limit(extra["kd"], 2)])]
    align, kd = CONFIGS[arm]
    kd_data, changes = KD_DATA.get(arm, ("train", []))
    with ThreadPoolExecutor(max_workers=1) as making:  # kd's data (conversations) during align
        kd_inputs = making.submit(data_args, kd_data, data_for)
        first = train_stage(f"{arm}-align", align, steps[0], teacher, data, work, None,
                            [*CONVERSION.get(arm, []), *extra["align"]])
        kd_dir, mix = kd_inputs.result()
    second = train_stage(f"{arm}-kd", kd, steps[1], teacher, kd_dir, work,
                         Path(first["student"]), [*mix, *changes, *extra["kd"]])
    return [first, second]


def stage_table(stages: list[dict]) -> str:
    rows = ["| stage | steps | tokens | wall s (last process) | tokens/s | MFU |",
            "|---|---|---|---|---|---|"]
    for s in stages:
        mfu = f"{s['mfu']:.3f}" if s.get("mfu") else "–"
        planned = s.get("steps_planned", s["steps"])
        steps = f"{s['steps']} of {planned}" if s["steps"] != planned else str(s["steps"])
        rows.append(f"| {s['stage']} | {steps} | {s['tokens'] / 1e6:.2f}M | "
                    f"{s['seconds']:.0f} | {s['tokens_per_second']:,.0f} | {mfu} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="imported teacher directory")
    parser.add_argument("--corpus", type=Path, required=True, help="quality_corpus's directory")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="tables and JSON go here")
    parser.add_argument("--arms", default="hybrid,rwkv7,control",
                        help="comma-separated: hybrid, rwkv7, rad, rwkv7wrap, control, and "
                             "chat, wrap, mixwrap, flat, mix, long (each continues rwkv7's "
                             "student), hflat, hlayers (hybrid's)")
    parser.add_argument("--long-context", type=int, default=4096,
                        help="row length of the long arm (RADLADS' step 3: 4096)")
    parser.add_argument("--chat-conversations", type=int, default=4000,
                        help="conversations the teacher writes for the chat arm")
    parser.add_argument("--chat-steps", type=int, default=200,
                        help="steps of the chat and wrap arms' third stage (kd on the "
                             "conversations)")
    parser.add_argument("--hybrid-steps", default="120,480", help="align,kd optimizer steps")
    parser.add_argument("--rwkv7-steps", default="250,1250", help="align,kd (control: the sum)")
    parser.add_argument("--parallel", action="store_true", help="run the arms at once")
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--trainer-args", default=os.environ.get("QUALITY_TRAINER_ARGS", ""),
                        help="more --section.key value pairs for every stage (a CPU smoke run: "
                             "'--data.micro_batch_size 1 --data.max_len 128')")
    parser.add_argument("--arm-args", action="append", default=[],
                        type=named_overrides("--arm-args", "control='--data.micro_batch_size 32'"),
                        metavar="ARM[.STAGE]='--section.key value ...'",
                        help="more trainer arguments for one arm's stages, or only its align or "
                             "kd stage (ARM.align, ARM.kd), after --trainer-args (repeatable), "
                             "e.g. control='--data.micro_batch_size 32', "
                             "rwkv7wrap.kd='--train.lr_init 3e-4'")
    parser.add_argument("--kd-variant", action="append", default=[],
                        type=named_overrides("--kd-variant", "h1e3@hybrid='--train.lr_init 1e-3'"),
                        metavar="NAME@PARENT='--section.key value ...'",
                        help="an arm NAME: PARENT's kd stage again from PARENT's align export, "
                             "as many steps, on its data, with these arguments (repeatable; "
                             "PARENT one of hybrid, rwkv7, rad, rwkv7wrap, in --arms)")
    args = parser.parse_args(argv)
    continues = dict(CONTINUES)  # and the --kd-variant arms
    for spec, changes in args.kd_variant:
        name, _, parent = spec.partition("@")
        if parent not in CONFIGS or not name or name in CONFIGS or name in continues:
            parser.error(f"--kd-variant {spec}: write NAME@PARENT with a new NAME and PARENT one "
                         f"of {', '.join(CONFIGS)}")
        kd_data, kd_changes = KD_DATA.get(parent, ("train", []))
        continues[name] = (parent, 0, kd_data, [*kd_changes, *changes])
        args.arms += f",{name}"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = {"hybrid": tuple(map(int, args.hybrid_steps.split(","))),
             "rwkv7": tuple(map(int, args.rwkv7_steps.split(",")))}
    steps["control"] = steps["rad"] = steps["rwkv7wrap"] = steps["rwkv7"]
    arms = args.arms.split(",")
    extra = args.trainer_args.split()
    per_stage = {arm: {"align": list(extra), "kd": list(extra)} for arm in arms}
    for target, more in args.arm_args:
        arm, _, stage = target.partition(".")
        if arm not in per_stage:
            parser.error(f"--arm-args {target}=...: {arm} is not in --arms {args.arms}")
        if stage not in ("", "align", "kd"):
            parser.error(f"--arm-args {target}=...: the stage is align or kd, not {stage}")
        for name in (stage,) if stage else ("align", "kd"):
            per_stage[arm][name] += more
    unknown = sorted(set(arms) - set(steps) - set(continues))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {sorted([*steps, *continues])}")
    for arm in set(arms) & set(continues):
        if continues[arm][0] not in arms:
            parser.error(f"--arms: {arm} continues the {continues[arm][0]} arm's student: add "
                         f"{continues[arm][0]}")
    # after the arms they continue when run one by one
    arms = [a for a in arms if a not in continues] + [a for a in arms if a in continues]
    t0 = time.perf_counter()
    data = prepare_data(args.corpus, args.teacher, args.work)
    print(f"data prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.parallel:
        # each arm's CPU threads on its share of the cores: three trainers of 16 OpenMP threads
        # on 16 cores took 35 s each to build the student (teacher load + conversion) on
        # 2026-12-02. Three conversions at once on 2 cores: 16.7 s each with 2 threads, 4.6-6.8 s
        # with 1 (2.7 s for one alone): oversubscription costs more than the cores it shares.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(arms))))
    # parallel arms that want the same data make it once (the teacher's conversations take
    # minutes: one lock per kind, so the other kinds do not wait for them)
    making = {kind: threading.Lock() for kind in ("chat", "wrap", "long", "train")}

    def data_for(kind: str) -> Path:
        with making[kind]:
            return make_data(kind)

    def make_data(kind: str) -> Path:
        if kind == "chat":
            return chat_data(args.teacher, args.work, args.chat_conversations)
        if kind == "wrap":
            return wrapped_data(args.corpus, args.teacher, args.work)
        if kind == "long":
            return prepare_data(args.corpus, args.teacher, args.work, args.long_context)
        return data

    results: dict[str, list] = {}
    with ThreadPoolExecutor(max_workers=len(arms) if args.parallel else 1) as pool:
        futures = {arm: pool.submit(run_arm, arm, steps[arm], args.teacher, data, args.work,
                                    per_stage[arm], data_for)
                   for arm in arms if arm not in continues}
        for arm in (a for a in arms if a in continues):
            parent = continues[arm][0]
            futures[arm] = pool.submit(
                continue_arm, arm, continues[arm],
                args.chat_steps if arm in ("chat", "wrap") else steps[parent][1],
                args.teacher, args.work, per_stage[arm]["kd"], futures[parent], data_for,
                args.long_context)
        for arm, future in futures.items():
            try:
                results[arm] = future.result()
                print(f"{arm}: done\n{stage_table(results[arm])}", flush=True)
            except Exception as err:  # noqa: BLE001 - one failed arm must not lose the others
                print(f"{arm}: FAILED: {err}", flush=True)
    stages = [s for arm in arms for s in results.get(arm, [])]
    (args.out / "quality_stages.json").write_text(json.dumps(stages, indent=1))
    students = []
    for arm in arms:
        if arm in results:
            students += ["--student", f"{arm}={results[arm][-1]['student']}"]
    run([sys.executable, "-m", "services.evaluate", "--teacher", str(args.teacher), *students,
         "--data", f"docs={args.corpus / 'heldout_docs.jsonl'}",
         "--data", f"handbook={args.corpus / 'heldout_handbook.jsonl'}",
         "--max-tokens", str(args.eval_tokens), "--prompts", str(PROMPTS),
         "--json", str(args.out / "quality_eval.json"),
         "--markdown", str(args.out / "quality_eval.md")], args.work / "evaluate.log")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n\n{stage_table(stages)}\n")
    print((args.out / "quality_eval.md").read_text())
    return 0 if len(results) == len(arms) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: STOPPING.set())
    sys.exit(main())
