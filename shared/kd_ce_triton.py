"""KL + CE over the full vocabulary in one Triton kernel: the fast path of
:func:`shared.losses.kd_ce_full` on CUDA.

Its reference is the chunked PyTorch path in shared/losses.py (``_FusedKdCe``), and both are
checked against the naive ``kl_full`` / ``ce_loss`` (tests/test_losses.py on CPU,
tests/test_losses_gpu.py on the device). Why a kernel: at Llama-3's 128,256-token vocabulary
the chunked path makes ~15 float32 passes over every [rows, vocabulary] chunk; on an H200 it
took 23 ms of a 0.25 s student step for 4,096 tokens (BENCHMARKS.md), where reading both
logits twice and writing the gradient once moves ~5 GB (~1.5 ms at HBM speed).

One program per row, two sweeps over the vocabulary in blocks:
1. online log-sum-exp of the student's logits (at temperature 1 for the CE, at T for the KL)
   and of the teacher's at T, and the KL's cross term Σ e^(b−m)(b−a), rescaled whenever the
   running maximum moves, so KL(p_t ‖ q_s) = Σ e^(b−m)(b−a) / Σ e^(b−m) − lse_b + lse_a
   (a = student/T, b = teacher/T) needs no second sweep;
2. (training only) the gradient, written in the logits' dtype:
   d/ds [w_ce·CE + w_kl·T²·KL] = w_ce·(softmax(s) − onehot) + w_kl·T·(softmax(a) − p_t),
   times 1/(real tokens) on real rows and 0 on masked ones.
"""
from __future__ import annotations

import functools

import torch

from shared.labels import IGNORE

BLOCK = 4096  # 32 blocks per row at a 128,256 vocabulary; fits the registers of 8 warps


@functools.lru_cache(maxsize=1)
def _kernel():  # noqa: ANN202 - a triton.JITFunction; defined lazily (CPU builds lack triton)
    import triton
    import triton.language as tl

    @triton.jit
    def kd_ce_rows(S, T, LABELS, COUNT, GRAD, KL, CE, stride_s, stride_t, stride_g, vocab,
                   inv_temp, kl_scale, ce_weight,
                   IGNORE_INDEX: tl.constexpr, HAS_TEACHER: tl.constexpr, USE_KL: tl.constexpr,
                   USE_CE: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        real = label != IGNORE_INDEX
        s_row = S + row * stride_s
        t_row = T + row * stride_t
        m_s = float("-inf")  # CE: running max and sum of exp of the student's logits
        z_s = 0.0
        m_a = float("-inf")  # KL: the student's logits / T
        z_a = 0.0
        m_b = float("-inf")  # KL: the teacher's logits / T
        z_b = 0.0
        cross = 0.0  # Σ e^(b − m_b) (b − a)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            s = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_s, tl.max(s, 0))
            z_s = z_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), 0)
            m_s = m_new
            if HAS_TEACHER:
                a = s * inv_temp
                m_new = tl.maximum(m_a, tl.max(a, 0))
                z_a = z_a * tl.exp(m_a - m_new) + tl.sum(tl.exp(a - m_new), 0)
                m_a = m_new
                b = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
                b = b * inv_temp
                m_new = tl.maximum(m_b, tl.max(b, 0))
                rescale = tl.exp(m_b - m_new)
                e = tl.exp(b - m_new)
                z_b = z_b * rescale + tl.sum(e, 0)
                cross = cross * rescale + tl.sum(tl.where(inside, e * (b - a), 0.0), 0)
                m_b = m_new
        lse_s = m_s + tl.log(z_s)
        # ids outside the vocabulary are refused before a step (services/trainer/loop.py);
        # clamped here all the same, so that no bad row can make the kernel read outside its row
        safe_label = tl.minimum(tl.maximum(tl.where(real, label, 0), 0), vocab - 1)
        ce = lse_s - tl.load(s_row + safe_label).to(tl.float32)
        tl.store(CE + row, tl.where(real, ce, 0.0))
        lse_a = m_a + tl.log(z_a)
        lse_b = m_b + tl.log(z_b)
        if HAS_TEACHER:
            kl = cross / z_b - lse_b + lse_a
            tl.store(KL + row, tl.where(real, kl, 0.0))
        if NEED_GRAD:
            row_scale = tl.where(real, 1.0 / tl.load(COUNT), 0.0)
            g_row = GRAD + row * stride_g
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < vocab
                s = tl.load(s_row + cols, mask=inside, other=0.0).to(tl.float32)
                g = tl.zeros([BLOCK], dtype=tl.float32)
                if USE_CE:
                    g += ce_weight * (tl.exp(s - lse_s) - tl.where(cols == safe_label, 1.0, 0.0))
                if USE_KL:
                    b = tl.load(t_row + cols, mask=inside, other=0.0).to(tl.float32)
                    g += kl_scale * (tl.exp(s * inv_temp - lse_a) - tl.exp(b * inv_temp - lse_b))
                tl.store(g_row + cols, (g * row_scale).to(GRAD.dtype.element_ty), mask=inside)

    return kd_ce_rows


def available() -> bool:
    """True when Triton imports (it ships with CUDA builds of torch, not CPU ones)."""
    try:
        _kernel()
    except ImportError:
        return False
    return True


def _unit_stride(rows: torch.Tensor) -> torch.Tensor:
    return rows if rows.stride(-1) == 1 else rows.contiguous()  # the kernel steps by element


def kd_ce_sums(s_rows: torch.Tensor, t_rows: torch.Tensor | None, labels: torch.Tensor,
               count: torch.Tensor, temperature: float, kl_weight: float, ce_weight: float,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For [rows, vocabulary] logits and [rows] labels: ``(Σ KL, Σ CE, gradient or None)``,
    sums over the real rows (KL without the T² factor), the gradient of
    kl_weight·T²·ΣKL/count + ce_weight·ΣCE/count in the logits' dtype. ``count`` (the real
    rows, a float32 tensor ≥ 1) stays on the GPU: no host sync here."""
    s = _unit_stride(s_rows)
    t = None if t_rows is None else _unit_stride(t_rows)
    rows, vocab = s.shape
    kl = torch.zeros(rows, device=s.device, dtype=torch.float32)
    ce = torch.empty_like(kl)
    grad = torch.empty_like(s) if need_grad else None
    try:
        _kernel()[(rows,)](
            s, s if t is None else t, labels.reshape(-1), count, s if grad is None else grad, kl,
            ce, s.stride(0), s.stride(0) if t is None else t.stride(0),
            0 if grad is None else grad.stride(0), vocab,
            1.0 / temperature, kl_weight * temperature, ce_weight, IGNORE_INDEX=IGNORE,
            HAS_TEACHER=t is not None, USE_KL=t is not None and kl_weight != 0,
            USE_CE=ce_weight != 0, NEED_GRAD=need_grad, BLOCK=BLOCK, num_warps=8)
    except Exception as err:  # Triton cannot build or launch it here (an older GPU, a new Triton)
        raise RuntimeError(f"the Triton KL + CE kernel failed on this device ({err}); set "
                           "train.loss_kernel: torch to use the PyTorch path") from err
    return kl.sum(), ce.sum(), grad
