"""The student's optimizer groups: which of its parameters decay, and which train faster.

RWKV-LM trains the time-decay parameters with a larger learning rate (its ``lr_2x`` set) and never
decays them; vectors (biases, norms, token-shift mixes) get no weight decay either.
"""
from __future__ import annotations

import re

from torch import nn

TIME_DECAY = re.compile(r"\.(time_decay|time_faaaa|w0)$")
"""Names of the time-decay parameters: RWKV-6's ``time_decay`` and ``time_faaaa`` (bonus),
RWKV-7's ``w0`` (see ``shared.student.layers``)."""


def param_groups(model: nn.Module, weight_decay: float,
                 time_decay_lr_scale: float) -> list[dict]:
    """AdamW groups of the trainable parameters: ``decay`` (matrices, ``weight_decay``),
    ``no_decay`` (vectors), ``time_decay`` (no decay, ``lr_scale = time_decay_lr_scale``).
    Each group carries its ``lr_scale`` for the learning-rate schedule; empty groups are left
    out."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "time_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if TIME_DECAY.search(name):
            groups["time_decay"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0),
                "time_decay": (0.0, time_decay_lr_scale)}
    return [{"params": ps, "weight_decay": settings[k][0], "lr_scale": settings[k][1],
             "name": k} for k, ps in groups.items() if ps]


def trainable_names(student: nn.Module, stage: str, trainable: str) -> set[str]:
    """Names of the parameters that train for ``train.stage`` / ``train.trainable``: align
    trains the mixers only; kd and sft the mixers, the converted layers or everything."""
    if stage == "align" or trainable == "mixers":
        return set(student.mixer_parameter_names())
    if trainable == "rwkv_layers":
        return set(student.converted_layer_parameter_names())
    return {n for n, _ in student.named_parameters()}
