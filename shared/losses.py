"""The distillation losses, each averaged over real tokens (labels != -100), never over
padding and never scaled by sequence length.

Labels follow the project's convention: already shifted, ``labels[b, t]`` is the token to
predict at position ``t``, so student logits, teacher logits and labels line up position by
position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared import kd_ce_triton
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


CHUNK_ELEMENTS = 1 << 26
"""Rows per chunk of :func:`kd_ce_full` = this // vocabulary: 256 MiB of float32 temporaries."""


LOSS_KERNELS = ("auto", "triton", "torch")
"""auto: the Triton kernel (shared/kd_ce_triton.py) for CUDA logits when Triton imports, else
the chunked PyTorch path; triton / torch force one (torch is the kernel's reference)."""


def _chunked_sums(s_rows: torch.Tensor, t_rows: torch.Tensor | None, labels: torch.Tensor,
                  count: torch.Tensor, temperature: float, kl_weight: float, ce_weight: float,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The PyTorch form of :func:`shared.kd_ce_triton.kd_ce_sums` (same arguments, same
    results): row chunks of float32 temporaries, the gradient made with the loss."""
    real = _real(labels)
    kl_sum = torch.zeros((), device=s_rows.device, dtype=torch.float32)
    ce_sum = torch.zeros_like(kl_sum)
    grad = torch.empty_like(s_rows) if need_grad else None
    step = max(1, CHUNK_ELEMENTS // s_rows.shape[-1])
    for start in range(0, s_rows.shape[0], step):
        rows = slice(start, start + step)
        weight = real[rows].to(torch.float32)[:, None]
        s = s_rows[rows].float()
        target = labels[rows].clamp_min(0)[:, None]
        lse = torch.logsumexp(s, -1, keepdim=True)
        ce_sum += ((lse - s.gather(-1, target)) * weight).sum()
        g = None
        if need_grad and ce_weight:
            g = (s - lse).exp_().scatter_add_(-1, target, -torch.ones_like(s[:, :1]))
            g.mul_(ce_weight)
        if t_rows is not None:
            s_t = torch.log_softmax(s / temperature, -1)
            t_t = torch.log_softmax(t_rows[rows].float() / temperature, -1)
            p_t = t_t.exp()
            kl_sum += ((p_t * (t_t - s_t)).sum(-1, keepdim=True) * weight).sum()
            if need_grad and kl_weight:
                # d(T² KL)/d(logits) = T (softmax(s/T) - p_teacher)
                g_kl = s_t.exp_().sub_(p_t).mul_(kl_weight * temperature)
                g = g_kl if g is None else g.add_(g_kl)
        if need_grad:
            grad[rows] = 0 if g is None else g.mul_(weight / count)
    return kl_sum, ce_sum, grad


class _FusedKdCe(torch.autograd.Function):
    """KL + CE over the full vocabulary, with the gradient made in the forward.

    The naive form (:func:`kl_full` + :func:`ce_loss`) gathers the real rows and casts whole
    [tokens, vocabulary] tensors to float32, several times over: at Llama-3's 128,256-token
    vocabulary and 4,096 tokens each such tensor is 2.1 GB, and on an H200 the gathers and casts
    took ~13 ms of a 0.28 s student step (BENCHMARKS.md). Here the logits are read in float32
    a row chunk at a time (or a row per Triton program), the loss and d(loss)/d(logits) are
    made together, and the gradient is kept in the logits' dtype for the backward (which only
    scales it).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature, kl_weight, ce_weight,
                need_grad, kernel):  # noqa: ANN001, ANN205
        if teacher_logits is None:  # sft: the CE alone
            kl_weight, ce_weight = 0.0, 1.0
        vocab = student_logits.shape[-1]
        if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ: distillation over the full "
                             "vocabulary needs one vocabulary and one batch layout on both sides")
        s_rows = student_logits.reshape(-1, vocab)
        t_rows = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        count = _real(flat_labels).sum().clamp_min(1).to(torch.float32)
        sums = _chunked_sums
        if kernel != "torch" and s_rows.is_cuda and kd_ce_triton.available():
            sums = kd_ce_triton.kd_ce_sums
        if kernel == "triton" and sums is _chunked_sums:
            raise RuntimeError("loss kernel 'triton' needs Triton and logits on a CUDA device; "
                               "use train.loss_kernel: torch (or auto) on this machine")
        kl_sum, ce_sum, grad = sums(s_rows, t_rows, flat_labels, count, temperature, kl_weight,
                                    ce_weight, need_grad)
        kl = kl_sum / count * temperature ** 2
        ce = ce_sum / count
        loss = kl_weight * kl + ce_weight * ce  # a tensor of its own: kl and ce are detached
        ctx.save_for_backward(grad.view_as(student_logits) if need_grad else None)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def kd_ce_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
               labels: torch.Tensor, temperature: float = 1.0, kl_weight: float = 1.0,
               ce_weight: float = 0.0, kernel: str = "auto",
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl_weight·KL + ce_weight·CE, KL, CE)``: the values of :func:`kl_full` and
    :func:`ce_loss` (their naive references), fused. Without teacher logits the loss is the CE
    alone (sft). KL and CE are returned detached, for logging. ``kernel``: one of
    :data:`LOSS_KERNELS`."""
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"loss kernel {kernel!r}: choose one of {', '.join(LOSS_KERNELS)}")
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _FusedKdCe.apply(student_logits, teacher_logits, labels, temperature, kl_weight,
                            ce_weight, need_grad, kernel)


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
