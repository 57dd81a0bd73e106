"""What one optimizer step and one validation measured, and where it goes.

The training loop fills a :class:`StepStats` per step and a :class:`ValidationStats` per
validation, and hands them to :class:`StatLoggers`, whose ``record`` feeds every output: the
Prometheus metrics, the rank's steps file (``steps-rank<R>.jsonl``) and the progress log line
(the shape of vLLM's stat loggers: one record call, one logger per output).

Efficiency: each step carries its model FLOPs (shared/flops.py: the student's training FLOPs,
and apart from them an in-process teacher's forward), so every output reports tokens/s and
the model FLOPs utilisation (MFU) of the step: the FLOPs done on the rank's device over its
wall time and the device's bf16 peak. Without a known peak (a CPU) MFU is absent, not 0.

The steps file holds every step of the run exactly once: a resumed run first drops the
records past the checkpoint it resumes from (it trains those steps again), so a crash and a
resume leave no duplicate and no gap.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from shared.losses import perplexity
from shared.metrics import TrainerMetrics

log = logging.getLogger("trainer")


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each named value summed over every trainer rank (one all-reduce, in float64)."""
    names = list(values)
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(names, tensor.cpu().tolist(), strict=True))


@dataclass
class StepStats:
    """One optimizer step of this rank, and the sums over all ranks the log line needs."""

    step: int
    lr: float
    losses: dict[str, float]          # mean over the micro steps: total, kl, ce, align
    tokens: int                       # real tokens this rank trained on
    teacher_wait: float               # seconds this rank blocked on the teacher
    seconds: float                    # wall time of the step on this rank
    start: float                      # wall clock at the step's start
    grad_norm: float = float("nan")   # before clipping; NaN when DeepSpeed has none
    teacher_forward: list[tuple[float, float]] = field(default_factory=list)
    flops: float = 0.0                # the student's training FLOPs on this rank
    teacher_flops: float = 0.0        # an in-process teacher's forward FLOPs (same device)
    peak_flops: float | None = None   # the device's bf16 peak FLOP/s; None: no MFU
    end: float = 0.0                  # wall clock once the step's numbers were all-reduced
    job_tokens: float = 0.0           # tokens, teacher_wait, seconds, FLOPs summed over ranks
    job_teacher_wait: float = 0.0
    job_seconds: float = 0.0
    job_flops: float = 0.0            # student and in-process teacher FLOPs
    stop_requested: bool = False      # some rank was asked to stop (SIGTERM/SIGINT)
    time_up: bool = False             # some rank is past train.time_limit_seconds
    job_time_spent: float = 0.0       # the ranks' shares of that limit spent, summed

    def reduce(self, stop_requested: bool, device: torch.device, time_up: bool = False,
               time_spent: float = 0.0) -> None:
        """Fill the job-wide fields; every rank learns whether any rank must stop, whether any
        rank's train.time_limit_seconds has run out (then all end the stage together), and the
        ranks' shares of it spent (so all of them set the same learning rate from their mean)."""
        total = sum_over_ranks({"tokens": self.tokens, "teacher_wait": self.teacher_wait,
                                "seconds": self.seconds, "flops": self.flops + self.teacher_flops,
                                "stop": float(stop_requested), "time_up": float(time_up),
                                "time_spent": time_spent}, device)
        self.job_time_spent = total["time_spent"]
        self.job_tokens, self.job_teacher_wait = total["tokens"], total["teacher_wait"]
        self.job_seconds, self.stop_requested = total["seconds"], total["stop"] > 0
        self.time_up = total["time_up"] > 0
        self.job_flops = total["flops"]

    @property
    def tokens_per_second(self) -> float:
        """This rank's trained tokens per second of the step."""
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mfu(self) -> float | None:
        """This rank's model FLOPs utilisation in the step (None without a known peak)."""
        return utilisation(self.flops + self.teacher_flops, self.seconds, self.peak_flops)

    def job_tokens_per_second(self, world_size: int) -> float:
        """Tokens per second of the whole job (all ranks) in the step."""
        return self.job_tokens / max(self.job_seconds / world_size, 1e-9)

    @property
    def job_mfu(self) -> float | None:
        """The MFU of all ranks together: their FLOPs over their seconds and one peak."""
        return utilisation(self.job_flops, self.job_seconds, self.peak_flops)

    def record(self) -> dict[str, Any]:
        """The steps file's line for this step (``mfu`` only where the device has a peak)."""
        efficiency = {"tokens_per_second": self.tokens_per_second, "flops": self.flops,
                      "teacher_flops": self.teacher_flops}
        if self.mfu is not None:
            efficiency["mfu"] = self.mfu
        return {"step": self.step, "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens": self.tokens, "teacher_wait": self.teacher_wait,
                "seconds": self.seconds, "start": self.start, "end": self.end,
                "teacher_forward": self.teacher_forward, **efficiency, **self.losses}


