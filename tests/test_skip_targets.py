"""train.skip_eos_targets: positions whose target is a text dataset's end-of-document token do
not train (services/trainer/objective.py), in KL and CE alike; chat datasets have none."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.objective import (
    DistillObjective,
    drop_targets,
    skipped_targets,
    teacher_request,
)
from shared.config import LinkConfig, TrainConfig
from shared.data_card import CARD_FORMAT, write_card
from shared.labels import IGNORE
from shared.link import InProcessTeacher
from shared.link.teacher_model import TeacherModel
from shared.student import convert_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

EOS = 7


def test_drop_targets_ignores_only_those_tokens() -> None:
    labels = torch.tensor([[5, EOS, IGNORE, 9], [EOS, EOS, 3, 8]])
    dropped = drop_targets(labels, (EOS,))
    assert dropped.tolist() == [[5, IGNORE, IGNORE, 9], [IGNORE, IGNORE, 3, 8]]
    assert labels[0, 1] == EOS                       # the batch's own labels are not changed
    assert drop_targets(labels, ()) is labels


def kd_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows of random documents, each ending in EOS (as services.data writes them)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (2, 24), generator=gen)
    ids[:, 11] = EOS
    ids[:, 23] = EOS
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    labels[:, 11] = IGNORE                            # a document's last token: no target
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "lengths": torch.tensor([24, 24])}


def test_skipped_positions_train_neither_kl_nor_ce(tiny_llama) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    teacher = InProcessTeacher(TeacherModel(model, tiny_llama))
    student = convert_teacher(model, dict(layers=[1], mixer="rwkv7"))
    train = TrainConfig(stage="kd", kl_weight=0.5, ce_weight=0.5, loss_kernel="torch")
    spec = teacher_request(train, LinkConfig(logits="bf16"), student.converted_layers,
                           student.config.num_hidden_layers)
    batch = kd_batch(model.config.vocab_size)
    assert (batch["labels"] == EOS).sum() == 4       # each document's end is a target
    answer = teacher.request(batch["input_ids"], batch["lengths"], spec).result()
    plain = DistillObjective(student, train, spec)
    skipping = DistillObjective(student, train, spec, skip_targets=(EOS,))
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        loss_all, parts_all = plain(*args, batch["labels"], answer)
        loss_skip, parts_skip = skipping(*args, batch["labels"], answer)
        masked = batch["labels"].masked_fill(batch["labels"] == EOS, IGNORE)
        loss_masked, parts_masked = plain(*args, masked, answer)
    torch.testing.assert_close(loss_skip, loss_masked)
    torch.testing.assert_close(parts_skip["kl"], parts_masked["kl"])
    torch.testing.assert_close(parts_skip["ce"], parts_masked["ce"])
    assert abs(float(parts_skip["ce"]) - float(parts_all["ce"])) > 1e-4   # the check can fail
    assert abs(float(loss_skip) - float(loss_all)) > 1e-5


def card(root: Path, name: str, **fields) -> str:
    path = root / name
    path.mkdir()
    write_card(path, {"format": CARD_FORMAT, **fields})
    return str(path)


def test_the_end_tokens_come_from_the_text_datasets_cards(tmp_path: Path) -> None:
    text = card(tmp_path, "text", eos_token_id=EOS)
    other = card(tmp_path, "other", eos_token_id=2)
    chat = card(tmp_path, "chat", chat_format="chatml")
    on = TrainConfig(stage="kd", skip_eos_targets=True)
    assert skipped_targets(on, [text, chat]) == (EOS,)
    assert skipped_targets(on, [other, text]) == (2, EOS)
    assert skipped_targets(TrainConfig(stage="sft", skip_eos_targets=True), [text]) == (EOS,)
    assert skipped_targets(TrainConfig(stage="kd"), [text]) == ()             # off by default
    assert skipped_targets(TrainConfig(stage="align", skip_eos_targets=True), [text]) == ()
    with pytest.raises(ValueError, match="chat datasets end no documents"):
        skipped_targets(on, [chat])
