"""The FLOPs of a training step, the one formula behind every model FLOPs utilisation (MFU).

The trainer's progress line, its metrics and the benchmarks all count with this module, so
their MFU figures agree. Counted per trained token, a multiply and an add being two FLOPs:

Student (``training_flops_per_token``):
  * matmuls: every ``nn.Linear`` weight (decoder projections, kept MLPs, channel-mixes, the LM
    head, tied or not) and the RWKV LoRA matrices (``time_maa_w1/w2``, ``time_decay_w1/w2``,
    ``w1/w2``, ``a1/a2``, ``v1/v2``, ``g1/g2``); N is their size. Forward 2·N. Backward: 2·N
    for the gradient of the activations, wherever a trainable parameter lies upstream, plus
    2·N for the weight gradient of the weights that train. So a fully trained model costs the
    familiar 6·N, a frozen layer after the first trainable one 4·N (its activation gradients
    are needed, its weight gradients are not computed), and a layer before the first
    trainable one 2·N (no backward reaches it). "Upstream" is judged per decoder layer: the
    whole first trainable layer counts its activation gradients (in a converted layer the
    first trainable parameters feed its first matmuls, so this is exact but for a kept layer
    whose only trainable part is late in it).
  * softmax attention of the kept layers: QKᵀ and AV are 2·2·T·A per token (A = heads ×
    head_dim) over all T keys, halved by causality: 2·T·A forward, twice that backward.
    T is the mean attention span per token, Σ L² / Σ L over the documents of the step
    (:func:`attention_span`): a packed row's documents do not see each other.
  * the WKV recurrence of the converted layers, per head and token on the n × n state
    (n = head size): RWKV-6 5·n² (decay and k·vᵀ update 3·n², r·S 2·n²), RWKV-7 9·n² (decay
    n², S·a 2·n², (S·a)·bᵀ n², v·kᵀ n², the two sums 2·n², S·r 2·n²); backward twice the
    forward, where it runs.
Stages: ``kd`` and ``sft`` run the whole student. ``align`` with ``teacher_forced`` runs each
converted layer alone on the teacher's input (no embeddings, kept layers or head); ``free``
runs the whole student, the head forward only (the loss reads hidden states).

Teacher (``teacher_flops_per_token``): its forward only, 2·N over the decoder layers it runs
(up to the deepest state asked for) and the LM head when logits are asked for, plus 2·T·A per
attention layer. Counted apart, so a caller adds it only where the teacher runs on the same
device (``link.mode=in_process``).

Left out: embedding lookups, norms, activations, RoPE, token shift, the RWKV bonus (u / r_k)
terms and gates (O(d) per token), the KL and cross-entropy over the vocabulary (O(V) per token,
elementwise), the optimizer step, and any recomputation (gradient checkpointing): these are
model FLOPs, not hardware FLOPs, as in PaLM's MFU.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

WKV_FLOPS_PER_STATE_ENTRY = {"rwkv6": 5, "rwkv7": 9}
"""Forward FLOPs of the WKV recurrence per head, token and entry of the n × n state."""

# bf16 dense tensor-core peak of the datasheets (the sparse figures halved), by the name
# torch.cuda.get_device_name reports; the more specific names first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),   # SXM
    ("A100", 312e12),
)

LORA_NAME = re.compile(r"(^|_)[a-z]+[12]$")
"""RWKV LoRA matrices (time_maa_w1, time_decay_w2, w1, a2, ...): matmuls that are not
``nn.Linear`` modules. Other 2-D RWKV parameters (time_faaaa, r_k) are elementwise."""

STAGES = ("align", "kd", "sft")


@dataclass(frozen=True)
class StepFlops:
    """FLOP terms of one trained token that do not depend on the attention span."""

    matmul_forward: float      # 2·N of the matmuls that run
    matmul_backward: float     # 2·N activation gradients + 2·N weight gradients
    attention_forward_layers: int
    attention_backward_layers: int
    attention_width: int       # heads × head_dim of the softmax attention layers
    wkv_forward: float         # per token, all converted layers
    wkv_backward: float

    def per_token(self, seq_len: float) -> float:
        """FLOPs per trained token at a mean attention span of ``seq_len`` tokens."""
        attention = 2.0 * seq_len * self.attention_width
        return (self.matmul_forward + self.matmul_backward + self.wkv_forward
                + self.wkv_backward + attention * (self.attention_forward_layers
                                                   + 2 * self.attention_backward_layers))


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves an empty local tensor


def _matmul_weights(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(module path, weight) of every matmul weight, a tied LM head included."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield path, module.weight
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and LORA_NAME.search(name) and not isinstance(module, nn.Embedding):
                yield path, p


def _position(path: str, num_layers: int) -> float:
    """Where a module runs in the forward: embeddings -1, decoder layer i at i, head last."""
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", path)
    if match:
        return int(match.group(1))
    if "embed" in path:
        return -1
    return num_layers + (1 if path.endswith("lm_head") or path == "lm_head" else 0.5)


def _layer_of(path: str) -> int | None:
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def student_step_flops(student: nn.Module, stage: str = "kd",
                       align_mode: str = "teacher_forced") -> StepFlops:
    """The terms of ``student`` (a ``RWKVHybridForCausalLM``) as it trains now: the weights
    with ``requires_grad`` train (the trainer has already frozen the rest)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    cfg = student.config
    num_layers = cfg.num_hidden_layers
    converted = set(cfg.rwkv_layers)
    head_only_forward = stage == "align" and align_mode == "free"
    per_layer = stage == "align" and align_mode == "teacher_forced"
    positions = {}
    for name, p in student.named_parameters():
        if p.requires_grad:
            positions.setdefault(_position(name.rsplit(".", 1)[0], num_layers), True)
    if not positions:
        raise ValueError("no parameter of the student trains: nothing to count")
    first = min(positions)
    trained_layers = {int(pos) for pos in positions if 0 <= pos < num_layers and pos == int(pos)}

    def runs(path: str) -> bool:
        layer = _layer_of(path)
        return not per_layer or (layer is not None and layer in converted)

    def needs_backward(path: str) -> bool:
        layer = _layer_of(path)
        if per_layer:  # each converted layer is its own graph, fed the teacher's state
            return layer in trained_layers
        if layer is None:  # the head (or anything after the decoder)
            return not head_only_forward and _position(path, num_layers) > first
        return layer >= first

    forward = backward = 0.0
    for path, weight in _matmul_weights(student):
        if not runs(path):
            continue
        n = _numel(weight)
        forward += 2 * n
        if needs_backward(path):
            backward += 2 * n
        if weight.requires_grad and not (head_only_forward and _layer_of(path) is None):
            backward += 2 * n
    heads, head_size = cfg.num_attention_heads, int(cfg.rwkv_head_size or cfg.head_dim)
    kept = [i for i in range(num_layers) if i not in converted]
    attention_forward = 0 if per_layer else len(kept)
    attention_backward = 0 if per_layer else sum(1 for i in kept if i >= first)
    wkv_layer = WKV_FLOPS_PER_STATE_ENTRY[cfg.rwkv_mixer] * heads * head_size ** 2
    wkv_backward_layers = sum(1 for i in converted
                              if (i in trained_layers if per_layer else i >= first))
    return StepFlops(matmul_forward=forward, matmul_backward=backward,
                     attention_forward_layers=attention_forward,
                     attention_backward_layers=attention_backward,
                     attention_width=heads * int(getattr(cfg, "head_dim", None) or head_size),
                     wkv_forward=float(wkv_layer * len(converted)),
                     wkv_backward=float(2 * wkv_layer * wkv_backward_layers))


