"""Save / load in Hugging Face format (safetensors + config.json + tokenizer), Auto*
registration."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shared.student import (
    RWKVHybridConfig,
    RWKVHybridForCausalLM,
    convert_teacher,
    load_student,
    save_student,
)
from shared.tiny import tiny_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("mixer,mode,ffn", [("rwkv6", "block", "rwkv_cmix"),
                                            ("rwkv7", "attention_only", "mlp"),
                                            ("rwkv7", "block", "mlp")])
def test_round_trip_gives_identical_logits(tmp_path, mixer: str, mode: str, ffn: str) -> None:
    teacher = tiny_teacher("qwen2")
    student = convert_teacher(teacher, dict(layers=[0, 2], mixer=mixer, mode=mode, ffn=ffn,
                                          grad_checkpointing=True)).eval()
    ids = torch.randint(3, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(ids, output_hidden_states=True)
    save_student(student, None, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "rwkv_hybrid"
    assert config["architectures"] == ["RWKVHybridForCausalLM"]
    assert {k: config[k] for k in ("base_model_type", "rwkv_layers", "rwkv_mixer", "rwkv_mode",
                                   "rwkv_ffn", "rwkv_head_size",
                                   "rwkv_gradient_checkpointing")} == {
        "base_model_type": "qwen2", "rwkv_layers": [0, 2], "rwkv_mixer": mixer, "rwkv_mode": mode,
        "rwkv_ffn": ffn, "rwkv_head_size": 16, "rwkv_gradient_checkpointing": True}
    # base config fields kept
    assert config["hidden_size"] == 64 and config["num_key_value_heads"] == 2

    for loaded in (load_student(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, RWKVHybridForCausalLM) and not loaded.training
        with torch.no_grad():
            got = loaded(ids, output_hidden_states=True)
        assert torch.equal(got.logits, expected.logits)
        assert all(torch.equal(a, b)
                   for a, b in zip(got.hidden_states, expected.hidden_states, strict=True))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RWKVHybridConfig)


def test_real_checkpoint_with_tokenizer(tiny_llama, tmp_path) -> None:
    """From a checkpoint directory on disk (as the trainer does), through save_student and back."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7"), tokenizer=tokenizer)
    out = save_student(student, tokenizer, tmp_path / "student")
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    loaded = load_student(out, dtype=torch.bfloat16, device="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.converted_layers == [1, 3]
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    generated = loaded.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
