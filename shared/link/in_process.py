"""The in-process teacher: the link's ``request`` API with the teacher model in the trainer.

For small setups and as a performance baseline: the forward runs at ``request`` time on the
trainer's device, so nothing overlaps. Answers are exactly the service's (same TeacherModel).
"""
from __future__ import annotations

import time

import torch

from shared.link.client import TeacherHandle
from shared.link.protocol import RequestSpec, check_batch
from shared.link.teacher_model import TeacherModel, TeacherRequest


class InProcessTeacher:
    """The link's ``request`` API, answered by a model in this process."""

    def __init__(self, teacher: TeacherModel, max_tokens_per_request: int = 1 << 30) -> None:
        self.teacher = teacher
        self.max_tokens = max_tokens_per_request
        self._seq = 0

    def request(self, input_ids: torch.Tensor, lengths: torch.Tensor, spec: RequestSpec,
                position_ids: torch.Tensor | None = None) -> TeacherHandle:
        fp = self.teacher.fingerprint
        check_batch(input_ids, lengths, fp.vocab_size, self.max_tokens, fp.num_layers, spec,
                    position_ids)
        self._seq += 1
        start = time.time()
        (out,) = self.teacher.forward([TeacherRequest(spec, input_ids, lengths.cpu(),
                                                      position_ids)])
        if self.teacher.device.type == "cuda":  # the forward only queued its kernels
            torch.cuda.synchronize(self.teacher.device)
        return TeacherHandle(None, self._seq, out, (start, time.time()))

    def close(self, clean: bool = True) -> None:
        pass
