"""Building a student from a teacher: weights copied as specified, RWKV init, clear errors."""
from __future__ import annotations

import copy

import pytest
import torch

from shared.student import RWKVHybridForCausalLM, convert_teacher
from shared.tiny import tiny_teacher

COMBOS = [("block", "mlp"), ("block", "rwkv_cmix"), ("attention_only", "mlp")]
CONVERTED = [0, 2]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def teacher(request):
    return tiny_teacher(request.param)


def _per_head(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    return list(t.reshape(heads, -1, *t.shape[1:]))


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_weights_copied(teacher, mixer: str, mode: str, ffn: str) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = convert_teacher(teacher, dict(layers=CONVERTED, mixer=mixer, mode=mode, ffn=ffn))
    assert isinstance(student, RWKVHybridForCausalLM)
    assert student.converted_layers == CONVERTED
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[name], t_sd[name]), name
    for name, value in t_sd.items():  # the kept (attention) layer is the teacher's, name for name
        if name.startswith("model.layers.1."):
            assert torch.equal(s_sd[name], value), name

    cfg = teacher.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for idx in CONVERTED:
        tp, sp = f"model.layers.{idx}.", f"model.layers.{idx}."
        norms = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}
        if mode == "attention_only":
            norms = {name: name for name in norms}
        for src, dst in norms.items():
            assert torch.equal(s_sd[f"{sp}{dst}.weight"], t_sd[f"{tp}{src}.weight"])
        mlp_dst = "mlp" if mode == "attention_only" else "ffn"
        if ffn == "mlp":
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(s_sd[f"{sp}{mlp_dst}.{proj}.weight"],
                                   t_sd[f"{tp}mlp.{proj}.weight"])
        else:
            assert torch.equal(s_sd[f"{sp}ffn.key.weight"], t_sd[f"{tp}mlp.up_proj.weight"])
            assert torch.equal(s_sd[f"{sp}ffn.value.weight"], t_sd[f"{tp}mlp.down_proj.weight"])
            assert not any(k.startswith(f"{sp}ffn.gate_proj") for k in s_sd)
        mix = sp + ("self_attn." if mode == "attention_only" else "att.")
        assert not any(k.startswith(f"{mix}q_proj") for k in s_sd)
        assert torch.equal(s_sd[f"{mix}receptance.weight"], t_sd[f"{tp}self_attn.q_proj.weight"])
        assert torch.equal(s_sd[f"{mix}output.weight"], t_sd[f"{tp}self_attn.o_proj.weight"])
        biases = ["weight"] + (["bias"] if f"{tp}self_attn.q_proj.bias" in t_sd else [])
        if cfg.model_type == "qwen2":
            assert biases == ["weight", "bias"]
            assert torch.equal(s_sd[f"{mix}receptance.bias"], t_sd[f"{tp}self_attn.q_proj.bias"])
            assert f"{mix}output.bias" not in s_sd  # Qwen2's o_proj has no bias
        for src, dst in (("k_proj", "key"), ("v_proj", "value")):
            # GQA: RWKV head h starts from the teacher's kv head h // (heads // kv_heads)
            for p in biases:
                student_heads = _per_head(s_sd[f"{mix}{dst}.{p}"], heads)
                teacher_heads = _per_head(t_sd[f"{tp}self_attn.{src}.{p}"], kv_heads)
                for h in range(heads):
                    kv_head = teacher_heads[h // (heads // kv_heads)]
                    assert torch.equal(student_heads[h], kv_head), (src, p, h)
    for name, value in teacher.state_dict().items():  # the teacher is left untouched
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_rwkv_parameters_get_standard_init(teacher, mixer: str) -> None:
    student = convert_teacher(teacher, dict(layers=[0, 1, 2], mixer=mixer))
    num_layers = teacher.config.num_hidden_layers
    for idx in range(num_layers):
        att = student.model.layers[idx].att
        r01, r1a0 = idx / (num_layers - 1), 1 - idx / num_layers
        a = att.num_heads * att.head_size
        n = torch.arange(a, dtype=torch.float64)
        hidden = teacher.config.hidden_size
        ddd = torch.arange(hidden, dtype=torch.float64) / hidden
        if mixer == "rwkv6":
            expected = -6 + 5 * (n / (a - 1)) ** (0.7 + 1.3 * r01)
            torch.testing.assert_close(att.time_decay.double(), expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(att.time_maa_k.double(), 1 - ddd**r1a0, rtol=0, atol=1e-6)
            assert torch.count_nonzero(att.time_maa_w1) == 0
        else:
            torch.testing.assert_close(att.x_r.double(), 1 - ddd ** (0.2 * r1a0), rtol=0, atol=1e-6)
            assert torch.allclose(att.k_a, torch.full_like(att.k_a, 1.02))
            assert torch.allclose(att.r_k, torch.full_like(att.r_k, -0.04))
            first = idx == 0
            assert (att.is_first, hasattr(att, "v0")) == (first, not first)
            hs = att.head_size
            zig = ((n % hs) - (hs - 1) / 2) / ((hs - 1) / 2)
            www = -6 + 6 * (n / (a - 1)) ** (1 + r01**0.3)
            torch.testing.assert_close(att.w0.double(), www + 0.5 + zig * zig.abs() * 2.5, rtol=0,
                                       atol=1e-5)
        ln_x = ((1 + idx) / num_layers) ** 0.7
        assert torch.allclose(att.ln_x.weight, torch.full_like(att.ln_x.weight, ln_x))
        assert torch.isfinite(torch.cat([p.flatten() for p in att.parameters()])).all()


def test_qwen3_head_dim_differs_from_hidden() -> None:
    teacher = tiny_teacher("qwen3")
    cfg = teacher.config
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    for mixer in ("rwkv6", "rwkv7"):
        student = convert_teacher(teacher, dict(layers="all", mixer=mixer, ffn="rwkv_cmix"))
        att = student.model.layers[0].att
        assert tuple(att.receptance.weight.shape) == (96, 64)
        assert tuple(att.output.weight.shape) == (64, 96)
        logits = student(torch.randint(0, 101, (2, 7))).logits
        assert logits.shape == (2, 7, 101) and torch.isfinite(logits).all()


def test_spec_forms() -> None:
    from shared.config import StudentConfig

    teacher = tiny_teacher("llama")
    for spec in ({"layers": [1], "mixer": "rwkv7", "kernel": "chunk"},
                 StudentConfig(layers=[1], mixer="rwkv7", mode="block", ffn="mlp", kernel="chunk")):
        student = convert_teacher(teacher, spec)
        assert student.converted_layers == [1] and student.config.rwkv_mixer == "rwkv7"
        assert student.config.rwkv_kernel == "chunk"
        assert student.model.layers[1].att.kernel == "chunk"
    # default: all layers, rwkv6, block
    assert convert_teacher(teacher).converted_layers == [0, 1, 2]


class _FakeTokenizer:
    def __len__(self) -> int:
        return 5000


@pytest.mark.parametrize("spec,match", [
    (dict(layers=[3]), "out of range"),
    (dict(layers=[-1]), "out of range"),
    (dict(layers=[]), "no layer to convert"),
    (dict(layers="some"), "layers must be"),
    (dict(mixer="rwkv5"), "unknown mixer"),
    (dict(mode="mamba"), "unknown mode"),
    (dict(ffn="moe"), "unknown ffn"),
    (dict(mode="attention_only", ffn="rwkv_cmix"), "needs mode='block'"),
    (dict(heads=1), r"unknown student option\(s\) \['heads'\]"),
    (dict(init_from="runs/align/student"), "load it with load_student"),
])
def test_bad_spec_is_a_clear_error(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        convert_teacher(tiny_teacher("llama"), spec)


def test_mismatches_are_clear_errors() -> None:
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match="tokenizer has 5000 tokens"):
        convert_teacher(teacher, tokenizer=_FakeTokenizer())
    broken = copy.deepcopy(teacher)
    broken.config.num_key_value_heads = 4  # config says 4 kv heads, weights have 2
    with pytest.raises(ValueError,
                       match=r"k_proj.weight has shape \(32, 64\), expected \(64, 64\)"):
        convert_teacher(broken)
    broken = copy.deepcopy(teacher)
    broken.config.vocab_size = 99
    with pytest.raises(ValueError, match="vocab_size=99"):
        convert_teacher(broken)

    import transformers as tr
    gpt2 = tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not supported"):
        convert_teacher(gpt2)
