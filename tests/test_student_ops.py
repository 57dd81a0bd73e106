"""WKV operators: the chunked PyTorch paths equal the recurrent references (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.student.ops import (
    RWKV7_LOG_DECAY_MIN,
    fla_available,
    rwkv6_chunked,
    rwkv6_op,
    rwkv6_recurrent,
    rwkv7_chunked,
    rwkv7_op,
    rwkv7_recurrent,
)

B, H, K, V = 2, 3, 8, 6

pytestmark = pytest.mark.usefixtures("single_thread")


def rwkv6_inputs(t: int, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(B, t, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, t, H, V, generator=g, dtype=dtype)
    # wide range of decays, including very fast ones that overflow a naive exp(-cumsum)
    # factorisation
    w = -torch.exp(2.5 * torch.randn(B, t, H, K, generator=g, dtype=dtype))
    u = torch.randn(H, K, generator=g, dtype=dtype)
    return r, k, v, w, u


def rwkv7_inputs(t: int, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(B, t, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, t, H, V, generator=g, dtype=dtype)
    w = RWKV7_LOG_DECAY_MIN * torch.sigmoid(torch.randn(B, t, H, K, generator=g, dtype=dtype))
    kk = F.normalize(torch.randn(B, t, H, K, generator=g, dtype=dtype), dim=-1)
    gate = torch.sigmoid(torch.randn(B, t, H, K, generator=g, dtype=dtype))
    return r, w, k, v, -kk, kk * gate


def state(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("t", [1, 5, 16, 37])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("with_state", [False, True])
def test_rwkv6_chunked_equals_recurrent(t: int, chunk: int, with_state: bool) -> None:
    args = rwkv6_inputs(t)
    s0 = state() if with_state else None
    o_ref, s_ref = rwkv6_recurrent(*args, initial_state=s0)
    o, s = rwkv6_chunked(*args, initial_state=s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("t", [1, 5, 16, 37])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("with_state", [False, True])
def test_rwkv7_chunked_equals_recurrent(t: int, chunk: int, with_state: bool) -> None:
    args = rwkv7_inputs(t)
    s0 = state() if with_state else None
    o_ref, s_ref = rwkv7_recurrent(*args, initial_state=s0)
    o, s = rwkv7_chunked(*args, initial_state=s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


def wkv_gradients(fn, args: list[torch.Tensor], s0: torch.Tensor, **kwargs) -> list:
    """Gradients of the inputs and the initial state of ``fn`` under a non-trivial output
    gradient (a ramp over the outputs) plus the final state's squared norm."""
    o, s = fn(*args, initial_state=s0, **kwargs)
    weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    ((o * weights).sum() + (s * s).sum()).backward()
    return [x.grad for x in args] + [s0.grad]


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_chunked_gradients_equal_recurrent(mixer: str) -> None:
    make, ref, chunked = ((rwkv6_inputs, rwkv6_recurrent, rwkv6_chunked) if mixer == "rwkv6"
                          else (rwkv7_inputs, rwkv7_recurrent, rwkv7_chunked))
    grads = []
    for fn, kwargs in ((ref, {}), (chunked, {"chunk_size": 8})):
        args = [x.clone().requires_grad_(True) for x in make(21)]
        s0 = state().requires_grad_(True)
        grads.append(wkv_gradients(fn, args, s0, **kwargs))
    for g_ref, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-9)


def test_split_sequence_with_state_equals_whole() -> None:
    """Carrying the state across two calls equals one call (what generation with a cache relies
    on)."""
    args = rwkv7_inputs(30)
    o_all, s_all = rwkv7_chunked(*args)
    o1, s1 = rwkv7_chunked(*(x[:, :13] for x in args))
    o2, s2 = rwkv7_chunked(*(x[:, 13:] for x in args), initial_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, rtol=0, atol=1e-10)
    torch.testing.assert_close(s2, s_all, rtol=0, atol=1e-10)


def test_float32_and_bfloat16_inputs() -> None:
    """Low-precision inputs are accumulated in float32 and returned in the input dtype."""
    args64 = rwkv6_inputs(20)
    o_ref, _ = rwkv6_recurrent(*args64)
    o32, s32 = rwkv6_chunked(*(x.float() for x in args64))
    assert o32.dtype == torch.float32 and s32.dtype == torch.float32
    assert (o32.double() - o_ref).norm() / o_ref.norm() < 1e-5
    obf, _ = rwkv6_op(*(x.bfloat16() for x in args64), kernel="auto")
    assert obf.dtype == torch.bfloat16
    assert (obf.double() - o_ref).norm() / o_ref.norm() < 3e-2


def test_dispatch() -> None:
    args = rwkv7_inputs(9)
    o_ref, _ = rwkv7_recurrent(*args)
    for kernel in ("auto", "chunk", "recurrent"):
        o, _ = rwkv7_op(*args, kernel=kernel)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="unknown RWKV kernel"):
        rwkv7_op(*args, kernel="cuda-magic")
    if not fla_available():
        with pytest.raises(RuntimeError, match="flash-linear-attention"):
            rwkv7_op(*args, kernel="fla")


def test_the_kernel_choice_compiles_without_a_graph_break() -> None:
    """resolve_kernel, and the fla import guard it reads, trace in one graph (``fullgraph=True``
    fails on any graph break): a compiled RWKV layer reads the choice as a constant and does not
    run the import guard inside its trace (train.compile on a GPU took the chunked path after a
    graph break there, 2026-12-02). The guard is a module global since, not an lru_cache that
    Dynamo would trace through."""
    import torch._dynamo

    from shared.student.ops.common import resolve_kernel

    eager = fla_available()
    x = torch.randn(2, 5, 3)

    def by_path(t: torch.Tensor) -> torch.Tensor:
        return t * 2 if resolve_kernel("auto", t) == "fla" else t + 1

    torch._dynamo.reset()
    compiled = torch.compile(by_path, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), by_path(x))
    assert fla_available() is eager
