"""Live tensor bytes of a piece of PyTorch code, counted op by op (CPU memory questions).

``TensorMemory`` is a ``TorchDispatchMode``: every aten op's outputs that own new storage are
counted until the storage is freed (a weak reference's callback), so ``peak`` is the largest sum
of tensor bytes alive at once *among the tensors created inside the block*: saved activations,
temporaries, gradients, optimizer state made there. Tensors that existed before (weights, inputs)
are not counted. Unlike the process's resident set it is deterministic (no allocator caching or
fragmentation, no other thread's work), which is what a memory test needs; it does not see
scratch buffers a kernel allocates and frees internally.

    with TensorMemory() as mem:
        loss = model(x).sum(); loss.backward()
    mem.peak                   # bytes
    mem.breakdown_at_peak()    # needs snapshot_at=<an op index of a previous identical run>
"""
from __future__ import annotations

import collections
import re
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# one live storage: (bytes, op that made it, shape of the tensor, tag at the time)
Allocation = tuple[int, str, tuple[int, ...], str]


class TensorMemory(TorchDispatchMode):
    """Count live tensor bytes per op; ``tag`` (settable) labels what is running (a module)."""

    def __init__(self, snapshot_at: int | None = None) -> None:
        super().__init__()
        self.live: dict[int, Allocation] = {}
        self.current = 0
        self.peak = 0
        self.peak_at = 0          # op index (1-based) at which the peak was reached
        self.ops = 0
        self.tag = ""
        self.snapshot_at = snapshot_at
        self.snapshot: dict[int, Allocation] | None = None

    def _free(self, key: int) -> None:
        info = self.live.pop(key, None)
        if info is not None:
            self.current -= info[0]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0]
                  if isinstance(x, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            # views and in-place results share an input's storage: nothing new
            if key in self.live or key in inputs or storage.nbytes() == 0:
                continue
            self.live[key] = (storage.nbytes(), func.overloadpacket.__name__, tuple(t.shape),
                              self.tag)
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.ops += 1
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, self.ops
        if self.ops == self.snapshot_at:
            self.snapshot = dict(self.live)
        return out

    def breakdown_at_peak(self, top: int = 12) -> list[tuple[str, str, tuple[int, ...], int]]:
        """The snapshot's largest groups: (tag with layer indices as ``*``, op, shape, bytes)."""
        if self.snapshot is None:
            raise RuntimeError("no snapshot: run once, then again with snapshot_at=first.peak_at")
        groups: collections.Counter = collections.Counter()
        for nbytes, op, shape, tag in self.snapshot.values():
            groups[(re.sub(r"\.\d+\.", ".*.", tag), op, shape)] += nbytes
        return [(tag, op, shape, n) for (tag, op, shape), n in groups.most_common(top)]


def tag_modules(model: torch.nn.Module, mem: TensorMemory) -> list[Any]:
    """Set ``mem.tag`` to the running module's qualified name (forward hooks); returns the
    hook handles (``handle.remove()`` them when done)."""
    stack: list[str] = []

    def enter(name: str):
        def hook(module: torch.nn.Module, args: Any) -> None:
            stack.append(mem.tag)
            mem.tag = name
        return hook

    def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
        mem.tag = stack.pop() if stack else ""

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or "model")))
        handles.append(module.register_forward_hook(leave))
    return handles
