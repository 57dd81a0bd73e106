"""What one training step optimises, per stage, as a module DeepSpeed can wrap.

Putting the loss inside ``forward`` means ``engine(batch, teacher)`` drives everything, so
ZeRO-3's parameter gathering hooks run for the teacher-forced alignment path too (which calls
single layers, not the model's forward).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from shared.config import LinkConfig, TrainConfig
from shared.labels import IGNORE
from shared.link import RequestSpec
from shared.link.protocol import layer_io_states, layer_output_states
from shared.losses import align_loss, ce_loss, kd_ce_full, kl_topk
from shared.student.packing import HostPositions

log = logging.getLogger(__name__)


def teacher_request(train: TrainConfig, link: LinkConfig, converted: list[int],
                    num_layers: int) -> RequestSpec | None:
    """What the stage needs from the teacher: only the tensors it uses, nothing more."""
    if train.stage == "sft":
        return None
    if train.stage == "align":
        if train.align_mode == "teacher_forced":
            states = layer_io_states(converted)
        else:
            states = layer_output_states(num_layers)
        return RequestSpec(logits="none", hidden_layers=states)
    if link.logits == "none":
        raise ValueError("train.stage=kd needs teacher logits: set link.logits to bf16, topk "
                         "or fp32")
    return RequestSpec(logits=link.logits, top_k=link.top_k, temperature=train.temperature)


def host_kwargs(host_positions: HostPositions | None) -> dict:
    """The student's forward keyword for the batch's host positions; none without them (a
    transformers model, the benchmarks' plain student, takes no such keyword)."""
    return {} if host_positions is None else {"host_positions": host_positions}


def skipped_targets(train: TrainConfig, dataset_dirs: list[str]) -> tuple[int, ...]:
    """Tokens whose positions do not train: with ``train.skip_eos_targets`` in kd / sft, the
    end-of-document tokens of the text datasets among ``dataset_dirs`` (their cards'
    ``eos_token_id``; chat datasets have none), else none."""
    from shared.data_card import read_card

    if not train.skip_eos_targets or train.stage == "align":
        return ()
    found = {int(card["eos_token_id"]) for card in map(read_card, dataset_dirs)
             if card.get("eos_token_id") is not None}
    if not found:
        raise ValueError("train.skip_eos_targets: none of the training datasets is a text "
                         f"dataset with an eos_token_id in its card ({', '.join(dataset_dirs)}); "
                         "chat datasets end no documents: turn the option off")
    log.info("train.skip_eos_targets: positions predicting token %s not trained",
             ", ".join(map(str, sorted(found))))
    return tuple(sorted(found))


def drop_targets(labels: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """``labels`` with every position whose target is one of ``tokens`` made ``IGNORE``."""
    for token in tokens:
        labels = labels.masked_fill(labels == token, IGNORE)
    return labels


class DistillObjective(nn.Module):
    """``forward(batch, teacher) -> (loss, {part: value})`` for the configured stage.
    ``skip_targets``: tokens whose positions never train in kd / sft (``train.skip_eos_targets``,
    :func:`skipped_targets`)."""

    def __init__(self, student: nn.Module, train: TrainConfig, request: RequestSpec | None,
                 skip_targets: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.student = student
        self.train_cfg = train
        self.request = request
        self.skip_targets = skip_targets

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, teacher: dict[str, torch.Tensor] | None = None,
                position_ids: torch.Tensor | None = None,
                host_positions: HostPositions | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``position_ids`` (packed datasets) restart at each document: no document sees
        another, in the student as in the teacher's answer. ``host_positions``: the batch's
        ``(position_ids, attention_mask)`` on the host, so the student finds its packed
        documents without waiting for the GPU (shared.student.packing.packed_documents)."""
        cfg = self.train_cfg
        if cfg.stage == "align":
            return self._align(input_ids, attention_mask, position_ids, teacher, host_positions)
        logits = self.student(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False,
                              **host_kwargs(host_positions)).logits
        labels = drop_targets(labels, self.skip_targets)
        if cfg.stage == "sft":
            loss, _, ce = kd_ce_full(logits, None, labels, kernel=cfg.loss_kernel)
            return loss, {"ce": ce}
        assert teacher is not None and self.request is not None
        if self.request.logits == "topk":
            ce = ce_loss(logits, labels)
            kl = kl_topk(logits, teacher["topk_logprobs"], teacher["topk_indices"], labels,
                         cfg.temperature)
            loss = cfg.kl_weight * kl + cfg.ce_weight * ce
            return loss, {"kl": kl.detach(), "ce": ce.detach()}
        loss, kl, ce = kd_ce_full(logits, teacher["logits"], labels, cfg.temperature,
                                  cfg.kl_weight, cfg.ce_weight, cfg.loss_kernel)
        return loss, {"kl": kl, "ce": ce}

    def _align(self, input_ids, attention_mask, position_ids, teacher, host_positions):
        assert teacher is not None and self.request is not None
        states = dict(zip(self.request.hidden_layers, teacher["hidden_states"], strict=True))
        if self.train_cfg.align_mode == "teacher_forced":
            layers = self.student.converted_layers
            outputs = self.student.align_forward({i: states[i] for i in layers}, attention_mask,
                                                 position_ids, host_positions)
            loss = align_loss(outputs, {i: states[i + 1] for i in layers}, attention_mask)
        else:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, output_hidden_states=True,
                               use_cache=False, **host_kwargs(host_positions))
            ours = {i: out.hidden_states[i] for i in self.request.hidden_layers}
            loss = align_loss(ours, states, attention_mask)
        return loss, {"align": loss.detach()}
