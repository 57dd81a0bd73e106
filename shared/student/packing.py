"""Several documents packed into one row: where each starts, and running RWKV layers per document.

A packed dataset (``python -m services.data text --pack``) puts whole documents one after
another in a row and restarts ``position_ids`` at each of them. A document must not see the one
before it: attention layers get a block-diagonal causal mask (transformers builds it from the
position ids), and RWKV layers must start every document from a zero state, token shift and WKV
state alike.

The RWKV side has two layouts:

* ``segments`` (``PackedSegments``; ``student.packed_layout: segments``): the layer runs once on
  the packed rows; its token shifts read zeros at each document start, and the WKV operator
  sees the rows as one flat sequence cut at the document starts (``cu_seqlens``, as
  flash-linear-attention's varlen kernels take it; the other paths loop over the documents).
  The row layout stays as it is: no gather, no padding, one kernel per op whatever the number
  of documents.
* ``per_document`` (``DocumentBatch``): the row
  is re-laid out: ``split`` turns ``[B, T, *]`` into batches of whole documents ``[n, L, *]``
  (each from a zero state, right-padded), the layer runs on those, and ``merge`` puts the
  outputs back. Documents are grouped by length (powers of two), so a group is padded to at
  most twice its shortest member and short documents do not pay for a long one. On a GPU this
  cost the all-RWKV-7 SmolLM2 student two thirds of its step (docs/quality.md): every group is
  one more launch of every op of the layer, at a new shape: ``segments`` ran 7.07x as fast
  there (bench_steps --docs-per-row 4, BENCHMARKS.md 2026-12-02), so ``auto``, the default,
  takes ``segments`` where the WKV runs on fla and ``per_document`` on the chunked path, where
  it is the faster one (documents of like length share one scan).

The rule for a document start is transformers' (``find_packed_sequence_indices``): a position
that does not follow its left neighbour by exactly 1. The data loader continues counting into
the padding, so padding never starts a document.
"""
from __future__ import annotations

