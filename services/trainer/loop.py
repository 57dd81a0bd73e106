"""The training loop, readable in one place: prefetch, step, log, validate, checkpoint.

Prefetch (``link.prefetch``): the teacher request for micro step k+1 is sent right after the
answer for step k arrived and before step k's forward, so the teacher computes k+1 while the
student trains on k. Without it each step asks and waits (the reference's serial protocol).

No host sync between micro steps: the losses stay on the device until the optimizer step is
done, then come back with the gradient norm in one copy; the batch goes to the GPU from pinned
memory (a copy from pageable memory can wait for the stream). The syncs that remain in the
step's path are listed in :func:`train_step`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.trainer import checkpoint
from services.trainer.components import (
    Place,
    build_student,
    clipped_parameters,
    in_process_teacher_flops,
    init_distributed,
    init_engine,
    select_trainable,
    teacher_source,
)
from services.trainer.inputs import check_inputs, load_tokenizer, tokenizer_dir
from services.trainer.objective import DistillObjective, skipped_targets, teacher_request
from services.trainer.peers import PeerWatch, start_peer_watch
from services.trainer.prefetch import Prefetcher, to_device
from services.trainer.schedule import learning_rate
from services.trainer.startup import StartupClock
from services.trainer.stats import (
    ProgressLogger,
    PrometheusStatLogger,
    RunTotals,
    StatLoggers,
    StepsFileLogger,
    StepStats,
    grad_norm_value,
)
from services.trainer.validation import validate
from shared.config import Config
from shared.flops import StepFlops, attention_span, peak_flops, student_step_flops
from shared.metrics import MetricsServer, TrainerMetrics
from shared.profiling import StallWatch, StepProfiler

log = logging.getLogger("trainer")


class StopFlag:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, *_: object) -> None:
        self.requested = True


def export(engine, cfg: Config, tokenizer, place) -> Path:
    """Write the student in Hugging Face format (atomically: tmp dir, then rename)."""
    import deepspeed

    from shared.student import save_student

    out = Path(cfg.train.export_dir or Path(cfg.train.output_dir) / "student")
    student = engine.module.student
    # ZeRO-3 partitions the weights: gather them on every rank while rank 0 writes.
    gathered = (deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None)
                if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with gathered:
        if place.rank == 0:
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_student(student, tokenizer, tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    dist.barrier()
    return out


@dataclass
class TrainingRun:
    """Everything one training process holds, built by :func:`start`."""

    cfg: Config
    place: Place
    engine: Any
    tokenizer: Any
    prefetcher: Prefetcher
    teacher: Any
    loggers: StatLoggers
    stop: StopFlag
    out_dir: Path
    frozen: dict = field(default_factory=dict)   # checkpoint.frozen_parameters: not saved
    flops: StepFlops | None = None        # the student's FLOPs per token (shared/flops.py)
    teacher_flops: Callable[[float], float] | None = None   # in-process teacher, per token
    peak_flops: float | None = None       # the device's bf16 peak (None: no MFU)
    step: int = 0
    history: dict = field(default_factory=dict)
    totals: RunTotals = field(default_factory=RunTotals)
    http: MetricsServer | None = None
    peers: PeerWatch | None = None
    deadline: float | None = None   # time.monotonic() past which the stage ends (time limit)
    trained_seconds: float = 0.0    # seconds of training before this process (a resumed run's)
    train_started: float | None = None   # time.monotonic() when this process began to train
    time_spent: float = 0.0         # share of train.time_limit_seconds spent (ranks' mean)
    startup: StartupClock = field(default_factory=StartupClock)   # phases to the first step
    clipped: list | None = None     # what train_step clips itself (components.clipped_parameters)

    def __post_init__(self) -> None:
        self.clipped = clipped_parameters(self.engine)

    def close(self, linger: float = 0.0) -> None:
        """Release everything; the metrics server last, after ``linger`` seconds (so
        Prometheus scrapes a finished run's final values)."""
        self.loggers.close()
        if self.teacher is not None:
            self.teacher.close()
        if self.http is not None:
            time.sleep(linger)
            self.http.close()


def serve_metrics(cfg: Config, rank: int, metrics: TrainerMetrics) -> MetricsServer | None:
    if not cfg.train.metrics_port:
        return None
    port = cfg.train.metrics_port + rank
    try:
        return MetricsServer(metrics.registry, port, cfg.train.metrics_host)
    except OSError as err:
        raise RuntimeError(f"cannot serve metrics on {cfg.train.metrics_host}:{port} "
                           f"({err}): another trainer (or program) listens there; set "
                           "train.metrics_port to a free base port (rank r uses base + r), "
                           "or 0 to disable") from err


def start(cfg: Config) -> TrainingRun:
    """Build the components, resume from the latest complete checkpoint, join the teacher."""
    from shared.data_loader import MixedBatches, TrainBatches

    clock = StartupClock()
    clock.mark("process start and imports")
    # Bad input is an error here, before anything is built or written.
    inputs = check_inputs(cfg)
    out_dir = Path(cfg.train.output_dir)
    resume_from = checkpoint.latest(out_dir)  # a damaged checkpoint, too
    start_peer_watch(cfg.train.peer_timeout_seconds)  # under torchrun: before a failure
    metrics = TrainerMetrics(int(os.environ.get("RANK", 0)))
    http = serve_metrics(cfg, int(os.environ.get("RANK", 0)), metrics)  # a taken port, too
    clock.mark("input checks")
    place = init_distributed(cfg)
    clock.mark("process group")
    peers = start_peer_watch(cfg.train.peer_timeout_seconds)  # that one, or now (no torchrun)
    if peers is not None:
        peers.arm()  # every rank has joined: from now on a silent rank is a lost one
    # Joining now runs the link's checks (vocabulary, tokenizer, group size) before the
    # student is built: a mismatch is an error within seconds, not after the model loaded.
    def on_reconnect(seconds_lost: float) -> None:
        metrics.teacher_reconnects.inc()
        metrics.teacher_reconnect_seconds.inc(seconds_lost)

    teacher = teacher_source(cfg, place, inputs.fingerprint, inputs.vocab_size, on_reconnect)
    clock.mark("teacher")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.data.seed)
    # an export names its own modeling code (auto_map): never run it, never ask on stdin
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    student = build_student(cfg, place.device)
    trainable = select_trainable(student, cfg)
    clock.mark("student")
    request = teacher_request(cfg.train, cfg.link, student.converted_layers,
                              student.config.num_hidden_layers)
    flops = student_step_flops(student, cfg.train.stage, cfg.train.align_mode)  # before ZeRO-3
    skip = skipped_targets(cfg.train, [cfg.data.train_dir, *cfg.data.mix_dirs])
    objective = DistillObjective(student, cfg.train, request, skip)
    engine = init_engine(objective, cfg, place)
    clock.mark("DeepSpeed engine")
    batches = [TrainBatches(d, cfg.data.micro_batch_size, place.world_size, place.rank,
                            seed=cfg.data.seed, remainder="wrap", max_len=cfg.data.max_len)
               for d in (cfg.data.train_dir, *cfg.data.mix_dirs)]
    if len(batches) > 1:
        batches = MixedBatches(batches, cfg.data.mix_weights, cfg.data.seed)
        log.info("data: %d datasets mixed, shares %s", len(batches.sources),
                 ", ".join(f"{share:.2f}" for share in batches.shares))
    else:
        batches = batches[0]
    frozen = checkpoint.frozen_parameters(engine)
    step, history, trained_seconds, totals = 0, {}, 0.0, RunTotals()
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from, frozen)
        batches.load_state_dict(state["data"])
        step, history = state["step"], state.get("history", {})
        trained_seconds = float(state.get("trained_seconds", 0.0))
        totals = RunTotals.from_state(state.get("totals"))
        log.info("resumed from %s at step %d", resume_from, step)
    prefetcher = Prefetcher(batches, teacher, request, cfg.link.prefetch, inputs.vocab_size)
    clock.mark("data and resume")
    loggers = StatLoggers(
        PrometheusStatLogger(metrics),
        StepsFileLogger(out_dir / f"steps-rank{place.rank}.jsonl", resume_step=step),
        ProgressLogger(place.rank, place.world_size, cfg.train.steps, cfg.train.log_every))
    if place.rank == 0:
        names = set(trainable)
        log.info("training %d parameters (%d tensors) of %d; stage %s; %d ranks; prefetch %s",
                 sum(_numel(p) for n, p in student.named_parameters() if n in names),
                 len(trainable), sum(_numel(p) for p in student.parameters()),
                 cfg.train.stage, place.world_size, prefetcher.prefetch)
    return TrainingRun(cfg, place, engine, tokenizer, prefetcher, teacher, loggers, StopFlag(),
                       out_dir, frozen, flops, in_process_teacher_flops(teacher, request),
                       peak_flops(place.device), step, history, totals, http=http,
                       peers=peers, trained_seconds=trained_seconds, startup=clock)


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty local tensor