def utilisation(flops: float, seconds: float, peak: float | None) -> float | None:
    """``flops`` done in ``seconds`` as a share of ``peak`` FLOP/s; None without a peak."""
    return flops / max(seconds, 1e-9) / peak if peak else None


@dataclass
class RunTotals:
    """Sums over the steps the run trained (the summary's throughput figures). A resumed run
    starts from the sums its checkpoint kept, so summary.json counts every step once, those of
    earlier processes too (on 2026-12-02 a resumed stage reported 0.4M of its 5M tokens)."""

    tokens: float = 0.0
    teacher_wait: float = 0.0
    seconds: float = 0.0   # summed over ranks: divide by the world size for wall time
    flops: float = 0.0
    peak_flops: float | None = None

    def add(self, stats: StepStats) -> None:
        self.tokens += stats.job_tokens
        self.teacher_wait += stats.job_teacher_wait
        self.seconds += stats.job_seconds
        self.flops += stats.job_flops
        self.peak_flops = stats.peak_flops

    def state_dict(self) -> dict[str, float]:
        """The sums a checkpoint keeps (the device's peak is this process's to know)."""
        return {"tokens": self.tokens, "teacher_wait": self.teacher_wait,
                "seconds": self.seconds, "flops": self.flops}

    @classmethod
    def from_state(cls, state: dict[str, float] | None) -> RunTotals:
        """The sums of a checkpoint's steps (none: a checkpoint written before they were kept)."""
        return cls(**{k: float(v) for k, v in (state or {}).items()})

    def mfu(self) -> float | None:
        """The run's mean MFU: all its FLOPs over all its seconds (None without a peak)."""
        return utilisation(self.flops, self.seconds, self.peak_flops)

    def tokens_per_second(self, world_size: int) -> float:
        return self.tokens / max(self.seconds / world_size, 1e-9)

    def teacher_wait_share(self) -> float:
        return self.teacher_wait / max(self.seconds, 1e-9)


@dataclass
class ValidationSums:
    """Token-weighted sums of one validation, before they are divided by the tokens."""

    student_nll: float = 0.0
    teacher_nll: float = 0.0
    kl: float = 0.0
    tokens: float = 0.0

    def add(self, tokens: int, student: float, teacher: float | None = None,
            kl: float | None = None) -> None:
        self.student_nll += student * tokens
        if teacher is not None:
            self.teacher_nll += teacher * tokens
        if kl is not None:
            self.kl += kl * tokens
        self.tokens += tokens

    def over_ranks(self, device: torch.device) -> ValidationSums:
        return ValidationSums(**sum_over_ranks(asdict(self), device))


@dataclass
class ValidationStats:
    """Mean losses per real token over every rank's validation batches."""

    student_loss: float
    tokens: float
    student_ppl: float
    teacher_loss: float | None = None
    kl: float | None = None
    teacher_ppl: float | None = None

    @classmethod
    def from_sums(cls, sums: ValidationSums, with_teacher: bool) -> ValidationStats:
        tokens = max(sums.tokens, 1.0)
        stats = cls(student_loss=sums.student_nll / tokens, tokens=tokens,
                    student_ppl=perplexity(sums.student_nll / tokens))
        if with_teacher:
            stats.teacher_loss = sums.teacher_nll / tokens
            stats.kl = sums.kl / tokens
            stats.teacher_ppl = perplexity(stats.teacher_loss)
        return stats

    def as_dict(self) -> dict[str, float]:
        """The history entry (checkpoint, summary.json): the teacher's keys only with one."""
        return {k: v for k, v in asdict(self).items() if v is not None}