_STRUCTURE_CACHE: dict[str, StepFlops] = {}


def _meta_student(student_config: Any, converted_layers: Sequence[int] | None):
    from shared.config import StudentConfig
    from shared.student import RWKVHybridConfig, RWKVHybridForCausalLM

    if getattr(student_config, "model_type", None) == RWKVHybridConfig.model_type:
        config = copy.deepcopy(student_config)
        if converted_layers is not None:
            config.rwkv_layers = sorted(set(int(i) for i in converted_layers))
    else:  # a teacher's config: converted with the default student options
        layers = list(converted_layers) if converted_layers is not None else "all"
        config = RWKVHybridConfig.from_base_config(student_config, StudentConfig(layers=layers))
    with torch.device("meta"):
        return RWKVHybridForCausalLM(config)


def training_flops_per_token(student_config: Any, converted_layers: Sequence[int] | None,
                             seq_len: float, stage: str = "kd", trainable: str = "all",
                             align_mode: str = "teacher_forced") -> float:
    """FLOPs per trained token of a student built from ``student_config`` (an
    ``RWKVHybridConfig``, or a teacher's config converted with the default options), with
    ``converted_layers`` (None: the config's), ``stage`` / ``trainable`` / ``align_mode`` as
    in ``train.*``. Built once per setting on the meta device (no memory), then cached."""
    from shared.student.param_groups import trainable_names

    key = json.dumps([student_config.to_json_string(), list(converted_layers or []),
                      converted_layers is None, stage, trainable, align_mode])
    if key not in _STRUCTURE_CACHE:
        student = _meta_student(student_config, converted_layers)
        names = trainable_names(student, stage, trainable)
        for name, p in student.named_parameters():
            p.requires_grad_(name in names)
        _STRUCTURE_CACHE[key] = student_step_flops(student, stage, align_mode)
    return _STRUCTURE_CACHE[key].per_token(seq_len)


