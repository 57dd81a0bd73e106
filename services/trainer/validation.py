"""The trainer's validation: the student's (and the teacher's) loss and KL on held-out batches."""
from __future__ import annotations

import torch

from services.trainer.prefetch import to_device
from services.trainer.stats import ValidationStats, ValidationSums
from shared.config import Config
from shared.link import RequestSpec
from shared.losses import IGNORE, kd_ce_full


@torch.no_grad()
def validate(engine, cfg: Config, place, teacher) -> ValidationStats:
    """Mean student (and teacher) loss and KL per real token over the held-out batches."""
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    from shared.data_card import read_card
    from shared.data_loader import validation_batches

    val_dir = cfg.data.val_dir or cfg.data.train_dir
    # a held-out directory made with --split validation holds a "validation" split; one made
    # from a training corpus holds "train" only
    split = "validation" if "validation" in read_card(val_dir)["splits"] else "train"
    student = engine.module.student
    student.eval()
    sums = ValidationSums()
    spec = RequestSpec(logits="fp32" if cfg.link.logits == "fp32" else "bf16")
    for i, batch in enumerate(validation_batches(val_dir, cfg.data.micro_batch_size,
                                                 place.world_size, place.rank, split=split,
                                                 max_len=cfg.data.max_len)):
        if i >= cfg.train.val_batches:
            break
        labels = batch["labels"].masked_fill(batch["sample_mask"][:, None] == 0, IGNORE)
        n = int((labels != IGNORE).sum())
        if n == 0:
            continue
        b = to_device(batch, place.device)
        labels = labels.to(place.device)
        with autocast_if_enabled(engine):   # bf16 as in training (configs/deepspeed/zero0.json)
            logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             position_ids=b.get("position_ids"), use_cache=False).logits
        if teacher is None:
            sums.add(n, float(kd_ce_full(logits, None, labels)[2]))
            continue
        t_logits = teacher.request(batch["input_ids"], batch["lengths"], spec,
                                   batch.get("position_ids")).result()["logits"]
        _, kl, student_nll = kd_ce_full(logits, t_logits, labels)
        sums.add(n, float(student_nll), float(kd_ce_full(t_logits, None, labels)[2]), float(kl))
    student.train()
    return ValidationStats.from_sums(sums.over_ranks(place.device), teacher is not None)