# --------------------------------------------------------------------------- loggers
class StatLogger(Protocol):
    def record(self, stats: StepStats) -> None: ...

    def record_validation(self, step: int, stats: ValidationStats) -> None: ...


class PrometheusStatLogger:
    """Counters, histograms and gauges of shared/metrics.py's TrainerMetrics."""

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics

    def record(self, stats: StepStats) -> None:
        m = self.metrics
        m.steps.inc()
        m.tokens.inc(stats.tokens)
        m.step_seconds.observe(stats.seconds)
        m.teacher_wait_seconds.observe(stats.teacher_wait)
        for k, v in stats.losses.items():
            m.loss[k].set(v)
        m.learning_rate.set(stats.lr)
        m.grad_norm.set(stats.grad_norm)
        m.tokens_per_second.set(stats.tokens_per_second)
        if stats.mfu is not None:
            m.set_mfu(stats.mfu)

    def record_validation(self, step: int, stats: ValidationStats) -> None:
        self.metrics.val_loss["student"].set(stats.student_loss)
        if stats.teacher_loss is not None:
            self.metrics.val_loss["teacher"].set(stats.teacher_loss)


class StepsFileLogger:
    """``steps-rank<R>.jsonl``: one JSON line per step, each step exactly once."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self._truncate(resume_step)
        self.file = open(path, "a")

    def _truncate(self, resume_step: int) -> None:
        """Keep the records up to the step training resumes from (atomically).

        A line cut short by a crash (kill -9 mid-write) is dropped with the rest.
        """
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def record(self, stats: StepStats) -> None:
        self.file.write(json.dumps(stats.record()) + "\n")
        self.file.flush()

    def record_validation(self, step: int, stats: ValidationStats) -> None:
        pass  # validations go to the history (checkpoint, summary.json)

    def close(self) -> None:
        self.file.close()


class ProgressLogger:
    """Rank 0's progress line every ``log_every`` steps, and one line per validation."""

    def __init__(self, rank: int, world_size: int, total_steps: int, log_every: int) -> None:
        self.active = rank == 0
        self.world_size, self.total_steps, self.log_every = world_size, total_steps, log_every

    def record(self, stats: StepStats) -> None:
        if not self.active or stats.step % self.log_every:
            return
        share = stats.job_teacher_wait / max(stats.job_seconds, 1e-9)
        loss_text = " ".join(f"{k} {v:.4g}" for k, v in stats.losses.items())
        mfu = stats.job_mfu
        log.info("step %d/%d | %s | lr %.2e | grad %.3g | %.0f tok/s%s | teacher wait %.0f%%",
                 stats.step, self.total_steps, loss_text, stats.lr, stats.grad_norm,
                 stats.job_tokens_per_second(self.world_size),
                 "" if mfu is None else f" | MFU {mfu:.3f}", 100 * share)

    def record_validation(self, step: int, stats: ValidationStats) -> None:
        if self.active:
            log.info("validation at step %d: %s", step,
                     " ".join(f"{k} {v:.4f}" for k, v in stats.as_dict().items()))


class StatLoggers:
    """Every output of the step statistics behind one ``record`` call."""

    def __init__(self, *loggers: StatLogger) -> None:
        self.loggers = loggers

    def record(self, stats: StepStats) -> None:
        for logger in self.loggers:
            logger.record(stats)

    def record_validation(self, step: int, stats: ValidationStats) -> None:
        for logger in self.loggers:
            logger.record_validation(step, stats)

    def close(self) -> None:
        for logger in self.loggers:
            close = getattr(logger, "close", None)
            if close is not None:
                close()


def grad_norm_value(value: Any) -> float:
    """DeepSpeed's global grad norm (a float, a tensor, or None) as a float; None is NaN."""
    return float(value) if value is not None else math.nan
