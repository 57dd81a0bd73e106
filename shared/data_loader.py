"""Reader side: load a prepared dataset, sample batches bucket by bucket, pad, resume.

    from shared.data_card import check_tokenizer_fingerprint
    from shared.data_loader import TrainBatches, validation_batches

    check_tokenizer_fingerprint(data_dir, teacher_manifest_fingerprint)   # refuse a mismatch
    batches = TrainBatches(data_dir, micro_batch_size=8, world_size=ws, rank=rank, seed=1234)
    batches.load_state_dict(saved)            # optional: continue with exactly the next batch
    mixed = MixedBatches([batches, other], weights=[3, 1], seed=1234)   # several datasets
    while batches.epoch < epochs:
        for batch in batches:                  # one (rest of an) epoch of this rank's batches
            ...                                # batch: input_ids, labels, attention_mask, lengths
            saved = batches.state_dict()

Every rank computes the same global plan from the seed and takes its slice, so all ranks get
the same number of batches per epoch and the same length bucket at every step (DeepSpeed
ranks stay in step, padding stays small). Padding masks come from the stored lengths, never
from token values: EOS is a real token even when the pad id equals it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data_card import check_tokenizer_fingerprint, read_card
from shared.labels import IGNORE


class PreparedSplit:
    """All length buckets of one split of a prepared dataset (memory-mapped, nothing loaded)."""

    def __init__(self, dataset_dir: str | Path, split: str = "train") -> None:
        import datasets

        self.root = Path(dataset_dir)
        self.card = read_card(self.root)
        if split not in self.card["splits"]:
            raise KeyError(f"{self.root} has no {split!r} split (it has: "
                           f"{', '.join(self.card['splits']) or 'none'})")
        self.split = split
        self.bucket_info = [b for b in self.card["splits"][split]["buckets"] if b["path"]]
        self.buckets = [datasets.load_from_disk(str(self.root / b["path"]))
                        for b in self.bucket_info]
        # rows read as numpy arrays: a micro batch of 32 x 1024 filled rows took 11.9 ms to read
        # and collate from Python lists (one torch.as_tensor per list) on a 2-core CPU, in the
        # training step's own thread; 1.8 ms so (benchmarks/bench_loader.py, BENCHMARKS.md
        # 2026-12-04)
        self._arrays = [bucket.with_format("numpy") for bucket in self.buckets]
        self.pad_token_id = int(self.card["tokenizer"]["pad_token_id"])

    @property
    def bucket_sizes(self) -> list[int]:
        return [len(b) for b in self.buckets]

    def __len__(self) -> int:
        return sum(self.bucket_sizes)

    def rows(self, bucket: int, indices: Sequence[int]) -> dict[str, Sequence]:
        """Columns of the given rows of one bucket: per column one numpy array per row (a 2-D
        array where the rows are equally long)."""
        return self._arrays[bucket][[int(i) for i in indices]]


class BucketBatchSampler:
    """Deterministic, resumable per-rank batches; each batch comes from a single bucket.

    Epoch e: every bucket is shuffled with ``default_rng([seed, e])`` and cut into global
    batches of ``micro_batch_size * world_size``; the global batches of all buckets are then
    shuffled together and rank r takes rows [r*mbs, (r+1)*mbs) of each. A bucket's remainder
    (less than one global batch) is dropped (``remainder="drop"``) or filled by cycling the
    bucket's own permutation (``"wrap"``), identically on every rank.
    Yields ``(bucket, indices)``.
    """

    def __init__(self, bucket_sizes: Sequence[int], micro_batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True,
                 remainder: str = "drop") -> None:
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("need micro_batch_size >= 1, world_size >= 1 and "
                             "0 <= rank < world_size")
        if remainder not in ("drop", "wrap"):
            raise ValueError("remainder must be 'drop' or 'wrap'")
        self.bucket_sizes = [int(n) for n in bucket_sizes]
        self.micro_batch_size, self.world_size, self.rank = micro_batch_size, world_size, rank
        self.seed, self.shuffle, self.remainder = seed, shuffle, remainder
        self.epoch = 0
        self.position = 0  # batches of ``epoch`` already handed out
        self._plan_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        if len(self) == 0:
            raise ValueError(f"no full batch: buckets hold {self.bucket_sizes} samples but one "
                             f"step needs {micro_batch_size * world_size} from a single bucket; "
                             "use remainder='wrap', a smaller batch, or wider buckets")

    def _global_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        size = self.micro_batch_size * self.world_size
        batches: list[tuple[int, np.ndarray]] = []
        for bucket, n in enumerate(self.bucket_sizes):
            if n == 0:
                continue
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.remainder == "wrap" and n % size:
                order = np.resize(order, -(-n // size) * size)  # np.resize cycles the array
            for start in range(0, len(order) - size + 1, size):
                batches.append((bucket, order[start:start + size]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's batches of ``epoch``."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            lo = self.rank * self.micro_batch_size
            mine = [(b, idx[lo:lo + self.micro_batch_size])
                    for b, idx in self._global_batches(epoch)]
            self._plan_cache = (epoch, mine)
        return self._plan_cache[1]

    def __len__(self) -> int:
        size = self.micro_batch_size * self.world_size
        if self.remainder == "wrap":
            return sum(-(-n // size) for n in self.bucket_sizes)
        return sum(n // size for n in self.bucket_sizes)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """The rest of the current epoch; the epoch counter moves on when it is exhausted."""
        plan = self.plan(self.epoch)
        while self.position < len(plan):
            batch = plan[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Same on every rank: save it from any one of them."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "world_size": self.world_size,
                "bucket_sizes": list(self.bucket_sizes), "shuffle": self.shuffle,
                "remainder": self.remainder}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "mixed" in state:
            raise ValueError("cannot resume exactly: the checkpoint was trained on a mix of "
                             f"{len(state['sources'])} datasets (data.mix_dirs), now on one")
        for key in ("seed", "micro_batch_size", "world_size", "bucket_sizes", "shuffle",
                    "remainder"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"cannot resume exactly: saved {key}={state[key]!r}, now "
                                 f"{self.state_dict()[key]!r} (the batch order would change)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(rows: Mapping[str, Sequence] | Sequence[Mapping[str, Any]], pad_token_id: int,
            pad_to_multiple_of: int = 1, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with ``pad_token_id``, labels with -100.

    ``attention_mask`` (1 real, 0 pad) is built from the ``length`` column, never from token
    values. ``position_ids`` (packed datasets) continue counting into the padding so padding
    never looks like a new document start. ``max_len`` (the trainer's ``data.max_len``) cuts
    longer rows to their first ``max_len`` tokens; the last one kept keeps its real next token
    as its label, as a cut document does in the data (shared/labels.py).
    """
    if not isinstance(rows, Mapping):
        rows = {key: [row[key] for row in rows] for key in rows[0]}
    stored = [int(n) for n in rows["length"]]
    lengths = torch.tensor([min(n, max_len or n) for n in stored], dtype=torch.long)
    width = int(lengths.max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    has_positions = "position_ids" in rows
    positions = torch.arange(width).repeat(batch, 1) if has_positions else None
    if _equal_rows(rows, stored, has_positions):  # a 2-D array per column: no per-row copies
        n = int(lengths[0])
        input_ids[:, :n] = torch.from_numpy(rows["input_ids"][:, :n])
        labels[:, :n] = torch.from_numpy(rows["labels"][:, :n])
        if positions is not None:
            pos = torch.from_numpy(rows["position_ids"][:, :n]).long()
            positions[:, :n] = pos
            positions[:, n:] = pos[:, -1:] + 1 + torch.arange(width - n)
    else:
        for i in range(batch):
            n = int(lengths[i])
            if len(rows["input_ids"][i]) != stored[i] or len(rows["labels"][i]) != stored[i]:
                raise ValueError(f"row {i}: length column {stored[i]} does not match its "
                                 "input_ids/labels")
            input_ids[i, :n] = torch.as_tensor(rows["input_ids"][i][:n], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(rows["labels"][i][:n], dtype=torch.long)
            if positions is not None:
                pos = torch.as_tensor(rows["position_ids"][i][:n], dtype=torch.long)
                positions[i, :n] = pos
                positions[i, n:] = pos[-1] + 1 + torch.arange(width - n)
    out = {"input_ids": input_ids, "labels": labels,
           "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
           "lengths": lengths}
    if positions is not None:
        out["position_ids"] = positions
    return out


def _equal_rows(rows: Mapping[str, Sequence], stored: list[int], has_positions: bool) -> bool:
    """Whether every column is one 2-D array whose rows are all ``length`` long (numpy rows of
    equally long samples: PreparedSplit.rows), so collate copies each column at once."""
    columns = ["input_ids", "labels", *(["position_ids"] if has_positions else [])]
    return all(isinstance(rows[c], np.ndarray) and rows[c].ndim == 2
               and rows[c].shape == (len(stored), stored[0]) for c in columns) \
        and all(n == stored[0] for n in stored)


class TrainBatches:
    """What the trainer iterates: sampler + memory-mapped buckets + collate, in-process.

    Rows are read in the training process itself (no DataLoader worker prefetch), so
    ``state_dict()`` always describes exactly the batches handed out so far.
    """

    def __init__(self, dataset_dir: str | Path, micro_batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, split: str = "train", shuffle: bool = True,
                 remainder: str = "drop", pad_to_multiple_of: int = 1,
                 expected_fingerprint: str | None = None, max_len: int | None = None) -> None:
        if expected_fingerprint is not None:
            check_tokenizer_fingerprint(dataset_dir, expected_fingerprint)
        self.data = PreparedSplit(dataset_dir, split)
        self.sampler = BucketBatchSampler(self.data.bucket_sizes, micro_batch_size, world_size,
                                          rank, seed, shuffle, remainder)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_len = max_len  # rows cut to it (collate)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for bucket, indices in self.sampler:
            yield collate(self.data.rows(bucket, indices), self.data.pad_token_id,
                          self.pad_to_multiple_of, self.max_len)

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches across epoch boundaries, for step-based training."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class MixedBatches:
    """Micro batches of several prepared datasets, each batch whole from one of them.

    Batch k comes from dataset i with probability ``weights[i] / sum(weights)``, drawn from
    ``default_rng([seed, MIX_STREAM, k])``: the same choice on every rank (so ranks stay in
    step), and a resumed run draws exactly what one run would. Each dataset keeps its own
    sampler (its epochs and order), so its batches keep one length bucket. The interface is
    TrainBatches' (``data`` is the dataset the last batch came from, for error messages).
    """

    MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from the samplers' own

    def __init__(self, sources: Sequence[TrainBatches], weights: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        if not sources:
            raise ValueError("MixedBatches needs at least one dataset")
        weights = [1.0] * len(sources) if not weights else [float(w) for w in weights]
        if len(weights) != len(sources) or not all(w > 0 for w in weights):
            raise ValueError(f"need one positive weight per dataset: {len(sources)} datasets, "
                             f"weights {list(weights)}")
        self.sources, self.seed = list(sources), seed
        self.weights = weights
        self.shares = [w / sum(weights) for w in weights]
        self.cumulative = np.cumsum(self.shares)
        self.position = 0  # batches handed out
        self.data = self.sources[0].data
        self._iterators: list[Iterator[dict[str, torch.Tensor]]] | None = None

    @property
    def epoch(self) -> int:
        return self.sources[0].epoch

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def source_of(self, k: int) -> int:
        """Which dataset batch ``k`` comes from."""
        draw = np.random.default_rng([self.seed, self.MIX_STREAM, k]).random()
        return min(int(np.searchsorted(self.cumulative, draw, side="right")),
                   len(self.sources) - 1)

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self._iterators is None:  # (after load_state_dict) each source from its state
                self._iterators = [s.forever() for s in self.sources]
            i = self.source_of(self.position)
            batch = next(self._iterators[i])
            self.position += 1
            self.data = self.sources[i].data
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"mixed": self.position, "weights": list(self.weights),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "mixed" not in state:
            raise ValueError("cannot resume exactly: the checkpoint was trained on one dataset, "
                             "now data.mix_dirs adds more (the batch order would change)")
        if len(state["sources"]) != len(self.sources) or state["weights"] != self.weights:
            raise ValueError(f"cannot resume exactly: the checkpoint mixed "
                             f"{len(state['sources'])} datasets with weights {state['weights']}, "
                             f"now {len(self.sources)} with {self.weights} (data.mix_dirs, "
                             "data.mix_weights; the batch order would change)")
        for source, saved in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(saved)
        self.position = int(state["mixed"])
        self._iterators = None


def validation_batches(dataset_dir: str | Path, micro_batch_size: int, world_size: int = 1,
                       rank: int = 0, split: str = "validation", pad_to_multiple_of: int = 1,
                       max_len: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every validation sample once, in order, bucket by bucket, sharded over ranks.

    All ranks get the same number of batches: the last global batch of a bucket is filled by
    repeating samples, flagged ``sample_mask == 0`` so metrics can leave them out.
    """
    data = PreparedSplit(dataset_dir, split)
    size = micro_batch_size * world_size
    for bucket, n in enumerate(data.bucket_sizes):
        for start in range(0, n, size):
            idx = np.arange(start, start + size)
            real = idx < n
            lo = rank * micro_batch_size
            idx, real = idx[lo:lo + micro_batch_size], real[lo:lo + micro_batch_size]
            batch = collate(data.rows(bucket, np.where(real, idx, idx % n)), data.pad_token_id,
                            pad_to_multiple_of, max_len)
            batch["sample_mask"] = torch.as_tensor(real, dtype=torch.long)
            yield batch