def train_step(run: TrainingRun) -> StepStats:
    """One optimizer step (``grad_accum`` micro steps), its numbers summed over ranks.

    The micro steps only queue device work: their losses stay tensors until the step is done
    and come back in one copy (``seconds`` is taken after it). Syncs left, not ours: the
    in-process teacher's answer (shared/link/in_process.py times its forward), the mask
    gathers of the top-k and align losses (shared/losses.py: shapes from the data), DeepSpeed's
    at the optimizer step (packed rows' documents are found in the batch's host copies, without
    one: shared/student/packing.py);
    after it, the all-reduce of the step's numbers (StepStats.reduce).
    tests/test_trainer_gpu.py lists every site on a GPU."""
    cfg, engine, place = run.cfg, run.engine, run.place
    lr = learning_rate(cfg, run.step, run.time_spent)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    t_step, t_wall = time.perf_counter(), time.time()
    wait, tokens, flops, teacher_flops = 0.0, 0, 0.0, 0.0
    norm = None
    names: list[str] = []
    pending: list[torch.Tensor] = []   # per micro step: its loss, then the loss parts
    forwards = []
    for _ in range(cfg.train.grad_accum):
        batch, answer, waited, handle = run.prefetcher.next()
        wait += waited
        if handle is not None and handle.teacher_forward:
            forwards.append(handle.teacher_forward)
        b = to_device(batch, place.device)
        # the CPU copies too: the student finds packed documents in them, not on the device
        host = ((batch["position_ids"], batch["attention_mask"]) if "position_ids" in batch
                else None)
        loss, parts = engine(b["input_ids"], b["attention_mask"], b["labels"], answer,
                             b.get("position_ids"), host)
        engine.backward(loss)
        if run.clipped is not None and engine.is_gradient_accumulation_boundary():
            norm = torch.nn.utils.clip_grad_norm_(run.clipped, cfg.train.grad_clip or math.inf,
                                                  foreach=True)
        engine.step()
        n = int(batch["lengths"].sum())   # the CPU copy of the batch: no device sync
        span = attention_span(batch["lengths"], batch.get("position_ids"))
        tokens += n
        if run.flops is not None:
            flops += n * run.flops.per_token(span)
        if run.teacher_flops is not None:
            teacher_flops += n * run.teacher_flops(span)
        names = ["total", *parts]
        # float64 holds a float32 loss exactly: the values are those float(v) gave
        pending += [t.detach().to(torch.float64).reshape(()) for t in (loss, *parts.values())]
    if run.clipped is None:   # a device tensor (ZeRO 1-3, and ours above), a float, or None
        norm = engine.get_global_grad_norm()
    if torch.is_tensor(norm):
        pending.append(norm.detach().to(pending[0].device, torch.float64).reshape(()))
    values = torch.stack(pending).tolist()   # the step's one device-to-host copy
    seconds = time.perf_counter() - t_step
    grad_norm = values.pop() if torch.is_tensor(norm) else grad_norm_value(norm)
    if norm is not None and (engine.bfloat16_enabled() or run.clipped is not None) \
            and not math.isfinite(grad_norm):
        # bf16 ZeRO skips its per-tensor overflow check (configs/deepspeed/zero1.json), and
        # stage 0 checks nothing: the step was applied, so stop before the run trains on from
        # broken weights
        raise RuntimeError(f"non-finite gradient norm ({grad_norm}) at step {run.step + 1}: "
                           "the weights may be damaged; resume from the last checkpoint with a "
                           "lower train.lr_init, or (ZeRO 1-3) set bf16.check_grad_overflow: "
                           "true in the DeepSpeed JSON to skip such steps")
    rows = [values[i:i + len(names)] for i in range(0, len(values), len(names))]
    run.step += 1
    stats = StepStats(step=run.step, lr=lr, tokens=tokens, teacher_wait=wait,
                      seconds=seconds, start=t_wall,
                      losses={k: sum(r[i] for r in rows) / len(rows)
                              for i, k in enumerate(names)},
                      grad_norm=grad_norm, teacher_forward=forwards, flops=flops,
                      teacher_flops=teacher_flops, peak_flops=run.peak_flops)
    time_up, spent = False, 0.0
    if run.deadline is not None:
        left = run.deadline - time.monotonic()
        time_up, spent = left <= 0, 1.0 - left / cfg.train.time_limit_seconds
    stats.reduce(run.stop.requested, place.device, time_up, spent)
    run.time_spent = stats.job_time_spent / place.world_size  # every rank: the same next lr
    stats.end = time.time()
    return stats


