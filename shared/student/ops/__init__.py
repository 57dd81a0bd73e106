"""WKV operators for the RWKV student: RWKV-6 (x060) and RWKV-7 (x070).

Each operator has three paths with identical conventions (those of flash-linear-attention):

* ``*_recurrent``: a plain token-by-token loop, the reference the other paths are tested against;
* ``*_chunked``: a chunked pure-PyTorch path (CPU, and CUDA when fla is missing);
* ``*_fla``: flash-linear-attention's Triton chunk kernel (CUDA only, optional dependency).

``rwkv6_op`` / ``rwkv7_op`` pick one of them from a kernel name (``student.kernel``).
"""
from shared.student.ops.common import KERNELS, fla_available, resolve_kernel
from shared.student.ops.rwkv6 import rwkv6_chunked, rwkv6_fla, rwkv6_op, rwkv6_recurrent
from shared.student.ops.rwkv7 import (
    RWKV7_LOG_DECAY_MIN,
    rwkv7_chunked,
    rwkv7_fla,
    rwkv7_op,
    rwkv7_recurrent,
)

__all__ = [
    "KERNELS",
    "RWKV7_LOG_DECAY_MIN",
    "fla_available",
    "resolve_kernel",
    "rwkv6_chunked",
    "rwkv6_fla",
    "rwkv6_op",
    "rwkv6_recurrent",
    "rwkv7_chunked",
    "rwkv7_fla",
    "rwkv7_op",
    "rwkv7_recurrent",
]
