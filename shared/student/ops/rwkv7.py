"""RWKV-7 ("Goose", RWKV-LM x070) WKV operator: a diagonal-plus-low-rank delta rule.

Conventions (those of flash-linear-attention's ``chunk_rwkv7``):

* ``r, w, k, a, b``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; state ``S``: ``[B, H, K, V]``;
* ``w`` is the **log** decay. In x070, ``w = -exp(-0.5) * sigmoid(w0 + lora)``, so it lies in
  ``[RWKV7_LOG_DECAY_MIN, 0)``;
* the layer passes ``a = -kk`` and ``b = kk * a_gate`` (``kk``: the L2-normalised "removal" key).

Recurrence (RWKV-LM writes the transposed state ``S^T``; this is the same thing)::

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = S_t^T r_t            # note: read *after* the update, unlike RWKV-6
"""
from __future__ import annotations

import math

import torch

from shared.student.ops.common import (
    Segments,
    check_chunk_decay,
    compute_dtype,
    fla_op,
    flatten_rows,
    from_chunks,
    per_document,
    recompute_in_backward,
    resolve_kernel,
    supported_kwargs,
    to_chunks,
)

State = torch.Tensor | None

# lower bound of x070's log decay: -exp(-0.5) (the soft clamp w = -softplus(-x) - 0.5, then
# exp(-exp(w)))
RWKV7_LOG_DECAY_MIN = -math.exp(-0.5)


