"""CUDA checks of the fused KL + CE (device machine): the Triton kernel (shared/kd_ce_triton.py)
against its reference, the chunked PyTorch path, and the naive kl_full / ce_loss; values and
gradients, bf16 and float32 logits, Llama-3's vocabulary and ones that are not a multiple of
the kernel's block. Skips only without CUDA; a CUDA machine without Triton fails.
"""
from __future__ import annotations

import pytest
import torch

import shared.losses as L

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def make(rows: int, vocab: int, dtype: torch.dtype, with_teacher: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    student = (torch.randn(2, rows // 2, vocab, generator=g, device="cuda") * 3).to(dtype)
    teacher = ((torch.randn(2, rows // 2, vocab, generator=g, device="cuda") * 3).to(dtype)
               if with_teacher else None)
    labels = torch.randint(0, vocab, (2, rows // 2), generator=g, device="cuda")
    labels[0, :3] = L.IGNORE
    labels[1, -1] = L.IGNORE
    return student, teacher, labels


def loss_and_grad(kernel: str, student, teacher, labels, *weights):
    x = student.clone().requires_grad_(True)
    loss, kl, ce = L.kd_ce_full(x, teacher, labels, *weights, kernel=kernel)
    (0.5 * loss).backward()  # a scaled loss, as gradient accumulation makes
    return loss.detach(), kl, ce, x.grad


@pytest.mark.parametrize("vocab", [1000, 4096, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature,kl_weight,ce_weight,with_teacher",
                         [(1.0, 1.0, 0.0, True), (2.0, 0.1, 1.0, True), (1.0, 0.0, 1.0, False)])
def test_triton_kd_ce_equals_its_reference(vocab, dtype, temperature, kl_weight, ce_weight,
                                           with_teacher):
    from shared import kd_ce_triton

    assert kd_ce_triton.available(), "Triton must import on a CUDA machine"
    rows = 64 if vocab == 128256 else 200
    student, teacher, labels = make(rows, vocab, dtype, with_teacher)
    weights = (temperature, kl_weight, ce_weight)
    got = loss_and_grad("triton", student, teacher, labels, *weights)
    ref = loss_and_grad("torch", student, teacher, labels, *weights)
    for a, b in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    assert got[3].dtype == dtype
    # the reference rounds its float32 gradient to bf16 once, as the kernel does
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3], **tol)
    assert not got[3][0, :3].any() and not got[3][1, -1].any()  # masked rows
    # and the naive definitions (float32 logits: no rounding between the two)
    if dtype == torch.float32:
        naive_ce = L.ce_loss(student, labels)
        torch.testing.assert_close(got[2], naive_ce, rtol=1e-5, atol=1e-5)
        if with_teacher:
            torch.testing.assert_close(got[1], L.kl_full(student, teacher, labels, temperature),
                                       rtol=1e-4, atol=1e-5)


def test_triton_kd_ce_without_grad_and_with_every_row_masked():
    student, teacher, labels = make(8, 5000, torch.bfloat16, True)
    with torch.no_grad():
        loss, kl, ce = L.kd_ce_full(student, teacher, labels, kernel="triton")
        ref = L.kd_ce_full(student, teacher, labels, kernel="torch")
    torch.testing.assert_close(loss, ref[0], rtol=2e-5, atol=2e-5)
    labels[:] = L.IGNORE
    x = student.clone().requires_grad_(True)
    loss, kl, ce = L.kd_ce_full(x, teacher, labels, kernel="triton")
    loss.backward()
    assert float(loss) == 0.0 and not x.grad.any()


def test_triton_kd_ce_reads_strided_rows():
    """Logits sliced out of a wider tensor (a padded vocabulary) keep their row stride."""
    wide, teacher_wide, labels = make(16, 3000, torch.bfloat16, True)
    labels = labels.clamp(max=2499)
    x_wide = wide.clone().requires_grad_(True)
    student = x_wide[..., :2500]
    assert student.stride(1) == 3000
    loss, _, _ = L.kd_ce_full(student, teacher_wide[..., :2500], labels, 1.0, 1.0, 0.5,
                              kernel="triton")
    loss.backward()
    ref = loss_and_grad("torch", wide[..., :2500].contiguous(),
                        teacher_wide[..., :2500].contiguous(), labels, 1.0, 1.0, 0.5)
    torch.testing.assert_close(loss.detach(), ref[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(0.5 * x_wide.grad[..., :2500], ref[3], rtol=1e-2, atol=1e-6)
    assert not x_wide.grad[..., 2500:].any()
