"""RAD-RWKV7 (``student.rwkv7_variant: rad``, RADLADS): no token shift, no bonus term, the
teacher's RoPE on receptance and key. Its layers read positions, so everything that moves
positions around is checked: cached decoding, packed documents (positions restart), the
teacher-forced align pass, and a saved export."""
from __future__ import annotations

import pytest
import torch

from shared.student import HybridRWKVCache, convert_teacher, load_student, save_student
from shared.tiny import tiny_teacher

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 101


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama", layers=3, vocab=VOCAB)


def rad_student(teacher, layers="all", **spec):
    torch.manual_seed(0)
    return convert_teacher(teacher, dict(layers=layers, mixer="rwkv7", rwkv7_variant="rad",
                                         **spec)).eval()


def ids(length: int = 21, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_rad_layers_have_no_token_shift_or_bonus_parameters(teacher) -> None:
    names = [n for n, _ in rad_student(teacher).named_parameters()]
    x070 = [n for n, _ in convert_teacher(teacher, dict(layers="all", mixer="rwkv7"))
            .named_parameters()]
    gone = sorted(set(x070) - set(names))
    assert gone and all(n.rsplit(".", 1)[1] in {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"}
                        for n in gone), gone
    assert not set(names) - set(x070)


def test_positions_matter_to_rad_and_not_to_x070(teacher) -> None:
    """With every layer RWKV, only RoPE can make the output depend on absolute positions."""
    x = ids()
    shifted = torch.arange(5, 5 + x.shape[1]).unsqueeze(0)
    with torch.no_grad():
        x070 = convert_teacher(teacher, dict(layers="all", mixer="rwkv7")).eval()
        torch.testing.assert_close(x070(x).logits, x070(x, position_ids=shifted).logits)
        rad = rad_student(teacher)
        assert not torch.allclose(rad(x).logits, rad(x, position_ids=shifted).logits, atol=1e-4)


@pytest.mark.parametrize("layers", ["all", [0, 2]])
def test_cached_decoding_equals_the_full_forward(teacher, layers) -> None:
    student = rad_student(teacher, layers)
    x = ids()
    with torch.no_grad():
        full = student(x, use_cache=False).logits
        cache = HybridRWKVCache(student.config)
        parts = [student(x[:, :12], past_key_values=cache, use_cache=True).logits]
        for t in range(12, x.shape[1]):  # one token at a time: the recurrent path
            parts.append(student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["per_document", "segments"])
def test_packed_documents_start_at_position_zero(teacher, layout: str) -> None:
    student = rad_student(teacher, [0, 2])
    student.model.packed_layout = layout
    lengths = [7, 9, 5]
    x = ids(sum(lengths), batch=1)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed = student(x, position_ids=positions, use_cache=False).logits[0]
        at = 0
        for n in lengths:
            alone = student(x[:, at:at + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[at:at + n], alone, rtol=1e-5, atol=1e-5)
            at += n


def test_align_forward_uses_positions_and_trains_the_mixers(teacher) -> None:
    student = rad_student(teacher, [0, 2]).train()
    gen = torch.Generator().manual_seed(3)
    states = {i: torch.randn(2, 15, 64, generator=gen) for i in (0, 2)}
    outs = student.align_forward(states)
    offset = torch.arange(3, 18).unsqueeze(0)
    moved = student.align_forward(states, position_ids=offset)
    assert not torch.allclose(outs[2], moved[2], atol=1e-5)
    sum(o.square().mean() for o in outs.values()).backward()
    mixers = set(student.mixer_parameter_names())
    grads = {n: p.grad for n, p in student.named_parameters() if n in mixers}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_a_saved_rad_student_loads_as_itself(teacher, tmp_path) -> None:
    student = rad_student(teacher, [1])
    save_student(student, None, tmp_path / "rad")
    loaded = load_student(tmp_path / "rad").eval()
    assert loaded.config.rwkv7_variant == "rad"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, student(ids()).logits)


def test_rad_is_a_variant_of_rwkv7_only(teacher) -> None:
    with pytest.raises(ValueError, match="variant of the rwkv7 mixer.*set mixer: rwkv7"):
        convert_teacher(teacher, dict(layers=[1], mixer="rwkv6", rwkv7_variant="rad"))


def test_untied_embeddings_start_as_the_teacher_s_and_train_apart(tmp_path) -> None:
    """student.untie_embeddings (RADLADS): a tied teacher's student gets its own lm_head."""
    tied = tiny_teacher("llama", layers=2, vocab=VOCAB, tie_word_embeddings=True)
    student = convert_teacher(tied, dict(layers=[1], mixer="rwkv7", untie_embeddings=True))
    head, embed = student.lm_head.weight, student.model.embed_tokens.weight
    assert not student.config.tie_word_embeddings and head.data_ptr() != embed.data_ptr()
    torch.testing.assert_close(head, tied.get_input_embeddings().weight, rtol=0, atol=0)
    kept = convert_teacher(tied, dict(layers=[1], mixer="rwkv7"))
    assert kept.lm_head.weight.data_ptr() == kept.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        head.add_(1.0)
    assert not torch.equal(head, embed)
    save_student(student, None, tmp_path / "untied")
    loaded = load_student(tmp_path / "untied")
    torch.testing.assert_close(loaded.lm_head.weight, head)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, embed)
