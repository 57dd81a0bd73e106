"""Packed batches through the trainer's pieces: the loader's collate, the teacher's answer and
the stage objective together give exactly the loss of the same documents one per row."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.objective import DistillObjective, teacher_request
from shared.config import LinkConfig, TrainConfig
from shared.data_loader import collate
from shared.link import InProcessTeacher
from shared.link.teacher_model import TeacherModel
from shared.student import convert_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

DOC_LENGTHS = [[6, 3, 8], [12], [4, 9]]


def rows(packed: bool) -> list[dict]:
    """The same documents packed (several per row, position ids restarting) or one per row;
    labels are next-token targets inside each document (-100 at its last token)."""
    gen = torch.Generator().manual_seed(0)
    docs = [[torch.randint(3, 100, (n,), generator=gen) for n in row] for row in DOC_LENGTHS]
    out = []
    for row in docs:
        parts = [row] if packed else [[d] for d in row]
        for part in parts:
            ids = torch.cat(part)
            labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in part])
            item = {"input_ids": ids.tolist(), "labels": labels.tolist(), "length": len(ids)}
            if packed:
                item["position_ids"] = torch.cat([torch.arange(len(d)) for d in part]).tolist()
            out.append(item)
    return out


@pytest.fixture(scope="module")
def teacher(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    return InProcessTeacher(TeacherModel(model, tiny_llama))


@pytest.mark.parametrize("stage,align_mode", [("kd", "teacher_forced"), ("align", "teacher_forced"),
                                              ("align", "free")])
def test_packed_loss_equals_one_document_per_row(teacher, stage: str, align_mode: str) -> None:
    student = convert_teacher(teacher.teacher.model, dict(layers=[1, 2], mixer="rwkv7"))
    train = TrainConfig(stage=stage, align_mode=align_mode)
    spec = teacher_request(train, LinkConfig(logits="bf16"), student.converted_layers,
                           student.config.num_hidden_layers)
    objective = DistillObjective(student, train, spec)
    losses = []
    for packed in (True, False):
        batch = collate(rows(packed), pad_token_id=0)
        assert ("position_ids" in batch) == packed
        answer = teacher.request(batch["input_ids"], batch["lengths"], spec,
                                 batch.get("position_ids")).result()
        loss, _ = objective(batch["input_ids"], batch["attention_mask"], batch["labels"], answer,
                            batch.get("position_ids"))
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    # the same packed rows read as one long document give another loss: the check can fail
    batch = collate(rows(True), pad_token_id=0)
    answer = teacher.request(batch["input_ids"], batch["lengths"], spec).result()
    leaky, _ = objective(batch["input_ids"], batch["attention_mask"], batch["labels"], answer)
    assert abs(float(leaky.detach()) - float(losses[1])) > 0.01 * float(losses[1])
