"""torch.compile for decoder layers: the student's (``train.compile``) and the teacher's
(``teacher.compile``).

Why: at the 135M shape an eager training step issued ~86k aten ops (benchmarks/bench_steps.py
on a CPU, op counts) and the GPU sat idle 80 % of the step while the host dispatched them
(issue 19); a compiled layer runs its elementwise chains (token shift, the six RWKV-7 lerps,
gates, norms, residuals) as a few fused kernels, forward and backward.

What: each decoder layer's ``forward`` is compiled on its own, not the model: the layers of one
kind share one compiled graph (their code is the same; weights are graph inputs), so a 30-layer
model compiles about three graphs (a kept layer, the first RWKV-7 layer, the others) instead of
one huge one, and whatever runs around the layers (the embeddings, the LM head, our Triton
loss, DeepSpeed's hooks, the teacher's hidden-state hooks) stays eager. Only ``forward`` is
replaced, so module hooks still run outside the compiled code. Shapes: static on first use,
dynamic after a shape changes (torch's default), so varying lengths do not recompile per shape.
"""
from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("off", "auto", "default", "max-autotune-no-cudagraphs")
"""off: eager. auto: default on a GPU, off on a CPU (the one-GPU recipes: their measured speed
on a GPU, no compile time in a CPU run). default: inductor's fused kernels.
max-autotune-no-cudagraphs: autotuned matmul and fused kernels. Not reduce-overhead (CUDA
graphs): the layers of one kind share one compiled graph, and its CUDA graph's output buffer is
overwritten by the next layer's call while the model still holds the one before (the
teacher's forward failed so on an H200, 2026-12-02: "accessing tensor output of CUDAGraphs
that has been overwritten by a subsequent run")."""


def resolve_compile_mode(mode: str, device: str | torch.device) -> str:
    """``mode`` with ``auto`` made ``default`` for a CUDA ``device``, ``off`` for any other."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return "default" if torch.device(device).type == "cuda" else "off"
    return mode


def compile_decoder_layers(layers: nn.ModuleList, mode: str = "default",
                           device: str | torch.device = "cpu") -> int:
    """Replace each layer's ``forward`` by a compiled one (``mode`` of :data:`COMPILE_MODES`;
    ``auto`` decided by ``device``, where the layers will run); returns how many layers were
    compiled (0 for ``off``)."""
    import torch._dynamo

    mode = resolve_compile_mode(mode, device)
    if mode == "off":
        return 0
    config = torch._dynamo.config
    # A layer kind recompiles when a guard fails (its first shape change, an is_first layer):
    # room for every layer to compile its own graph, so none falls back to eager silently.
    config.recompile_limit = max(config.recompile_limit, 2 * len(layers) + 8)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                             8 * len(layers) + 64)
    avoid_view_meta_replay()
    for layer in layers:
        layer.forward = torch.compile(layer.forward, mode=None if mode == "default" else mode)
    return len(layers)


def avoid_view_meta_replay() -> None:
    """Never read AOTAutograd's recorded view chains (ViewMeta) of a compiled region's outputs.

    The RWKV-7 mixer's compiled forward ends at a graph break (rwkv7_op: check_chunk_decay's
    ``.item()``), so that graph returns views of its intermediates (``r.view(B, T, H, N)``
    of a linear's output, itself an ``_unsafe_view`` of a matmul's). AOTAutograd records the
    chain of view ops behind each such output and, by default
    (``view_replay_for_aliased_outputs``), regenerates the output at run time by replaying it
    on the base. In torch 2.13 (seen on CPU) the recorded ``_unsafe_view`` refers to a size list
    that is freed after tracing, so every reader of that chain reads freed heap memory: the
    replay failed (``invalid shape dimension -1719195172907867620 at index 1 of shape
    [94321955173725, -1719195172907867620, 64]``: a freed allocator block's link pointer and
    key where ``[2, 16, 64]`` stood) or crashed the interpreter (SIGSEGV), pickling it into the
    AOTAutograd cache at the first backward (``_pickle_entry``) crashed it too, and a later
    cache hit replayed the garbage an earlier process had stored. Which one happened varied
    from run to run (tests/test_compiling.py). So both readers are switched off, process-wide:

    * ``view_replay_for_aliased_outputs = False``: outputs are regenerated from the traced
      view's own ``_view_func`` or ``as_strided`` of the base (the sizes, strides and offset
      of the output itself, which are sound): the path torch takes where the flag defaults to off
      (its fbcode builds);
    * ``enable_autograd_cache = False``: no AOTAutograd cache entries (they pickle that
      chain). Inductor's own FX graph cache stays on, so a later process still skips the
      C++/Triton kernel builds; only AOTAutograd's tracing (seconds) runs again.
    """
    import torch._functorch.config as functorch_config

    # Both exist in torch 2.13. A torch that renamed or removed one trains on without it, and
    # tests/test_compiling.py, which reads both, fails: the reason to look at this again.
    for flag in ("view_replay_for_aliased_outputs", "enable_autograd_cache"):
        if hasattr(functorch_config, flag):
            setattr(functorch_config, flag, False)

