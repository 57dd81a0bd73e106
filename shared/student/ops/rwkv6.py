"""RWKV-6 ("Finch", RWKV-LM x060) WKV operator.

Conventions (those of flash-linear-attention's ``chunk_rwkv6``):

* ``r, k, w``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; ``u`` (RWKV-LM ``time_faaaa``):
  ``[H, K]``;
* ``w`` is the **log** decay, ``w = -exp(time_decay + lora) <= 0``; the per-step decay is
  ``exp(w)``;
* state ``S``: ``[B, H, K, V]`` (key channel -> value channel), kept in float32 (float64 for tests).

Recurrence (scale 1, as in RWKV-LM)::

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T
"""
from __future__ import annotations

import torch

from shared.student.ops.common import (
    Segments,
    compute_dtype,
    fla_op,
    flatten_rows,
    from_chunks,
    pairwise_decay,
    per_document,
    recompute_in_backward,
    resolve_kernel,
    supported_kwargs,
    to_chunks,
)

State = torch.Tensor | None

# Chunks whose [L, L, K] pairwise decays are built at once: bounds that transient to
# B * H * CHUNKS_PER_BLOCK * L * L * K numbers, whatever the sequence length.
CHUNKS_PER_BLOCK = 8


def _block_scores(r: torch.Tensor, k: torch.Tensor, g_excl: torch.Tensor, g: torch.Tensor,
                  ) -> torch.Tensor:
    """scores[t, s] = sum_i r_ti k_si exp(g_excl_ti - g_si) for s < t, for one block of chunks."""
    decay = pairwise_decay(g_excl, g, inclusive=False)                 # [B,H,n,L,L,K]
    return torch.einsum("bhntsk,bhntk,bhnsk->bhnts", decay, r, k)


