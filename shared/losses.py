"""The distillation losses, each averaged over real tokens (labels != -100), never over
padding and never scaled by sequence length.

Labels follow the project's convention: already shifted, ``labels[b, t]`` is the token to
predict at position ``t``, so student logits, teacher logits and labels line up position by
position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.labels import IGNORE


def _real(mask_source: torch.Tensor) -> torch.Tensor:
    return mask_source != IGNORE


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token, mean over trained positions."""
    mask = _real(labels)
    return F.cross_entropy(student_logits[mask].float(), labels[mask])


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) over the full vocabulary, mean per real token, times T².

    The reference used ``kl_div(reduction='batchmean')`` on [B, T, V] tensors, which divides by
    the batch only: its loss grew with sequence length. Ours is a per-token mean.
    """
    mask = _real(labels)
    s = torch.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature ** 2


def kl_topk(student_logits: torch.Tensor, topk_logprobs: torch.Tensor,
            topk_indices: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL over the teacher's top-k tokens plus one "tail" bucket holding the rest.

    The teacher sends log-probabilities (normalised over the full vocabulary at this
    temperature) of its k most likely tokens; the tail mass 1 − Σp is compared with the
    student's mass outside those k tokens, so the loss is a true KL between two
    (k+1)-outcome distributions and is zero exactly when the student matches.
    """
    mask = _real(labels)
    s = torch.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t_lp = topk_logprobs[mask].float()
    s_lp = s.gather(-1, topk_indices[mask].long())
    t_tail = torch.log1p(-t_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    s_tail = torch.log1p(-s_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    head = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    tail = t_tail.exp() * (t_tail - s_tail)
    return (head + tail).mean() * temperature ** 2


def align_loss(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor],
               attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden-state alignment: squared L2 error per token (mean over the hidden dimension),
    averaged over real tokens, then over layers. ``student[i]`` is compared with
    ``teacher[i]`` for every key of ``student``."""
    mask = attention_mask.bool()
    losses = []
    for layer, out in student.items():
        diff = (out.float() - teacher[layer].float())[mask]
        losses.append(diff.pow(2).mean(-1).mean())
    return torch.stack(losses).mean()


def perplexity(loss: torch.Tensor | float) -> float:
    return float(torch.exp(torch.as_tensor(loss, dtype=torch.float64).clamp(max=50)))
