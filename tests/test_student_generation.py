"""Generation with the hybrid cache: equals recomputing the prefix, chunked prefill, padding,
O(1) state."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from shared.student import HybridRWKVCache, RWKVStateLayer, convert_teacher
from shared.tiny import tiny_teacher

COMBOS = [("block", "mlp"), ("block", "rwkv_cmix"), ("attention_only", "mlp")]
VOCAB = 101


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama", layers=3)


def _student(teacher, **spec):
    # float64: greedy ties between the cached and the uncached path cannot flip a token
    return convert_teacher(teacher, dict(layers=[0, 2], **spec)).double().eval()


def _ids(batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=None, **kwargs)


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_cached_greedy_equals_recomputing_the_prefix(teacher, mixer: str, mode: str,
                                                     ffn: str) -> None:
    student = _student(teacher, mixer=mixer, mode=mode, ffn=ffn)
    ids = _ids()
    cached = _greedy(student, ids, return_dict_in_generate=True)
    uncached = _greedy(student, ids, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    assert isinstance(cached.past_key_values, HybridRWKVCache)
    # the last token is not fed back
    assert cached.past_key_values.get_seq_length() == ids.shape[1] + 7


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_cached_greedy_other_bases(kind: str) -> None:
    student = convert_teacher(tiny_teacher(kind), dict(layers=[1], mixer="rwkv7")).double().eval()
    ids = _ids()
    assert torch.equal(_greedy(student, ids), _greedy(student, ids, use_cache=False))


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("mode,ffn", COMBOS)
def test_chunked_prefill_equals_prefill_at_once(teacher, mixer: str, mode: str, ffn: str) -> None:
    student = _student(teacher, mixer=mixer, mode=mode, ffn=ffn)
    ids = _ids(length=23)
    with torch.no_grad():
        whole_cache = HybridRWKVCache(student.config)
        whole = student(ids, past_key_values=whole_cache, use_cache=True).logits
        cache = HybridRWKVCache(student.config)
        parts = [student(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                 for a, b in ((0, 9), (9, 10), (10, 23))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-10)
    for mine, ref in zip(cache.layers, whole_cache.layers, strict=True):
        if isinstance(ref, RWKVStateLayer):
            for name in ("att_shift", "wkv", "ffn_shift"):
                a, b = getattr(mine, name), getattr(ref, name)
                assert (a is None) == (b is None) == (name == "ffn_shift" and ffn == "mlp")
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(mine.keys, ref.keys, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_left_padded_batch_generation_equals_single_sequences(teacher, mixer: str) -> None:
    student = _student(teacher, mixer=mixer, ffn="rwkv_cmix")
    ids = _ids(length=13)
    short = ids[0, :8]
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), ids[1]])
    mask = (torch.arange(13) >= 5).long().unsqueeze(0).repeat(2, 1)
    mask[1] = 1
    together = _greedy(student, batch, attention_mask=mask)
    assert torch.equal(together[0, 5:], _greedy(student, short[None])[0])
    assert torch.equal(together[1], _greedy(student, ids[1:])[0])


def test_rwkv_state_does_not_grow(teacher) -> None:
    student = convert_teacher(teacher, dict(layers="all", mixer="rwkv7", ffn="rwkv_cmix")).eval()
    cache = HybridRWKVCache(student.config)
    sizes = []
    with torch.no_grad():
        student(_ids(batch=1, length=16), past_key_values=cache, use_cache=True)
        for _ in range(5):
            student(_ids(batch=1, length=1), past_key_values=cache, use_cache=True)
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1 and cache.kv_nbytes() == 0
    # state per layer: two token shifts (fp32) + a [H, K, V] fp32 WKV state
    heads, hs, c = 4, 16, 64
    assert sizes[0] == 3 * (2 * c * 4 + heads * hs * hs * 4)
    assert cache.get_seq_length() == 21


def test_beam_search_and_cache_handling(teacher) -> None:
    student = _student(teacher, mixer="rwkv6")
    ids = _ids(batch=1)
    beams = dict(num_beams=3, num_return_sequences=2)
    assert torch.equal(_greedy(student, ids, **beams),
                       _greedy(student, ids, use_cache=False, **beams))
    # an empty transformers cache is swapped for ours; a used one is refused
    out = student(ids, past_key_values=DynamicCache(), use_cache=True)
    assert isinstance(out.past_key_values, HybridRWKVCache)
    used = DynamicCache()
    used.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="HybridRWKVCache"):
        student(ids, past_key_values=used, use_cache=True)