class IntraChunkScores(torch.autograd.Function):
    """RWKV-6's causal intra-chunk scores without keeping the pairwise decays for backward.

    The pairwise form (``pairwise_decay``) is what keeps RWKV-6's unbounded decays finite, but its
    [B, H, N, L, L, K] tensors, saved by autograd, were most of a layer's activation memory. Here
    forward and backward rebuild them block by block (``CHUNKS_PER_BLOCK`` chunks at a time) and
    only r, k, g_excl and g ([B, H, N, L, K]) are saved.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, k: torch.Tensor, g_excl: torch.Tensor,
                g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(r, k, g_excl, g)
        blocks = range(0, r.shape[2], CHUNKS_PER_BLOCK)
        return torch.cat([_block_scores(*(x[:, :, n:n + CHUNKS_PER_BLOCK]
                                          for x in (r, k, g_excl, g))) for n in blocks], dim=2)

    @staticmethod
    def backward(ctx, d_scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r, k, g_excl, g = ctx.saved_tensors
        grads: list[list[torch.Tensor]] = [[], [], [], []]
        for n in range(0, r.shape[2], CHUNKS_PER_BLOCK):
            rb, kb, ge, gb = (x[:, :, n:n + CHUNKS_PER_BLOCK] for x in (r, k, g_excl, g))
            # p[t, s, i] = d_scores[t, s] * exp(g_excl_ti - g_si) (0 where s >= t)
            p = pairwise_decay(ge, gb, inclusive=False) * d_scores[:, :, n:n + CHUNKS_PER_BLOCK,
                                                                   ..., None]
            dr = torch.einsum("bhntsk,bhnsk->bhntk", p, kb)
            dk = torch.einsum("bhntsk,bhntk->bhnsk", p, rb)
            # d/d(g_excl_ti) of each term is the term itself, d/d(g_si) its negative
            dg_excl = dr * rb
            dg = -dk * kb
            for acc, x in zip(grads, (dr, dk, dg_excl, dg), strict=True):
                acc.append(x)
        return tuple(torch.cat(x, dim=2) for x in grads)


def rwkv6_recurrent(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                    u: torch.Tensor, initial_state: State = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference. Returns ``(o [B,T,H,V] in r's dtype, final state)``."""
    b, t, h, dk = r.shape
    cd = compute_dtype(r.dtype)
    r_, k_, v_, w_, u_ = (x.to(cd) for x in (r, k, v, w, u))
    state = r_.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(cd)
    outs = []
    for i in range(t):
        kv = k_[:, i, :, :, None] * v_[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", r_[:, i], state + u_[None, :, :, None] * kv))
        state = w_[:, i].exp()[..., None] * state + kv
    return torch.stack(outs, dim=1).to(r.dtype), state


def rwkv6_chunked(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                  u: torch.Tensor, initial_state: State = None,
                  chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked pure-PyTorch path: exact (up to rounding) equal of ``rwkv6_recurrent``.

    Inside a chunk the causal scores are computed pairwise (see ``pairwise_decay``); across chunks
    the state is carried by a short scan whose per-chunk terms are all computed in parallel.
    """
    b, t, h, dk = r.shape
    cd = compute_dtype(r.dtype)
    r_, k_, v_, w_ = (to_chunks(x.to(cd), chunk_size) for x in (r, k, v, w))  # [B,H,N,L,*]
    u_ = u.to(cd)[None, :, None, None, :]
    g = w_.cumsum(-2)          # log decay accumulated up to and including step t (within the chunk)
    g_excl = g - w_            # ... up to step t-1: what the state read at step t has seen

    # intra-chunk:
    #   o_t += sum_{s<t} (sum_i r_ti k_si exp(g_excl_ti - g_si)) v_s  +  (r_t . u k_t) v_t
    scores = IntraChunkScores.apply(r_, k_, g_excl, g)                    # [B,H,N,L,L]
    out = scores @ v_ + (r_ * u_ * k_).sum(-1, keepdim=True) * v_

    # chunk transitions: S_end = diag(exp(g_last)) S_start + sum_s diag(exp(g_last - g_s)) k_s v_s^T
    g_last = g[..., -1:, :]
    local = torch.einsum("bhnsk,bhnsv->bhnkv", k_ * (g_last - g).exp(), v_)
    carry = g_last.squeeze(-2).exp().unsqueeze(-1)                         # [B,H,N,K,1]
    state = r_.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(cd)
    starts = []
    for n in range(r_.shape[2]):
        starts.append(state)
        state = carry[:, :, n] * state + local[:, :, n]
    start = torch.stack(starts, dim=2)                                     # [B,H,N,K,V]

    out = out + (r_ * g_excl.exp()) @ start
    return from_chunks(out, t).to(r.dtype), state


# Never traced (torch.compiler.disable): under train.compile the layer's elementwise work is
# compiled around this call, which runs eagerly. fla's Python (its autotuner, which ours
# replaces, input guards, cached chunk indices, inspect.signature) is not Dynamo's to trace.
@torch.compiler.disable
def rwkv6_fla(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
              initial_state: State = None,
              segments: Segments | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash-linear-attention's Triton chunk kernel (CUDA). All inputs are cast to r's dtype,
    as fla's own RWKV6 layer does; the state stays float32. ``segments``: ``[1, N]`` inputs cut
    into documents by fla's varlen mode (no final state)."""
    chunk_rwkv6 = fla_op("chunk_rwkv6")
    dt = r.dtype
    state = None if initial_state is None else initial_state.float().contiguous()
    kwargs = supported_kwargs(chunk_rwkv6, scale=1.0, initial_state=state,
                              output_final_state=segments is None)
    if segments is not None:  # passed as such: an fla without varlen must fail, not ignore it
        kwargs.update(cu_seqlens=segments.cu_seqlens, cu_seqlens_cpu=segments.cu_seqlens_cpu)
    o, final = chunk_rwkv6(r.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(),
                           w.to(dt).contiguous(), u.to(dt), **kwargs)
    return o, final


def rwkv6_op(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
             initial_state: State = None, kernel: str = "auto",
             chunk_size: int = 16, segments: Segments | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to one of the paths above. ``kernel`` is one of ``KERNELS``. With ``segments``
    (packed documents, ``shared.student.packing.PackedSegments``) every document of the
    ``[B, T]`` rows starts from a zero state and no final state is returned."""
    path = resolve_kernel(kernel, r)
    if path == "fla":  # cast in the layer's compiled graph, not eagerly (rwkv7_op says why)
        k, v, w, u = (x.to(r.dtype) for x in (k, v, w, u))
    if segments is not None:
        def one_document(r_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor,
                         w_: torch.Tensor) -> torch.Tensor:
            return rwkv6_op(r_, k_, v_, w_, u, None, path, chunk_size)[0]
        flat = flatten_rows(r, k, v, w)
        if path == "fla":
            o = rwkv6_fla(*flat, u, segments=segments)[0]
        else:
            o = per_document(one_document, segments, flat)
        return o.view(*r.shape[:3], v.shape[-1]), None
    if path == "fla":
        return rwkv6_fla(r, k, v, w, u, initial_state)
    if path == "recurrent":
        return rwkv6_recurrent(r, k, v, w, u, initial_state)
    return recompute_in_backward(rwkv6_chunked, r, k, v, w, u, initial_state, chunk_size=chunk_size)