def run_validation(run: TrainingRun) -> None:
    val = validate(run.engine, run.cfg, run.place, run.teacher)
    run.history.setdefault("first_val", val.as_dict())
    run.history["last_val"] = val.as_dict()
    run.loggers.record_validation(run.step, val)


def save_checkpoint(run: TrainingRun) -> Path:
    """A complete checkpoint of this step (collective): weights, optimizer, data position."""
    trained = run.trained_seconds + time.monotonic() - (run.train_started or time.monotonic())
    return checkpoint.save(run.engine, run.out_dir, run.step,
                           {"data": run.prefetcher.data_state(), "history": run.history,
                            "trained_seconds": trained, "totals": run.totals.state_dict()},
                           run.cfg.train.keep_checkpoints, run.frozen)


def finish(run: TrainingRun) -> dict:
    """After the last step: export the student and write summary.json (rank 0)."""
    cfg, place = run.cfg, run.place
    exported = export(run.engine, cfg, run.tokenizer, place) if cfg.train.save_at_end else None
    summary = {"steps": run.step, "tokens": run.totals.tokens,
               "tokens_per_second": run.totals.tokens_per_second(place.world_size),
               **({"mfu": run.totals.mfu()} if run.totals.mfu() is not None else {}),
               "teacher_wait_share": run.totals.teacher_wait_share(),
               "startup_seconds": run.startup.as_dict(),
               "history": run.history, "student": str(exported) if exported else None}
    if place.rank == 0:
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done after %d steps; student exported to %s", run.step, exported)
    return summary


