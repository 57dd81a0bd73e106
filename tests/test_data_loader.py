"""The prepared data's readers (shared/data_loader.py, shared/data_card.py): collate, bucket
sampler, resume, validation batches, fingerprint."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from shared.data_card import FingerprintMismatch, check_tokenizer_fingerprint
from shared.data_loader import (
    BucketBatchSampler,
    MixedBatches,
    TrainBatches,
    collate,
    validation_batches,
)
from shared.fingerprint import tokenizer_fingerprint
from test_data_fixtures import prep, write_jsonl


def test_collate_pads_from_lengths_never_from_token_values(tokenizer):
    eos = tokenizer.eos_token_id
    rows = [{"input_ids": [7, 8, eos, 9, eos], "labels": [8, eos, -100, eos, -100], "length": 5},
            {"input_ids": [7, eos], "labels": [eos, -100], "length": 2}]
    batch = collate(rows, pad_token_id=eos, pad_to_multiple_of=4)  # pad id == EOS on purpose
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 2 + [0] * 6]
    assert batch["labels"][0].tolist() == [8, eos, -100, eos, -100, -100, -100, -100]
    assert batch["labels"][1, 0] == eos  # EOS trained, padding not
    assert batch["lengths"].tolist() == [5, 2]


def test_collate_continues_position_ids_into_padding():
    rows = {"input_ids": [[1, 2, 3], [4]], "labels": [[2, -100, -100], [-100]], "length": [3, 1],
            "position_ids": [[0, 0, 1], [0]]}
    batch = collate(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]


def test_sampler_ranks_stay_in_step():
    sizes = [10, 3, 25, 0, 7]
    for remainder in ("drop", "wrap"):
        samplers = [BucketBatchSampler(sizes, 2, world_size=3, rank=r, seed=5, remainder=remainder)
                    for r in range(3)]
        plans = [s.plan(0) for s in samplers]
        assert len({len(p) for p in plans}) == 1 and len(plans[0]) == len(samplers[0])
        for step in zip(*plans, strict=True):
            assert len({b for b, _ in step}) == 1  # same bucket on every rank at every step
            assert all(len(idx) == 2 for _, idx in step)
        seen = [(b, int(i)) for plan in plans for b, idx in plan for i in idx]
        if remainder == "drop":
            assert len(seen) == len(set(seen))
        else:
            assert set(seen) == {(b, i) for b, n in enumerate(sizes) for i in range(n)}
        next_epoch = [(b, i.tolist()) for b, i in samplers[0].plan(1)]
        assert next_epoch != [(b, i.tolist()) for b, i in plans[0]]


def test_sampler_resume_gives_exactly_the_next_batches():
    sampler = BucketBatchSampler([13, 9, 30], 2, world_size=2, rank=1, seed=11)
    stream = iter(sampler)
    first = [next(stream) for _ in range(4)]
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON checkpoint
    rest = [(b, i.tolist()) for b, i in stream]
    rest += [(b, i.tolist()) for b, i in sampler]  # + next epoch
    resumed = BucketBatchSampler([13, 9, 30], 2, world_size=2, rank=1, seed=11)
    resumed.load_state_dict(state)
    again = [(b, i.tolist()) for b, i in resumed] + [(b, i.tolist()) for b, i in resumed]
    assert again == rest and len(first) == 4
    with pytest.raises(ValueError, match="micro_batch_size"):
        BucketBatchSampler([13, 9, 30], 4, world_size=2, rank=1, seed=11).load_state_dict(state)


def test_max_len_cuts_rows_and_their_positions(packed_dir):
    rows = {"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "labels": [[2, 3, -100, 5, -100], [7, -100]],
            "length": [5, 2], "position_ids": [[0, 1, 2, 0, 1], [0, 1]]}
    batch = collate(rows, pad_token_id=0, max_len=4)  # the trainer's data.max_len
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, -100, 5], [7, -100, -100, -100]]  # real next
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert batch["lengths"].tolist() == [4, 2]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    longest = max(b["input_ids"].shape[1] for b in TrainBatches(packed_dir, 2))
    assert longest > 8
    for b in TrainBatches(packed_dir, 2, max_len=8):
        assert b["input_ids"].shape[1] <= 8 and int(b["lengths"].max()) <= 8
    for b in validation_batches(packed_dir, 2, max_len=8):
        assert b["input_ids"].shape[1] <= 8


def test_train_batches_resume_and_fingerprint(packed_dir, tok_dir):
    fingerprint = tokenizer_fingerprint(tok_dir)
    batches = TrainBatches(packed_dir, micro_batch_size=2, seed=3, expected_fingerprint=fingerprint)
    stream = iter(batches)
    next(stream), next(stream)
    state = batches.state_dict()
    expected = [b["input_ids"] for b in stream]
    resumed = TrainBatches(packed_dir, micro_batch_size=2, seed=3)
    resumed.load_state_dict(state)
    got = [b["input_ids"] for b in resumed]
    assert len(got) == len(expected) > 0
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))
    assert batches.epoch == 1 and resumed.epoch == 1
    with pytest.raises(FingerprintMismatch) as err:
        check_tokenizer_fingerprint(packed_dir, "0123456789abcdef")
    assert fingerprint in str(err.value) and "0123456789abcdef" in str(err.value)
    assert "--tokenizer" in str(err.value)
    with pytest.raises(FingerprintMismatch):
        TrainBatches(packed_dir, micro_batch_size=2, expected_fingerprint="0123456789abcdef")


def test_validation_batches_cover_every_sample_once(packed_dir):
    seen = Counter()
    counts = []
    for rank in range(2):
        batches = list(validation_batches(packed_dir, micro_batch_size=2, world_size=2, rank=rank))
        counts.append(len(batches))
        for batch in batches:
            for ids, real in zip(batch["input_ids"], batch["sample_mask"], strict=True):
                if real:
                    seen[tuple(ids.tolist())] += 1
    assert counts[0] == counts[1] and sum(seen.values()) == 3 and set(seen.values()) == {1}


@pytest.fixture(scope="module")
def other_dir(tok_dir, tmp_path_factory):
    """A second dataset, unpacked rows of other text: its batches have no position_ids."""
    tmp = tmp_path_factory.mktemp("other")
    write_jsonl(tmp / "b.jsonl", [{"text": f"Another text number {i}."} for i in range(30)])
    prep("text", "--paths", tmp / "b.jsonl", "--tokenizer", tok_dir, "--output_dir", tmp / "out",
         "--max_len", 32)
    return tmp / "out"


def test_mixed_batches_draw_by_weight_alike_on_every_rank_and_resume_exactly(packed_dir,
                                                                             other_dir):
    def mixed(rank: int = 0, weights=(3, 1)) -> MixedBatches:
        return MixedBatches([TrainBatches(d, micro_batch_size=1, world_size=2, rank=rank, seed=3,
                                          remainder="wrap") for d in (packed_dir, other_dir)],
                            weights, seed=3)

    def source(batch) -> str:  # packed rows carry position_ids, the other dataset's do not
        return "packed" if "position_ids" in batch else "other"

    one, two = mixed(0).forever(), mixed(1).forever()
    drawn = [(source(next(one)), source(next(two))) for _ in range(400)]
    assert all(a == b for a, b in drawn)  # every rank takes the same dataset at every step
    share = sum(a == "packed" for a, _ in drawn) / len(drawn)
    assert 0.68 < share < 0.82  # 3 : 1 (the datasets' own epochs wrap many times over)
    # resume: the state before batch 7 gives exactly batches 7, 8, ... again
    run = mixed()
    stream = run.forever()
    for _ in range(7):
        next(stream)
    state = run.state_dict()
    expected = [next(stream)["input_ids"] for _ in range(25)]
    resumed = mixed()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    again = resumed.forever()
    assert all(torch.equal(next(again)["input_ids"], x) for x in expected)
    with pytest.raises(ValueError, match="now 2 with"):
        mixed(weights=(1, 1)).load_state_dict(state)
    with pytest.raises(ValueError, match="trained on a mix of 2 datasets"):
        TrainBatches(packed_dir, micro_batch_size=1, world_size=2, seed=3,
                     remainder="wrap").load_state_dict(state)
    with pytest.raises(ValueError, match="one positive weight per dataset"):
        mixed(weights=(1, 0))


@pytest.mark.parametrize("pad_to_multiple_of, max_len", [(1, None), (8, None), (1, 6)])
def test_numpy_rows_collate_to_the_batches_lists_give(packed_dir, pad_to_multiple_of, max_len):
    """PreparedSplit.rows reads numpy arrays (2-D where a micro batch's rows are equally long,
    one copy per column); collate makes of them exactly what it makes of the same rows as
    Python lists, for every micro batch of a prepared dataset, ragged and equal rows both."""
    import numpy as np

    batches = TrainBatches(packed_dir, 2, max_len=max_len, pad_to_multiple_of=pad_to_multiple_of)
    data, seen_ragged = batches.data, 0
    for bucket, indices in batches.sampler:
        arrays = data.rows(bucket, indices)
        lists = data.buckets[bucket][[int(i) for i in indices]]
        assert isinstance(arrays["input_ids"], np.ndarray)
        seen_ragged += arrays["input_ids"].ndim == 1  # an object array of rows
        got = collate(arrays, data.pad_token_id, pad_to_multiple_of, max_len)
        want = collate(lists, data.pad_token_id, pad_to_multiple_of, max_len)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert seen_ragged  # the per-row path ran; the 2-D one below
    rows = {"input_ids": np.array([[1, 2, 3], [4, 5, 6]]), "labels": np.array([[2, 3, -100]] * 2),
            "length": np.array([3, 3]), "position_ids": np.array([[0, 1, 0], [0, 1, 2]])}
    batch = collate(rows, pad_token_id=0, pad_to_multiple_of=4)  # equal rows, padded
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 3]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 0]]
    assert batch["labels"].tolist() == [[2, 3, -100, -100]] * 2
