"""One process of test_fla_config_cache's end-to-end case: prepare fla's config dirs, build a real
Triton autotuner while fla's cache module is in place, run it once, print what happened (JSON)."""
from __future__ import annotations

import json
import os
import time

from shared.student.ops import fla_kernels

config_dir = fla_kernels.prepare_fla(gpu="test_gpu")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

device = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"


def wall_clock_bench(kernel_call, quantiles):
    """Triton's own benchmarker needs a GPU driver; the interpreter has none."""
    start = time.perf_counter()
    kernel_call()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    return [ms, ms, ms]


with fla_kernels.cached_autotune():
    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})],
                     key=["N"], do_bench=wall_clock_bench)
    @triton.jit
    def add_one_kernel(x_ptr, N, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

x = torch.zeros(100, device=device)
add_one_kernel[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)
print(json.dumps({"config_dir": config_dir, "tuned": fla_kernels.tuned_in_this_process(),
                  "block": add_one_kernel.best_config.kwargs["BLOCK"]}))
