"""The learning rate of each optimizer step: linear warm-up, then a cosine decay over the
stage's steps or, with ``train.lr_schedule: time``, over its time limit if that runs out first."""
from __future__ import annotations

import math

from shared.config import Config


def learning_rate(cfg: Config, step: int, time_spent: float = 0.0) -> float:
    """Linear warm-up to lr_init, then cosine decay to lr_final at the last step or, with
    ``train.lr_schedule: time``, by the end of the time limit if that comes first
    (``time_spent``: the share of it spent so far, 0..1)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr_init * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    if t.lr_schedule == "time":
        progress = max(progress, time_spent)
    cosine = 1 + math.cos(math.pi * min(1.0, progress))
    return t.lr_final + 0.5 * (t.lr_init - t.lr_final) * cosine
