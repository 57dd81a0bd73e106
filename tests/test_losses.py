"""The losses against their definitions, computed independently in float64."""
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
