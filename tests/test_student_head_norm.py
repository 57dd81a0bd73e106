"""head_norm (the time-mix's per-head GroupNorm computed as layer_norm) equals nn.GroupNorm."""
import torch
from torch import nn

from shared.student.layers import head_norm


def test_head_norm_equals_group_norm_values_and_gradients() -> None:
    torch.manual_seed(0)
    bsz, t, heads, k = 2, 5, 3, 8
    norm = nn.GroupNorm(heads, heads * k, eps=64e-5).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    o = torch.randn(bsz, t, heads, k, dtype=torch.float64, requires_grad=True)
    reference = norm(o.reshape(bsz * t, heads * k)).view(bsz, t, heads * k)
    ours = head_norm(o, norm)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    upstream = torch.randn_like(reference)
    leaves = [o, norm.weight, norm.bias]
    for a, b in zip(torch.autograd.grad(ours, leaves, upstream),
                    torch.autograd.grad(reference, leaves, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