def rwkv7_recurrent(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    a: torch.Tensor, b: torch.Tensor, initial_state: State = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference. Returns ``(o [B,T,H,V] in r's dtype, final state)``."""
    bsz, t, h, dk = r.shape
    cd = compute_dtype(r.dtype)
    r_, w_, k_, v_, a_, b_ = (x.to(cd) for x in (r, w, k, v, a, b))
    state = r_.new_zeros(bsz, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(cd)
    outs = []
    for i in range(t):
        removed = torch.einsum("bhk,bhkv->bhv", a_[:, i], state)
        state = (w_[:, i].exp()[..., None] * state + b_[:, i, :, :, None] * removed[:, :, None, :]
                 + k_[:, i, :, :, None] * v_[:, i, :, None, :])
        outs.append(torch.einsum("bhk,bhkv->bhv", r_[:, i], state))
    return torch.stack(outs, dim=1).to(r.dtype), state


def rwkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor, initial_state: State = None,
                  chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked pure-PyTorch path (WY-style, as in fla's DPLR kernels), exact up to rounding.

    Within a chunk let ``q_s = a_s^T S_{s-1}`` (one row per step). Unrolling the recurrence gives
    a unit-lower-triangular system ``(I - A_ab) Q = (a * exp(g_excl)) S_0 + A_ak V`` that a
    triangular solve handles for all chunks at once; each chunk then maps its start state to its
    end state by an affine map ``S_end = T S_0 + C``, so only a short scan over chunks is
    sequential.
    """
    bsz, t, h, dk = r.shape
    cd = compute_dtype(r.dtype)
    r_, w_, k_, v_, a_, b_ = (to_chunks(x.to(cd), chunk_size) for x in (r, w, k, v, a, b))
    g = w_.cumsum(-2)        # log decay through step t (inclusive) within the chunk
    g_excl = g - w_          # ... through step t-1
    check_chunk_decay(g)

    # Pairwise terms X_sj = sum_i x_si y_ji exp(g?_si - g_ji), factorised as
    # (x exp(g?)) @ (y exp(-g))^T: plain matmuls, no [L, L, K] tensor (see check_chunk_decay for
    # why the exponents cannot overflow). Pairs above the diagonal are finite and masked off.
    a_in = a_ * g_excl.exp()                 # reads S_{s-1}: decayed through step s-1
    r_in = r_ * g.exp()                      # reads S_t: decayed through step t
    b_out, k_out = b_ * (-g).exp(), k_ * (-g).exp()
    strict = torch.tril(torch.ones(chunk_size, chunk_size, dtype=cd, device=r.device), -1)
    incl = torch.tril(torch.ones(chunk_size, chunk_size, dtype=cd, device=r.device))
    a_b = (a_in @ b_out.transpose(-1, -2)) * strict   # j < s
    a_k = (a_in @ k_out.transpose(-1, -2)) * strict
    r_b = (r_in @ b_out.transpose(-1, -2)) * incl     # j <= t
    r_k = (r_in @ k_out.transpose(-1, -2)) * incl

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        # unitriangular=True ignores the diagonal, so -a_b (strictly lower) stands for I - a_b
        return torch.linalg.solve_triangular(-a_b, rhs, upper=False, unitriangular=True)

    q_from_state = solve(a_in)                  # [.., L, K]: Q = q_from_state @ S_0 + q_local
    q_local = solve(a_k @ v_)                   # [.., L, V]

    # chunk end state: S_end = diag(exp(g_last)) S_0 + sum_j decay_j * (b_j q_j + k_j v_j^T)
    to_end = (g[..., -1:, :] - g).exp()
    b_end = (b_ * to_end).transpose(-1, -2)     # [.., K, L]
    k_end = (k_ * to_end).transpose(-1, -2)
    transition = torch.diag_embed(g[..., -1, :].exp()) + b_end @ q_from_state   # [.., K, K]
    offset = b_end @ q_local + k_end @ v_                                        # [.., K, V]

    state = r_.new_zeros(bsz, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(cd)
    starts = []
    for n in range(r_.shape[2]):
        starts.append(state)
        state = transition[:, :, n] @ state + offset[:, :, n]
    start = torch.stack(starts, dim=2)                                           # [B,H,N,K,V]

    q = q_from_state @ start + q_local
    out = r_in @ start + r_b @ q + r_k @ v_
    return from_chunks(out, t).to(r.dtype), state


# Never traced (torch.compiler.disable): under train.compile the layer's elementwise work is
# compiled around this call, which runs eagerly. fla's Python (its autotuner, which ours
# replaces, input guards, cached chunk indices, inspect.signature) is not Dynamo's to trace.
@torch.compiler.disable
def rwkv7_fla(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, initial_state: State = None,
              segments: Segments | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash-linear-attention's Triton chunk kernel (CUDA), called as fla's RWKV7Attention does:
    scale 1 and, where the installed fla supports it, the x070 decay bound for the fast path.
    ``segments``: ``[1, N]`` inputs cut into documents by fla's varlen mode (no final state)."""
    chunk_rwkv7 = fla_op("chunk_rwkv7")
    dt = r.dtype
    state = None if initial_state is None else initial_state.float().contiguous()
    kwargs = supported_kwargs(chunk_rwkv7, scale=1.0, initial_state=state,
                              output_final_state=segments is None, safe_gate=True,
                              lower_bound=RWKV7_LOG_DECAY_MIN, chunk_size=64)
    if segments is not None:  # passed as such: an fla without varlen must fail, not ignore it
        kwargs.update(cu_seqlens=segments.cu_seqlens, cu_seqlens_cpu=segments.cu_seqlens_cpu)
    o, final = chunk_rwkv7(r.contiguous(), w.to(dt).contiguous(), k.to(dt).contiguous(),
                           v.to(dt).contiguous(), a.to(dt).contiguous(), b.to(dt).contiguous(),
                           **kwargs)
    return o, final


def rwkv7_op(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, initial_state: State = None, kernel: str = "auto",
             chunk_size: int = 16, segments: Segments | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to one of the paths above. ``kernel`` is one of ``KERNELS``. With ``segments``
    (packed documents, ``shared.student.packing.PackedSegments``) every document of the
    ``[B, T]`` rows starts from a zero state and no final state is returned."""
    path = resolve_kernel(kernel, r)
    if path == "fla":
        # fla's kernels take one dtype (r's, bf16 under autocast); w, k, v, a, b arrive float32
        # by type promotion with the float32 weights. Cast here, in the layer's compiled graph
        # under train.compile, not inside rwkv7_fla (never compiled), where they were eager
        # copies and their autograd nodes: on an H200 the hybrid's kd step at 32 x 1024 ran
        # 1.19x (copies -6.3 ms, inductor's kernels +4.2 ms, host work less; BENCHMARKS.md,
        # 2026-12-04).
        w, k, v, a, b = (x.to(r.dtype) for x in (w, k, v, a, b))
    if segments is not None:
        def one_document(*xs: torch.Tensor) -> torch.Tensor:
            return rwkv7_op(*xs, None, path, chunk_size)[0]
        flat = flatten_rows(r, w, k, v, a, b)
        if path == "fla":
            o = rwkv7_fla(*flat, segments=segments)[0]
        else:
            o = per_document(one_document, segments, flat)
        return o.view(*r.shape[:3], v.shape[-1]), None
    if path == "fla":
        return rwkv7_fla(r, w, k, v, a, b, initial_state)
    if path == "recurrent":
        return rwkv7_recurrent(r, w, k, v, a, b, initial_state)
    return recompute_in_backward(rwkv7_chunked, r, w, k, v, a, b, initial_state,
                                 chunk_size=chunk_size)
