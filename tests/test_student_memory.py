"""Memory of the chunked WKV paths: what autograd keeps is bounded by the sequence's own size,
and the parts that make it so (RWKV-6's recomputed intra-chunk scores, RWKV-7's factorised
decays, the op recomputed in backward) give the recurrent reference's gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.student.ops import (
    RWKV7_LOG_DECAY_MIN,
    rwkv6_op,
    rwkv6_recurrent,
    rwkv7_chunked,
    rwkv7_op,
    rwkv7_recurrent,
)
from shared.student.ops.rwkv6 import IntraChunkScores
from shared.tensor_memory import TensorMemory
from test_student_ops import wkv_gradients

pytestmark = pytest.mark.usefixtures("single_thread")


def rwkv6_inputs(b: int, t: int, h: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r, key, v = (torch.randn(b, t, h, k, generator=g, dtype=dtype) for _ in range(3))
    w = -torch.exp(2.0 * torch.randn(b, t, h, k, generator=g, dtype=dtype))  # unbounded decays
    return [r, key, v, w, torch.randn(h, k, generator=g, dtype=dtype)]


def rwkv7_inputs(b: int, t: int, h: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r, key, v = (torch.randn(b, t, h, k, generator=g, dtype=dtype) for _ in range(3))
    w = RWKV7_LOG_DECAY_MIN * torch.sigmoid(torch.randn(b, t, h, k, generator=g, dtype=dtype))
    kk = F.normalize(torch.randn(b, t, h, k, generator=g, dtype=dtype), dim=-1)
    return [r, w, key, v, -kk, kk * torch.rand(b, t, h, k, generator=g, dtype=dtype)]


def test_intra_chunk_scores_gradcheck() -> None:
    """The custom Function's backward (blocks of chunks, decays rebuilt) against finite
    differences; 11 chunks of 3 so that the last block of CHUNKS_PER_BLOCK is a partial one."""
    g = torch.Generator().manual_seed(3)
    r, k = (torch.randn(1, 2, 11, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    w = -torch.exp(torch.randn(1, 2, 11, 3, 4, generator=g, dtype=torch.float64))
    cum = w.cumsum(-2)
    args = [x.requires_grad_(True) for x in (r, k, cum - w, cum.clone())]
    assert torch.autograd.gradcheck(IntraChunkScores.apply, args)


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_chunk_kernel_gradients_equal_recurrent(mixer: str) -> None:
    """Through rwkv*_op(kernel='chunk'): the path the layers take, recomputed in backward."""
    make, op, ref = ((rwkv6_inputs, rwkv6_op, rwkv6_recurrent) if mixer == "rwkv6"
                     else (rwkv7_inputs, rwkv7_op, rwkv7_recurrent))
    grads = []
    for fn, kwargs in ((ref, {}), (op, {"kernel": "chunk", "chunk_size": 4})):
        args = [x.requires_grad_(True) for x in make(2, 23, 3, 5, torch.float64)]
        s0 = torch.randn(2, 3, 5, 5, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        grads.append(wkv_gradients(fn, args, s0, **kwargs))
    for g_ref, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-9)


# Peak tensor bytes of one op's forward + backward, in units of one [B, T, H, K] float32 tensor.
# The bound is per token (any T): c_tokens for the [B, H, N, L, K] intermediates and the inputs'
# gradients, c_state * K / L for the per-chunk [K, K] (RWKV-7) / [K, V] states. Measured at
# B=1, T=512, H=2, K=64: RWKV-6 30.5 and RWKV-7 54.4 units; the paths before (pairwise
# [B, H, N, L, L, K] decays saved for backward) 71 and 170 (docs/student.md, "CPU memory").
BOUNDS = {"rwkv6": (24, 4), "rwkv7": (32, 8)}


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_chunked_op_memory_is_bounded_per_token(mixer: str) -> None:
    b, t, h, k, chunk = 1, 512, 2, 64, 16
    make, op = (rwkv6_inputs, rwkv6_op) if mixer == "rwkv6" else (rwkv7_inputs, rwkv7_op)
    args = [x.requires_grad_(True) for x in make(b, t, h, k, torch.float32)]
    with TensorMemory() as mem:
        o, s = op(*args, kernel="chunk", chunk_size=chunk)
        (o.sum() + s.sum()).backward()
    unit = b * t * h * k * 4
    c_tokens, c_state = BOUNDS[mixer]
    bound = (c_tokens + c_state * k / chunk) * unit
    assert mem.peak <= bound, f"{mixer}: {mem.peak / unit:.1f} units > {bound / unit:.0f}"


def test_rwkv7_chunked_refuses_decays_a_factorised_exp_cannot_hold() -> None:
    args = rwkv7_inputs(1, 32, 1, 4, torch.float32)
    args[1] = torch.full_like(args[1], -5.0)  # 16 steps: -80, beyond x070's bound per step
    with pytest.raises(ValueError, match="smaller chunk_size"):
        rwkv7_chunked(*args, chunk_size=16)
    rwkv7_chunked(*args, chunk_size=8)  # -40 per chunk: fine


def test_tensor_memory_counts_saved_activations() -> None:
    """The counter itself: a saved [1000, 1000] activation is counted while alive, views and
    pre-existing tensors are not, and freed tensors leave it."""
    x = torch.randn(1000, 1000, requires_grad=True)
    with TensorMemory() as mem:
        y = x.exp()          # saved for backward (4 MB)
        z = y.view(-1)       # a view: nothing new
        assert mem.current == 4_000_000
        z.sum().backward()   # frees the graph; x.grad (4 MB) stays
        del y, z
    assert mem.current == 4_000_000 and mem.peak >= 8_000_000
