"""What feeds the training step: batches in order with their teacher answers (``link.prefetch``:
the request for micro step k+1 goes out right after step k's answer arrived, before step k's
forward, so the teacher computes k+1 while the student trains on k), and the batch's copy to the
device."""
from __future__ import annotations

import time

import torch

from shared.link import RequestSpec


class Prefetcher:
    """Hands out (batch, teacher handle, data state before the batch) in training order."""

    def __init__(self, batches, teacher, request: RequestSpec | None, prefetch: bool,
                 vocab_size: int) -> None:
        self.batches, self.teacher, self.request = batches, teacher, request
        self.prefetch = prefetch and teacher is not None
        self.vocab_size = vocab_size
        self.iterator = batches.forever()
        self.pending = None

    def _fetch(self):
        state = self.batches.state_dict()
        batch = next(self.iterator)
        highest = int(batch["input_ids"].max())
        if highest >= self.vocab_size:
            raise ValueError(f"token id {highest} in dataset {self.batches.data.root} is outside "
                             f"the student's vocabulary of {self.vocab_size}: the dataset holds "
                             "ids its tokenizer cannot produce (made for another model, or "
                             "changed since); prepare it again with python -m "
                             "services.data and this model's tokenizer")
        handle = None
        if self.teacher is not None:
            handle = self.teacher.request(batch["input_ids"], batch["lengths"], self.request,
                                          batch.get("position_ids"))
        return batch, handle, state

    def next(self):
        """The next batch and its teacher answer; with prefetch, the one after is asked for."""
        current = self.pending or self._fetch()
        self.pending = None
        batch, handle, _ = current
        t0 = time.perf_counter()
        answer = handle.result() if handle is not None else None
        wait = time.perf_counter() - t0
        if self.prefetch:
            self.pending = self._fetch()   # k+1 goes out before k's forward
        return batch, answer, wait, handle

    def data_state(self) -> dict:
        """Position of the next batch to train (a prefetched batch is not yet trained)."""
        return self.pending[2] if self.pending is not None else self.batches.state_dict()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``; to a GPU from pinned memory."""
    if device.type == "cuda":  # a non-blocking copy from pinned memory never waits
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}
