"""Student forward: hidden-state convention, align_forward, trainable parameters, padding,
kernels, optimizer groups."""
from __future__ import annotations

import pytest
import torch

from shared.student import convert_teacher
from shared.tiny import tiny_teacher

COMBOS = [("block", "mlp"), ("block", "rwkv_cmix"), ("attention_only", "mlp")]
VOCAB = 101

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama", layers=4)


def _ids(batch: int = 2, length: int = 19, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_hidden_state_convention(teacher) -> None:
    student = convert_teacher(teacher, dict(layers=[3])).eval()
    ids = _ids()
    with torch.no_grad():
        out = student(ids, output_hidden_states=True)
        ref = teacher(ids, output_hidden_states=True)
    num_layers = teacher.config.num_hidden_layers
    assert len(out.hidden_states) == num_layers + 1
    torch.testing.assert_close(out.hidden_states[0], student.model.embed_tokens(ids))
    for i in range(num_layers):  # layers 0..2 are the teacher's: states entering layers 0..3 agree
        torch.testing.assert_close(out.hidden_states[i], ref.hidden_states[i])
    # index L is the last layer's output *before* the final norm
    normed = student.model.norm(out.hidden_states[-1])
    torch.testing.assert_close(out.logits, student.lm_head(normed))
    assert not torch.allclose(out.hidden_states[-1], student.model.norm(out.hidden_states[-1]))


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_align_forward_matches_full_forward(teacher, mixer: str, mode: str, ffn: str) -> None:
    """Fed the student's own layer inputs, align_forward reproduces the student's next states."""
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer=mixer, mode=mode, ffn=ffn)).eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # right padding on the first row
    with torch.no_grad():
        states = student(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        aligned = student.align_forward({i: states[i] for i in range(4)}, attention_mask=mask)
    assert sorted(aligned) == [1, 3]
    for i, out in aligned.items():
        torch.testing.assert_close(out, states[i + 1], rtol=1e-5, atol=1e-5)


def test_align_forward_errors(teacher) -> None:
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7"))
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="first converted layer \\(1\\)"):
        student.align_forward({3: x})
    with pytest.raises(ValueError, match="outside"):
        student.align_forward({1: x, 7: x})
    with pytest.raises(ValueError, match="none of the converted layers"):
        student.align_forward({0: x})
    with pytest.raises(ValueError, match=r"\[batch, seq, 64\]"):
        student.align_forward({1: torch.randn(2, 5, 32)})


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_align_gradients_reach_exactly_the_mixer(teacher, mixer: str, mode: str, ffn: str) -> None:
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer=mixer, mode=mode, ffn=ffn)).train()
    names = set(student.mixer_parameter_names())
    mixer_part = "self_attn" if mode == "attention_only" else "att"
    for name, _ in student.named_parameters():
        parts = name.split(".")
        meant = (name.startswith("model.layers.") and int(parts[2]) in (1, 3)
                 and (parts[3] == mixer_part or (ffn == "rwkv_cmix" and parts[3] == "ffn")))
        assert (name in names) == meant, name
    for name, param in student.named_parameters():
        param.requires_grad_(name in names)
    states = {i: torch.randn(2, 9, 64) for i in range(4)}
    out = student.align_forward(states)
    sum((o - states[i].roll(1, 0)).pow(2).mean() for i, o in out.items()).backward()
    for name, param in student.named_parameters():
        assert (param.grad is not None) == (name in names), name


def test_align_gradients_never_reach_other_layers(teacher) -> None:
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7", mode="block")).train()
    out = student.align_forward({i: torch.randn(2, 6, 64) for i in range(4)})
    sum(o.pow(2).mean() for o in out.values()).backward()
    for name, param in student.named_parameters():
        in_converted = name.startswith(("model.layers.1.", "model.layers.3."))
        assert (param.grad is not None) == in_converted, name


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_gradient_checkpointing_gives_same_gradients(teacher, mixer: str) -> None:
    ids = _ids(length=11)
    grads = []
    for switch in ("off", "config", "hf"):
        torch.manual_seed(0)  # the RWKV init has random parts (orthogonal / uniform)
        spec = dict(layers=[1, 3], mixer=mixer, grad_checkpointing=switch == "config")
        student = convert_teacher(teacher, spec)
        student.train()
        if switch == "hf":
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        student(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()
                      if p.grad is not None})
    assert student.config.rwkv_gradient_checkpointing is False
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_chunked_and_recurrent_kernels_agree_in_float64(teacher, mixer: str) -> None:
    spec = dict(layers=[0, 1, 3], mixer=mixer, ffn="rwkv_cmix")
    student = convert_teacher(teacher, spec).double().eval()
    ids = _ids(length=37)
    with torch.no_grad():
        student.set_rwkv_kernel("chunk", chunk_size=8)
        chunked = student(ids).logits
        student.set_rwkv_kernel("recurrent")
        recurrent = student(ids).logits
    torch.testing.assert_close(chunked, recurrent, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="unknown RWKV kernel"):
        student.set_rwkv_kernel("triton")


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_right_padding_does_not_change_real_tokens(teacher, mixer: str, mode: str,
                                                   ffn: str) -> None:
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer=mixer, mode=mode, ffn=ffn)).eval()
    ids = _ids()
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[0, 12:], mask[0, 12:] = 7, 0  # arbitrary (non-zero) pad ids
    with torch.no_grad():
        both = student(padded, attention_mask=mask).logits
        alone = student(ids[:1, :12]).logits
    torch.testing.assert_close(both[0, :12], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_left_padding_leaves_no_trace_in_the_state(teacher, mixer: str, mode: str,
                                                    ffn: str) -> None:
    # all layers RWKV, so positions do not matter and the forward alone shows the state is clean
    student = convert_teacher(teacher, dict(layers="all", mixer=mixer, mode=mode, ffn=ffn)).eval()
    ids = _ids(batch=1, length=12)
    padded = torch.cat([torch.full((1, 5), 9), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        left = student(padded, attention_mask=mask).logits[:, 5:]
        alone = student(ids).logits
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)


def test_loss_and_bf16_forward(teacher) -> None:
    student = convert_teacher(teacher, dict(layers=[0, 2], mixer="rwkv7"))
    ids = _ids()
    out = student(ids, labels=ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    logits = student.to(torch.bfloat16)(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("mixer,decay_names", [("rwkv6", {"time_decay", "time_faaaa"}),
                                               ("rwkv7", {"w0"})])
def test_param_groups(teacher, mixer: str, decay_names: set[str]) -> None:
    from shared.student.param_groups import param_groups

    student = convert_teacher(teacher, dict(layers=[1, 3], mixer=mixer))
    frozen = "model.layers.0.self_attn.q_proj.weight"
    student.get_parameter(frozen).requires_grad_(False)
    groups = {g["name"]: g
              for g in param_groups(student, weight_decay=0.1, time_decay_lr_scale=2.0)}
    names = {id(p): n for n, p in student.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert {n.rsplit(".", 1)[1] for n in members["time_decay"]} == decay_names
    assert len(members["time_decay"]) == 2 * len(decay_names)  # one each in layers 1 and 3
    assert (groups["time_decay"]["weight_decay"], groups["time_decay"]["lr_scale"]) == (0.0, 2.0)
    assert all(student.get_parameter(n).ndim < 2 for n in members["no_decay"])
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr_scale"] == 1.0
    assert all(student.get_parameter(n).ndim >= 2 for n in members["decay"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["lr_scale"] == 1.0
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert set().union(*members.values()) == trainable and frozen not in trainable
