"""Helpers shared by the RWKV-6 and RWKV-7 operators: dtypes, chunking, fla import guard."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

# "auto": fla on CUDA for bf16/fp16 when importable, else the chunked PyTorch path;
# single-token steps always take the recurrent path (a chunk kernel would pad 1 token to 16+).
KERNELS = ("auto", "fla", "chunk", "recurrent")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype: float64 stays float64 (tests), everything else runs in
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLA_NOT_LOADED = object()
_fla: Any = _FLA_NOT_LOADED  # fla's entry points once loaded, None where it cannot be imported


@torch.compiler.disable
def _load_fla() -> dict[str, Callable[..., Any]] | None:
    # Imported lazily and guarded: fla needs triton and a GPU, and is an optional extra. Our
    # tuned kernel configs are set up first (fla_kernels.py), so a fresh node does not autotune.
    # Never traced (torch.compiler.disable): under train.compile on a GPU (2026-12-02,
    # bench_steps' compile arm) the RWKV-7 layers graph-broke at resolve_kernel and then ran the
    # chunked PyTorch path; Dynamo tracing this guard (triton patching, importlib, a try block)
    # is the suspect, so it is loaded before compiling and never traced.
    from shared.student.ops.fla_kernels import cached_autotune, prepare_fla

    try:
        prepare_fla()
        with cached_autotune():
            from fla.ops.rwkv6 import chunk_rwkv6
            from fla.ops.rwkv7 import chunk_rwkv7
    except Exception:  # noqa: BLE001 - any import failure simply means "no fla"
        return None
    return {"chunk_rwkv6": chunk_rwkv6, "chunk_rwkv7": chunk_rwkv7}


def _fla_ops() -> dict[str, Callable[..., Any]] | None:
    # A module global, not functools.lru_cache: Dynamo ignores lru_cache and traces the body,
    # while a global that is already set is read as a constant (no graph break once loaded).
    global _fla
    if _fla is _FLA_NOT_LOADED:
        _fla = _load_fla()
    return _fla


def fla_available() -> bool:
    """True when flash-linear-attention's RWKV chunk kernels can be imported."""
    return _fla_ops() is not None


def fla_op(name: str) -> Callable[..., Any]:
    ops = _fla_ops()
    if ops is None:
        raise RuntimeError(
            "kernel 'fla' needs flash-linear-attention (pip install "
            "'flash-linear-attention==0.6.0' 'fla-core==0.6.0') and a CUDA device; use "
            "kernel='chunk' for the pure-PyTorch path"
        )
    return ops[name]


def supported_kwargs(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """Keep only the keyword arguments ``fn`` accepts (fla's signatures grew between releases)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """The WKV path for ``kernel`` (student.kernel; ``recurrent`` too) and these inputs."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown RWKV kernel {kernel!r}; choose one of {KERNELS}")
    if kernel != "auto":
        return kernel
    if x.shape[1] == 1:
        return "recurrent"
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and fla_available():
        return "fla"
    if x.is_cuda:
        _warn_slow_cuda_path(x.dtype)
    return "chunk"


_warned_slow_path = False


@torch.compiler.disable
def _warn_slow_cuda_path(dtype: torch.dtype) -> None:
    global _warned_slow_path
    if not _warned_slow_path:
        _warned_slow_path = True
        why = ("flash-linear-attention is not importable" if not fla_available() else
               f"the inputs are {dtype}, not bfloat16/float16")
        log.warning("RWKV layers on CUDA run the chunked PyTorch WKV path, many times slower than "
                    "fla's kernels: %s", why)