@dataclass(frozen=True)
class TeacherFlops:
    """Forward FLOP terms of one teacher token that do not depend on the attention span."""

    layer_matmul: float        # 2·N of one decoder layer
    head_matmul: float         # 2·N of the LM head
    num_layers: int
    attention_width: int

    def per_token(self, seq_len: float, layers_run: int | None = None,
                  logits: bool = True) -> float:
        """Forward FLOPs per token through ``layers_run`` layers (None: all), the head too
        when ``logits``; the head needs every layer, so ``logits`` runs them all."""
        layers = self.num_layers if logits or layers_run is None else layers_run
        return (layers * (self.layer_matmul + 2.0 * seq_len * self.attention_width)
                + (self.head_matmul if logits else 0.0))


def teacher_step_flops(teacher: nn.Module) -> TeacherFlops:
    """The terms of a Llama-family causal LM (decoder layers alike, as they are there)."""
    cfg = teacher.config
    layer = head = 0.0
    for path, weight in _matmul_weights(teacher):
        index = _layer_of(path)
        if index == 0:
            layer += 2 * _numel(weight)
        elif index is None:
            head += 2 * _numel(weight)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return TeacherFlops(layer, head, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim)


def teacher_flops_per_token(teacher_config: Any, seq_len: float, layers_run: int | None = None,
                            logits: bool = True) -> float:
    """Forward FLOPs per token of the teacher of ``teacher_config`` (a transformers config),
    built once on the meta device and cached."""
    from transformers import AutoModelForCausalLM

    key = teacher_config.to_json_string()
    if key not in _TEACHER_CACHE:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(teacher_config)
        _TEACHER_CACHE[key] = teacher_step_flops(model)
    return _TEACHER_CACHE[key].per_token(seq_len, layers_run, logits)


_TEACHER_CACHE: dict[str, TeacherFlops] = {}


def attention_span(lengths: Sequence[int] | torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> float:
    """Mean number of keys a causal attention sees per token, doubled (Σ L² / Σ L over the
    documents): the ``seq_len`` of the formulas above. ``lengths`` are the rows' real lengths;
    with ``position_ids`` (packed rows) each document counts alone."""
    if position_ids is None:
        docs = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    else:
        from shared.student.packing import document_starts

        starts = document_starts(position_ids)
        docs = []
        for row, n in enumerate(lengths.tolist() if torch.is_tensor(lengths) else lengths):
            begin = torch.nonzero(starts[row, :int(n)]).flatten().tolist() + [int(n)]
            docs += [b - a for a, b in zip(begin, begin[1:], strict=False)]
    total = sum(docs)
    return sum(d * d for d in docs) / total if total else 0.0


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak FLOP/s of ``device``'s datasheet; None on a CPU or an unknown card
    (then no MFU is reported)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def mfu(flops_per_second: float, device: torch.device | str) -> float | None:
    """Model FLOPs utilisation: ``flops_per_second`` over the device's peak (None without
    one)."""
    peak = peak_flops(device)
    return flops_per_second / peak if peak else None