def train(cfg: Config) -> dict:
    """Train to ``train.steps`` (or until SIGTERM); returns the summary ({} when stopped)."""
    run = start(cfg)
    t = cfg.train
    profiler = StepProfiler(t.profile_steps, run.out_dir, f"trainer-rank{run.place.rank}")
    stalls = StallWatch(t.slow_step_seconds, f"trainer-rank{run.place.rank}")
    finished, stats = False, None
    run.train_started = time.monotonic()
    if t.time_limit_seconds:  # a resumed run's budget is what its checkpoint had left
        run.deadline = run.train_started + t.time_limit_seconds - run.trained_seconds
        run.time_spent = run.trained_seconds / t.time_limit_seconds  # lr clamps it at 1
    try:
        while run.step < t.steps:
            profiler.begin(run.step + 1)
            if "first step" in run.startup.phases:  # the first step compiles: no stall
                stalls.begin(run.step + 1)
            stats = train_step(run)
            stalls.end()
            profiler.end(run.step)
            if "first step" not in run.startup.phases:
                run.startup.mark("first step")   # kernel compilation and autotuning included
                if run.place.rank == 0:
                    log.info(run.startup.report())
            run.totals.add(stats)
            run.loggers.record(stats)
            run.history.setdefault("first", stats.losses)
            run.history["last"] = stats.losses
            last = run.step == t.steps or stats.time_up
            if stats.time_up and run.step < t.steps:
                log.info("train.time_limit_seconds=%g reached: step %d is the last",
                         t.time_limit_seconds, run.step)
            if t.val_every and (run.step % t.val_every == 0 or last):
                run_validation(run)
            if (run.step % t.checkpoint_every == 0 or stats.stop_requested
                    or (last and t.save_at_end)):
                save_checkpoint(run)
            if stats.stop_requested:
                log.info("stop requested: checkpointed at step %d, exiting", run.step)
                break
            if last:
                break
        finished = run.step >= t.steps or (stats is not None and stats.time_up)
        summary = finish(run) if finished else {}
        if run.peers is not None:
            run.peers.finish()  # after this rank's last collective: its silence is no loss
        return summary
    finally:
        stalls.close()
        run.close(linger=t.metrics_linger_seconds if finished else 0.0)