def recompute_in_backward(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with autograd keeping only the inputs: backward runs ``fn`` again.

    Used for the chunked WKV paths, whose dozens of [B, H, N, L, K] and [B, H, N, K, K]
    intermediates were most of an RWKV layer's saved activations (docs/student.md, "CPU
    memory"); recomputing them costs one more forward of the WKV op, not of the layer.
    """
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in (*args, *kwargs.values())):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


class Segments(Protocol):
    """Packed documents as the WKV operators take them (``shared.student.packing.PackedSegments``):
    the offsets of the documents in the flattened ``B * T`` tokens, on the device and the host."""
    cu_seqlens: torch.Tensor
    cu_seqlens_cpu: torch.Tensor


def flatten_rows(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``[B, T, H, D]`` -> ``[1, B * T, H, D]`` (a view): packed rows as one varlen sequence."""
    return [x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]) for x in xs]


def per_document(fn: Callable[..., torch.Tensor], segments: Segments,
                 flat: list[torch.Tensor]) -> torch.Tensor:
    """``fn`` on each document of the ``[1, N, ...]`` inputs (from a zero state), outputs joined
    along the sequence: the varlen reference of the paths that have no varlen mode of their own.
    """
    bounds = segments.cu_seqlens_cpu.tolist()
    return torch.cat([fn(*(x[:, begin:end] for x in flat))
                      for begin, end in zip(bounds[:-1], bounds[1:], strict=True)], dim=1)


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, L, D], zero-padding T up to a multiple of L.

    Zero padding is harmless for both operators: a padded step has log-decay 0 (decay 1) and zero
    key/value/a/b, so it leaves the state untouched, and its outputs are sliced away.
    """
    b, t, h, d = x.shape
    pad = (-t) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(b, (t + pad) // chunk_size, chunk_size, h, d).permute(0, 3, 1, 2, 4)


def from_chunks(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, H, N, L, D] -> [B, T, H, D] (drops the padding added by ``to_chunks``)."""
    b, h, n, chunk, d = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(b, n * chunk, h, d)[:, :seq_len]


# Largest |log decay| a chunk may accumulate for RWKV-7's factorised pairwise decay,
# exp(g_t) * exp(-g_s): exp(60) ~ 1e26 and exp(-60) ~ 9e-27 are normal float32 numbers, so both
# factors and their products keep full relative precision. x070's bounded decay reaches at most
# 16 * exp(-0.5) = 9.7 over the default 16-step chunk (98 steps would be needed to reach 60).
MAX_CHUNK_LOG_DECAY = 60.0


def check_chunk_decay(g: torch.Tensor) -> None:
    """Raise ValueError when a chunk's accumulated log decay ``g`` ([..., L, K]) leaves
    [-MAX_CHUNK_LOG_DECAY, MAX_CHUNK_LOG_DECAY] (then a factorised exp would lose precision)."""
    if g.numel() == 0:
        return
    worst = float(g.detach().abs().amax())
    if worst > MAX_CHUNK_LOG_DECAY:
        raise ValueError(
            f"RWKV-7 chunked path: a chunk accumulates a log decay of {-worst:.1f}, beyond "
            f"-{MAX_CHUNK_LOG_DECAY:.0f}: pass per-step log decays in [RWKV7_LOG_DECAY_MIN, 0] "
            "(as the x070 layer does) or a smaller chunk_size")


def pairwise_decay(g_row: torch.Tensor, g_col: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """exp(g_row[t] - g_col[s]) per key channel for s < t (or s <= t), zero elsewhere.

    Shapes [..., L, K] -> [..., L, L, K]. Computing every pair explicitly (instead of factorising
    exp(g_t) * exp(-g_s)) keeps every exponent <= 0, so RWKV-6's unbounded decays cannot overflow.
    The exponent is masked *before* exp so masked pairs give exactly 0 and no inf/NaN gradients.
    """
    chunk = g_row.shape[-2]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=g_row.device)
    causal = torch.tril(causal, diagonal=0 if inclusive else -1)
    diff = g_row.unsqueeze(-2) - g_col.unsqueeze(-3)
    diff = diff.masked_fill(~causal.unsqueeze(-1), float("-inf"))
    return diff.exp()