import torch


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: True where a document begins (every row's first token included)."""
    if position_ids.dim() != 2:
        raise ValueError("position_ids must be [batch, seq], got shape "
                         f"{tuple(position_ids.shape)}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return starts


def is_right_padding(attention_mask: torch.Tensor | None) -> bool:
    """True when every row is real tokens followed by padding only (or there is no mask)."""
    if attention_mask is None:
        return True
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def packed_document_starts(position_ids: torch.Tensor | None,
                           attention_mask: torch.Tensor | None,
                           batch_size: int) -> torch.Tensor | None:
    """``[B, T]`` document starts when some row holds more than one document, else None.

    Only a restart between two real tokens counts: generation's left padding makes the first
    real token's position look like a restart after the padding, and that is no document.
    Packed rows must be right-padded (the data loader's collate does that).
    """
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    starts = document_starts(position_ids.expand(batch_size, -1))
    inner = starts[:, 1:]
    if attention_mask is not None:
        # with a cache the mask also covers the past tokens: keep the current ones
        attention_mask = attention_mask[:, -starts.shape[1]:]
        real = attention_mask.bool()
        inner = inner & real[:, 1:] & real[:, :-1]
    if not bool(inner.any()):
        return None
    if not is_right_padding(attention_mask):
        raise ValueError("position_ids restart inside a row (packed documents) but the "
                         "attention_mask has left padding: packed rows must be right-padded")
    return starts


class DocumentBatch:
    """The documents of a packed ``[B, T]`` batch, grouped by length, with the index maps that
    move ``[B, T, *]`` tensors to per-document batches and back (see the module docstring)."""

    def __init__(self, starts: torch.Tensor, device: torch.device | None = None) -> None:
        """``starts`` on the host (``device``: where the layers run) finds the groups without a
        device sync; the index maps then move to ``device`` once."""
        batch, seq = starts.shape
        self.batch, self.seq = batch, seq
        begin = starts.flatten().nonzero().squeeze(1)                     # flat index of each start
        end = torch.cat([begin[1:], begin.new_tensor([batch * seq])])     # rows begin with a start
        lengths = end - begin
        self.num_documents = int(begin.numel())
        group_of = torch.ceil(torch.log2(lengths.double())).long()        # 1, 2, 3-4, 5-8, ...
        self.gather: list[torch.Tensor] = []   # per group: [n * L] flat token index (clamped)
        self.shapes: list[tuple[int, int]] = []
        kept: list[torch.Tensor] = []          # per group: positions of real tokens in [n * L]
        dest: list[torch.Tensor] = []          # per group: where those tokens go in [B * T]
        for g in torch.unique(group_of).tolist():
            members = (group_of == g).nonzero().squeeze(1)
            first, length = begin[members], lengths[members]
            longest = int(length.max())
            offset = torch.arange(longest, device=starts.device)
            valid = offset[None, :] < length[:, None]
            index = first[:, None] + torch.minimum(offset[None, :], length[:, None] - 1)
            self.gather.append(index.flatten())
            self.shapes.append((int(members.numel()), longest))
            kept.append(valid.flatten().nonzero().squeeze(1))
            dest.append(index[valid])
        self.kept = kept
        self.restore = torch.argsort(torch.cat(dest))  # concatenated real outputs -> token order
        if device is not None:
            device = torch.device(device)
            self.gather = [_to_device(t, device) for t in self.gather]
            self.kept = [_to_device(t, device) for t in self.kept]
            self.restore = _to_device(self.restore, device)

    def split(self, x: torch.Tensor | None) -> list[torch.Tensor | None]:
        """``[B, T, *]`` -> one ``[n, L, *]`` tensor per length group (right-padded documents)."""
        if x is None:
            return [None] * len(self.shapes)
        if tuple(x.shape[:2]) != (self.batch, self.seq):
            raise ValueError(f"expected [{self.batch}, {self.seq}, ...], got {tuple(x.shape)}")
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return [flat.index_select(0, index.to(x.device)).view(n, length, *x.shape[2:])
                for index, (n, length) in zip(self.gather, self.shapes, strict=True)]

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``split``: per-group outputs -> ``[B, T, *]`` (padding outputs dropped)."""
        rest = parts[0].shape[2:]
        real = torch.cat([p.reshape(-1, *rest).index_select(0, keep.to(p.device))
                          for p, keep in zip(parts, self.kept, strict=True)])
        return real.index_select(0, self.restore.to(real.device)).view(self.batch, self.seq, *rest)


class PackedSegments:
    """The documents of a packed ``[B, T]`` batch as a flat varlen sequence (the ``segments``
    layout of the module docstring): ``cu_seqlens`` (``[N + 1]`` offsets of the documents in the
    ``B * T`` flattened tokens, on the batch's device and on the host) and ``continues``
    (``[B, T, 1]``, False where a token starts a document: its token shift must read zeros).

    Built once per forward and shared by every layer, so fla's chunk-index preparation (cached
    on the ``cu_seqlens`` tensor) runs once; building it from device ``starts`` costs one
    device-to-host copy, from the batch's host copy (``device`` then names where the layers run)
    none.
    """

    def __init__(self, starts: torch.Tensor, device: torch.device | None = None) -> None:
        if starts.dim() != 2:
            raise ValueError(f"starts must be [batch, seq], got shape {tuple(starts.shape)}")
        device = starts.device if device is None else torch.device(device)
        self.batch, self.seq = starts.shape
        host = starts.cpu().flatten()
        begin = host.nonzero().squeeze(1)
        self.cu_seqlens_cpu = torch.cat([begin, begin.new_tensor([host.numel()])])
        self.cu_seqlens = _to_device(self.cu_seqlens_cpu, device)
        self.continues = ~_to_device(starts, device).unsqueeze(-1)
        self.num_documents = int(begin.numel())


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without waiting for the GPU: a host tensor goes through pinned
    memory (a copy from pageable memory may wait for the stream)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


PACKED_LAYOUTS = ("per_document", "segments")


HostPositions = tuple[torch.Tensor, torch.Tensor | None]
"""A batch's ``(position_ids, attention_mask)`` on the host (the data loader's CPU copies)."""


def packed_documents(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     batch_size: int, layout: str = "per_document",
                     host: HostPositions | None = None,
                     ) -> DocumentBatch | PackedSegments | None:
    """The packed documents of a batch in ``layout`` (one of ``PACKED_LAYOUTS``), or None when no
    row holds more than one document.

    ``host``: the same ``position_ids`` and ``attention_mask`` on the host. Finding the documents
    from device tensors waits for the GPU (whether any row restarts, whether the padding is on
    the right, the offsets fla's varlen kernels take on the host): at the start of the student's
    forward, after the teacher's, so the host stops queueing work until the teacher's forward
    has run. From the host copies it waits for nothing."""
    if layout not in PACKED_LAYOUTS:
        raise ValueError(f"packed layout {layout!r}: choose one of {', '.join(PACKED_LAYOUTS)}")
    device = None if position_ids is None else position_ids.device
    if host is not None:
        position_ids, attention_mask = host
    starts = packed_document_starts(position_ids, attention_mask, batch_size)
    if starts is None:
        return None
    return (PackedSegments(starts, device) if layout == "segments"
            else DocumentBatch(starts, device))
