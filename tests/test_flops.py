"""shared/flops.py against FLOP counts worked out by hand for a tiny config.

The tiny Llama: d = 64, MLP 128, 4 heads of 16 (2 KV heads), 2 layers, vocabulary 256.
Matmul parameters:
  kept Llama layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 + gate/up/down 3·64·128 = 36864
  RWKV-6 block (mlp kept): r/k/v/gate/output 5·64·64 = 20480, LoRAs time_maa_w1 64·160,
    time_maa_w2 5·32·64, time_decay_w1 64·64, time_decay_w2 64·64 = 28672, MLP 24576: 73728
  head 64·256 = 16384
Softmax attention 2·T·A per layer and token forward (A = 64); WKV (RWKV-6) 5·4·16² = 5120.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from shared.config import StudentConfig
from shared.flops import (
    attention_span,
    mfu,
    peak_flops,
    student_step_flops,
    teacher_flops_per_token,
    training_flops_per_token,
)

LLAMA_LAYER, RWKV6_LAYER, RWKV6_MIXER, HEAD = 36864, 73728, 20480 + 28672, 16384
WKV6 = 5 * 4 * 16 ** 2
T = 10
ATTENTION = 2 * T * 64   # one kept layer's forward per token at span T


def tiny(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=256,
                       tie_word_embeddings=tie)


def test_kd_all_trainable_is_six_n_plus_attention_and_wkv() -> None:
    n = LLAMA_LAYER + RWKV6_LAYER + HEAD
    assert n == 126976
    expected = 6 * n + 3 * ATTENTION + 3 * WKV6
    assert expected == 781056
    assert training_flops_per_token(tiny(), [1], T, "kd", "all") == expected


def test_tied_head_counts_once_like_an_untied_one() -> None:
    assert (training_flops_per_token(tiny(tie=True), [1], T, "kd", "all")
            == training_flops_per_token(tiny(), [1], T, "kd", "all"))


def test_frozen_layers_before_the_first_trainable_one_run_forward_only() -> None:
    # kd, mixers only: layer 0 precedes layer 1's mixer (2N, attention forward only);
    # layer 1 runs forward, activation gradients (4N) and the mixer's weight gradients;
    # the frozen head still passes gradients back (4N).
    expected = (2 * LLAMA_LAYER + ATTENTION + 4 * RWKV6_LAYER + 2 * RWKV6_MIXER + 4 * HEAD
                + 3 * WKV6)
    assert expected == 549120
    assert training_flops_per_token(tiny(), [1], T, "kd", "mixers") == expected


def test_teacher_forced_align_runs_the_converted_layers_alone() -> None:
    expected = 4 * RWKV6_LAYER + 2 * RWKV6_MIXER + 3 * WKV6
    assert training_flops_per_token(tiny(), [1], T, "align", "all") == expected == 408576


def test_free_align_runs_the_head_forward_only() -> None:
    expected = (2 * LLAMA_LAYER + ATTENTION + 4 * RWKV6_LAYER + 2 * RWKV6_MIXER + 2 * HEAD
                + 3 * WKV6)
    assert training_flops_per_token(tiny(), [1], T, "align", "mixers", "free") == expected


def test_rwkv7_loras_and_state_work() -> None:
    # LoRA width 32 for every x070 LoRA at d = 64; the first converted layer has no v LoRA.
    # layer 0 (first): r/k/v/o 4·4096 + w, a, g LoRAs 3·(64·32 + 32·64) + MLP 24576 = 53248
    # layer 1: the same + the v LoRA 4096 = 57344; WKV (x070) 9·4·16² per layer.
    from shared.student import RWKVHybridConfig

    config = RWKVHybridConfig.from_base_config(tiny(), StudentConfig(layers=[0, 1],
                                                                     mixer="rwkv7"))
    wkv7 = 9 * 4 * 16 ** 2
    expected = 6 * (53248 + 57344 + HEAD) + 2 * 3 * wkv7
    assert training_flops_per_token(config, None, T, "kd", "all") == expected == 817152


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_trainers_count_of_a_real_model_matches_the_config_count(kind: str) -> None:
    from shared.student import convert_teacher
    from shared.student.param_groups import trainable_names
    from shared.tiny import tiny_teacher

    teacher = tiny_teacher(kind, layers=2)
    student = convert_teacher(teacher, StudentConfig(layers=[1]))
    names = trainable_names(student, "kd", "rwkv_layers")
    for name, p in student.named_parameters():
        p.requires_grad_(name in names)
    counted = student_step_flops(student, "kd").per_token(T)
    assert counted == training_flops_per_token(student.config, None, T, "kd", "rwkv_layers")
    assert counted < training_flops_per_token(student.config, None, T, "kd", "all")


def test_teacher_forward_counted_apart() -> None:
    full = 2 * (2 * LLAMA_LAYER + HEAD) + 2 * ATTENTION
    assert teacher_flops_per_token(tiny(), T) == full == 182784
    # hidden states of layer 1's input only (align): layer 0 runs, no head
    assert teacher_flops_per_token(tiny(), T, layers_run=1, logits=False) == (
        2 * LLAMA_LAYER + ATTENTION)


def test_attention_span_of_rows_and_packed_documents() -> None:
    assert attention_span(torch.tensor([3, 5])) == (9 + 25) / 8
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    # row 0: documents of 3 and 3 (two padding positions after); row 1: one of 4
    assert attention_span(torch.tensor([6, 4]), positions) == (9 + 9 + 16) / 10
    assert attention_span([]) == 0.0


def test_no_peak_and_no_mfu_on_a_cpu() -> None:
    assert peak_flops("cpu") is None
    assert mfu(1e12, torch.device("cpu")) is None


def test_bad_stage_is_named() -> None:
    with pytest.raises(ValueError, match="stage 'dpo'"):
        training_flops_per_token(tiny(), [1], T, "dpo", "all")


@pytest.mark.gpu
def test_peak_of_the_gpu_here() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    name = torch.cuda.get_device_name(0)
    peak = peak_flops("cuda:0")
    if any(k in name for k in ("H100", "H200", "A100")):
        assert peak is not None and mfu(peak / 2, "cuda:0") == pytest.approx(0.5)
    else:
        assert peak is None
