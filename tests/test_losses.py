"""The losses against their definitions, computed independently in float64."""
import pytest
import torch

from shared.losses import align_loss, ce_loss, kl_full, kl_topk


def _data(seed=0, b=2, t=5, v=11):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    te = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, -2:] = -100
    return s, te, labels


def test_kl_full_is_a_per_token_mean_of_the_definition():
    s, te, labels = _data()
    temp = 2.0
    got = kl_full(s, te, labels, temp)
    p = torch.softmax(te / temp, -1)
    q = torch.softmax(s / temp, -1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    want = per_token[labels != -100].mean() * temp ** 2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # a length-independent mean: repeating the sequence leaves it unchanged
    got2 = kl_full(torch.cat([s, s], 1), torch.cat([te, te], 1), torch.cat([labels, labels], 1),
                   temp)
    torch.testing.assert_close(got2, got)


def test_kl_topk_with_full_k_equals_full_kl_and_is_zero_at_the_teacher():
    s, te, labels = _data(1)
    v = s.shape[-1]
    lp = torch.log_softmax(te, -1)
    vals, idx = lp.topk(v, -1)
    torch.testing.assert_close(kl_topk(s, vals, idx, labels), kl_full(s, te, labels), rtol=1e-4,
                               atol=1e-5)
    vals4, idx4 = lp.topk(4, -1)
    assert kl_topk(te, vals4, idx4, labels).abs() < 1e-5
    assert kl_topk(s, vals4, idx4, labels) > 0


def test_ce_ignores_masked_positions():
    s, _, labels = _data(2)
    got = ce_loss(s, labels)
    m = labels != -100
    want = -torch.log_softmax(s, -1)[m].gather(-1, labels[m][:, None]).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_align_loss_averages_real_tokens_and_layers():
    a = {1: torch.zeros(1, 3, 4), 2: torch.zeros(1, 3, 4)}
    b = {1: torch.ones(1, 3, 4), 2: torch.full((1, 3, 4), 3.0)}
    mask = torch.tensor([[1, 1, 0]])
    b[1][0, 2] = 100.0  # padding: must not count
    torch.testing.assert_close(align_loss(a, b, mask), torch.tensor(5.0))


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl_weight,ce_weight,temperature,with_teacher",
                         [(1.0, 0.0, 1.0, True), (0.1, 1.0, 2.0, True), (0.0, 1.0, 1.0, False)])
def test_fused_kd_ce_equals_the_naive_losses_and_their_gradients(
        monkeypatch, chunk_rows, dtype, kl_weight, ce_weight, temperature, with_teacher):
    """kd_ce_full (chunked, gradient made in the forward) == kl_full/ce_loss and autograd."""
    import shared.losses as L

    vocab = 37
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", chunk_rows * vocab)
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 5, vocab, generator=g) * 3).to(dtype)
    teacher = (torch.randn(2, 5, vocab, generator=g) * 3).to(dtype) if with_teacher else None
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, :2] = L.IGNORE
    labels[1, 4] = L.IGNORE

    ours_in = student.clone().requires_grad_(True)
    loss, kl, ce = L.kd_ce_full(ours_in, teacher, labels, temperature, kl_weight, ce_weight)
    (2.5 * loss).backward()
    ref_in = student.clone().requires_grad_(True)
    ref_ce = L.ce_loss(ref_in, labels)
    if with_teacher:
        ref_kl = L.kl_full(ref_in, teacher, labels, temperature)
        ref_loss = kl_weight * ref_kl + ce_weight * ref_ce
        torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-6)
    else:
        ref_loss = ref_ce
    (2.5 * ref_loss).backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-6)
    assert ours_in.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    assert not ours_in.grad[0, :2].any() and not ours_in.grad[1, 4].any()  # masked rows


def test_fused_kd_ce_without_grad_keeps_no_gradient_buffer():
    from shared.losses import kd_ce_full

    s = torch.randn(1, 3, 11, requires_grad=True)
    with torch.no_grad():
        loss, kl, ce = kd_ce_full(s, torch.randn(1, 3, 11), torch.tensor([[1, 2, 3]]))
    assert not loss.requires_grad and torch.isfinite(loss) and kl >= 0 and ce > 0


def test_fused_kd_ce_names_a_bad_kernel_and_a_vocabulary_mismatch():
    from shared.losses import kd_ce_full

    s, labels = torch.randn(1, 3, 11), torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="loss kernel 'cuda'.*auto, triton, torch"):
        kd_ce_full(s, s, labels, kernel="cuda")
    with pytest.raises(ValueError, match=r"teacher logits \(1, 3, 12\).*one vocabulary"):
        kd_ce_full(s, torch.randn(1, 3, 12), labels)
    with pytest.raises(RuntimeError, match="train.loss_kernel: torch"):  # CPU logits
        kd_ce_full(s, s, labels, kernel="triton")


def test_a_triton_failure_names_the_fallback(monkeypatch):
    """A GPU or Triton the kernel cannot build for gets an error that names the PyTorch path."""
    from shared import kd_ce_triton

    def launch(*args, **kwargs):
        raise ValueError("unsupported architecture")

    monkeypatch.setattr(kd_ce_triton, "_kernel", lambda: {(3,): launch})
    s, labels = torch.randn(3, 11), torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="unsupported architecture.*train.loss_kernel: torch"):
        kd_ce_triton.kd_ce_sums(s, s, labels, torch.tensor(3.0), 1.0, 1.0, 0.0, True)
