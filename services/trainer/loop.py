"""The training loop, readable in one place: prefetch, step, log, validate, checkpoint.

Prefetch (``link.prefetch``): the teacher request for micro step k+1 is sent right after the
answer for step k arrived and before step k's forward, so the teacher computes k+1 while the
student trains on k. Without it each step asks and waits (the reference's serial protocol).
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
from pathlib import Path

import torch
import torch.distributed as dist

from shared.config import Config
from shared.link import RequestSpec
from shared.losses import IGNORE, ce_loss, kl_full, perplexity
from shared.metrics import MetricsServer, TrainerMetrics
from shared.profiling import StepProfiler
from services.trainer import checkpoint
from services.trainer.components import (build_student, dataset_fingerprint_check,
                                         init_distributed, init_engine, select_trainable,
                                         teacher_source, tokenizer_dir)
from services.trainer.objective import DistillObjective, teacher_request

log = logging.getLogger("trainer")


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up to lr_init, then cosine decay to lr_final at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr_init * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr_final + 0.5 * (t.lr_init - t.lr_final) * (1 + math.cos(math.pi * min(1.0, progress)))


class Prefetcher:
    """Hands out (batch, teacher handle, data state before the batch) in training order."""

    def __init__(self, batches, teacher, request: RequestSpec | None, prefetch: bool) -> None:
        self.batches, self.teacher, self.request = batches, teacher, request
        self.prefetch = prefetch and teacher is not None
        self.iterator = batches.forever()
        self.pending = None

    def _fetch(self):
        state = self.batches.state_dict()
        batch = next(self.iterator)
        handle = None
        if self.teacher is not None:
            handle = self.teacher.request(batch["input_ids"], batch["lengths"], self.request,
                                          batch.get("position_ids"))
        return batch, handle, state

    def next(self):
        """The next batch and its teacher answer; with prefetch, the one after is asked for."""
        current = self.pending or self._fetch()
        self.pending = None
        batch, handle, _ = current
        t0 = time.perf_counter()
        answer = handle.result() if handle is not None else None
        wait = time.perf_counter() - t0
        if self.prefetch:
            self.pending = self._fetch()   # k+1 goes out before k's forward
        return batch, answer, wait, handle

    def data_state(self) -> dict:
        """Position of the next batch to train (a prefetched batch is not yet trained)."""
        return self.pending[2] if self.pending is not None else self.batches.state_dict()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StopFlag:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, *_: object) -> None:
        self.requested = True


@torch.no_grad()
def validate(engine, cfg: Config, place, teacher, tokenizer_pad: int) -> dict[str, float]:
    from services.trainer.data.loader import validation_batches

    from services.trainer.data.loader import read_card

    val_dir = cfg.data.val_dir or cfg.data.train_dir
    # a held-out directory made with --split validation holds a "validation" split; one made
    # from a training corpus holds "train" only
    split = "validation" if "validation" in read_card(val_dir)["splits"] else "train"
    student = engine.module.student
    student.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # student nll, teacher nll, kl, tokens
    spec = RequestSpec(logits="fp32" if cfg.link.logits == "fp32" else "bf16")
    for i, batch in enumerate(validation_batches(val_dir, cfg.data.micro_batch_size,
                                                 place.world_size, place.rank, split=split)):
        if i >= cfg.train.val_batches:
            break
        labels = batch["labels"].masked_fill(batch["sample_mask"][:, None] == 0, IGNORE)
        n = int((labels != IGNORE).sum())
        if n == 0:
            continue
        b = _to(batch, place.device)
        labels = labels.to(place.device)
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         position_ids=b.get("position_ids"), use_cache=False).logits
        sums[0] += float(ce_loss(logits, labels)) * n
        if teacher is not None:
            t_logits = teacher.request(batch["input_ids"], batch["lengths"], spec,
                                       batch.get("position_ids")).result()["logits"]
            sums[1] += float(ce_loss(t_logits.float(), labels)) * n
            sums[2] += float(kl_full(logits, t_logits, labels)) * n
        sums[3] += n
    student.train()
    sums = sums.to(place.device)
    dist.all_reduce(sums)
    tokens = max(float(sums[3]), 1.0)
    result = {"student_loss": float(sums[0]) / tokens, "tokens": tokens}
    result["student_ppl"] = perplexity(result["student_loss"])
    if teacher is not None:
        result.update(teacher_loss=float(sums[1]) / tokens, kl=float(sums[2]) / tokens)
        result["teacher_ppl"] = perplexity(result["teacher_loss"])
    return result


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


def train(cfg: Config) -> dict:
    from transformers import AutoTokenizer

    from services.trainer.data.loader import TrainBatches

    place = init_distributed(cfg)
    torch.manual_seed(cfg.data.seed)
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint_check(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(cfg)))
    student = build_student(cfg, place.device)
    trainable = select_trainable(student, cfg)
    request = teacher_request(cfg.train, cfg.link, student.converted_layers,
                              student.config.num_hidden_layers)
    objective = DistillObjective(student, cfg.train, request)
    engine = init_engine(objective, cfg, place)
    batches = TrainBatches(cfg.data.train_dir, cfg.data.micro_batch_size, place.world_size,
                           place.rank, seed=cfg.data.seed, remainder="wrap")
    step, history = 0, {}
    resume_from = checkpoint.latest(out_dir)
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        batches.load_state_dict(state["data"])
        step, history = state["step"], state.get("history", {})
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = TrainerMetrics(place.rank)
    http = None
    if cfg.train.metrics_port:
        port = cfg.train.metrics_port + place.rank
        try:
            http = MetricsServer(metrics.registry, port, cfg.train.metrics_host)
        except OSError as err:
            raise RuntimeError(f"cannot serve metrics on {cfg.train.metrics_host}:{port} "
                               f"({err}): another trainer runs there; set train.metrics_port "
                               "or 0 to disable") from err
    teacher = teacher_source(cfg, place, fingerprint, student.config.vocab_size)
    prefetcher = Prefetcher(batches, teacher, request, cfg.link.prefetch)
    stop = StopFlag()
    record = open(out_dir / f"steps-rank{place.rank}.jsonl", "a")
    if place.rank == 0:
        log.info("training %d parameters (%d tensors) of %d; stage %s; %d ranks; prefetch %s",
                 sum(getattr(p, "ds_numel", p.numel()) for n, p in student.named_parameters() if n in set(trainable)),
                 len(trainable), sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters()),
                 cfg.train.stage, place.world_size, prefetcher.prefetch)
    totals = torch.zeros(3, dtype=torch.float64)  # tokens, teacher wait, step seconds
    profiler = StepProfiler(cfg.train.profile_steps, out_dir, f"trainer-rank{place.rank}")
    try:
        while step < cfg.train.steps:
            profiler.begin(step + 1)
            lr = learning_rate(cfg, step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            t_step, t_wall = time.perf_counter(), time.time()
            wait, tokens, losses, forwards = 0.0, 0, [], []
            for _ in range(cfg.train.grad_accum):
                batch, answer, waited, handle = prefetcher.next()
                wait += waited
                if handle is not None and handle.teacher_forward:
                    forwards.append(handle.teacher_forward)
                b = _to(batch, place.device)
                loss, parts = engine(b["input_ids"], b["attention_mask"], b["labels"], answer,
                                     b.get("position_ids"))
                engine.backward(loss)
                engine.step()
                tokens += int(batch["lengths"].sum())
                losses.append({"total": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
            step += 1
            seconds = time.perf_counter() - t_step
            profiler.end(step)
            parts = {k: sum(d[k] for d in losses) / len(losses) for k in losses[0]}
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            stats = torch.tensor([tokens, wait, seconds, float(stop.requested)],
                                 dtype=torch.float64, device=place.device)
            dist.all_reduce(stats)
            totals += stats[:3].cpu()
            metrics.steps.inc()
            metrics.tokens.inc(tokens)
            metrics.step_seconds.observe(seconds)
            metrics.teacher_wait_seconds.observe(wait)
            for k, v in parts.items():
                metrics.loss[k].set(v)
            metrics.learning_rate.set(lr)
            metrics.grad_norm.set(grad_norm)
            record.write(json.dumps({"step": step, "lr": lr, "grad_norm": grad_norm,
                                     "tokens": tokens, "teacher_wait": wait, "seconds": seconds,
                                     "start": t_wall, "end": time.time(),
                                     "teacher_forward": forwards, **parts}) + "\n")
            record.flush()
            history.setdefault("first", parts)
            history["last"] = parts
            if place.rank == 0 and step % cfg.train.log_every == 0:
                share = float(stats[1]) / max(float(stats[2]), 1e-9)
                loss_text = " ".join(f"{k} {v:.4g}" for k, v in parts.items())
                log.info("step %d/%d | %s | lr %.2e | grad %.3g | %.0f tok/s | teacher wait "
                         "%.0f%%", step, cfg.train.steps, loss_text, lr, grad_norm,
                         float(stats[0]) / max(float(stats[2]) / place.world_size, 1e-9),
                         100 * share)
            last = step == cfg.train.steps
            stopping = float(stats[3]) > 0
            if cfg.train.val_every and (step % cfg.train.val_every == 0 or last):
                val = validate(engine, cfg, place, teacher, tokenizer.pad_token_id)
                metrics.val_loss["student"].set(val["student_loss"])
                if "teacher_loss" in val:
                    metrics.val_loss["teacher"].set(val["teacher_loss"])
                history.setdefault("first_val", val)
                history["last_val"] = val
                if place.rank == 0:
                    log.info("validation at step %d: %s", step,
                             " ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if (step % cfg.train.checkpoint_every == 0 or stopping
                    or (last and cfg.train.save_at_end)):
                path = checkpoint.save(engine, out_dir, step,
                                       {"data": prefetcher.data_state(), "history": history},
                                       cfg.train.keep_checkpoints)
                if place.rank == 0:
                    log.info("checkpoint %s", path)
            if stopping:
                log.info("stop requested: checkpointed at step %d, exiting", step)
                break
        summary = {}
        if step >= cfg.train.steps:
            exported = export(engine, cfg, tokenizer, place) if cfg.train.save_at_end else None
            summary = {"steps": step, "tokens": float(totals[0]),
                       "tokens_per_second": float(totals[0]) / max(float(totals[2]) / place.world_size, 1e-9),
                       "teacher_wait_share": float(totals[1]) / max(float(totals[2]), 1e-9),
                       "history": history, "student": str(exported) if exported else None}
            if place.rank == 0:
                (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
                log.info("done after %d steps; student exported to %s", step, exported)
        return summary
    finally:
        record.close()
        if teacher is not None:
            teacher.close()
        if http is not None:
            http.close()
