"""Main-process side of a data run: pack, hold out validation, bucket, write, card.

Samples arrive from the workers in input order. Each one goes through an optional packer
(several documents per sequence, ``position_ids`` restarting at 0 at every document start),
then a validation hold-out, then into the writer of its (split, length bucket). Writers
append Arrow record batches to stream files, so memory stays flat however large the corpus;
at the end every file becomes a ``datasets`` directory (save_to_disk) and ``card.json`` is
written last: a directory without a card is an interrupted run.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from shared.data_card import CARD_NAME, write_card
from shared.labels import IGNORE

from .process import ChunkResult, WorkerConfig, process_chunks
from .sources import DataError, RawChunk


@dataclass
class BuildOptions:
    output_dir: Path
    max_len: int
    pack: bool = False
    pack_fill: bool = False  # with pack: rows filled to max_len, documents cut at row ends
    bucket_width: int | None = None
    validation_fraction: float = 0.0
    validation_size: int = 0
    seed: int = 0
    num_proc: int = 1
    overwrite: bool = False
    max_shard_size: str = "500MB"


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to mix runs; only ever delete a directory that an earlier run of ours wrote."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise DataError(f"--output_dir {path} is not empty; pass --overwrite to replace it")
        if not (path / CARD_NAME).is_file() and not (path / ".tmp").is_dir():
            raise DataError(f"--output_dir {path} is not empty and was not written by this tool "
                            "(no card.json); refusing to delete it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


class Packer:
    """Greedy in-order packing of documents into sequences of at most ``max_len``.

    Whole documents by default: a document that does not fit starts the next row, so rows end
    short (91 % full on average for 1024-token rows of the quality corpus). ``fill``: every row
    but the last is exactly ``max_len``; a document that does not fit is cut, its first piece
    ending this row (its last label the real next token) and the rest starting the next one as
    a new segment (positions from 0: the student's state resets there, as for a long document
    split by ``--long_docs split``). Why: padding is compute a packed step spends on nothing.
    """

    def __init__(self, max_len: int, fill: bool = False) -> None:
        self.max_len = max_len
        self.fill = fill
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        out = []
        if self.fill:
            while self.size + len(ids) > self.max_len:
                room = self.max_len - self.size  # > 0: a full row is flushed at once below
                self.parts.append((ids[:room], labels[:room]))
                self.size += room
                out.append(self.flush())
                ids, labels = ids[room:], labels[room:]
            if len(ids):
                self.parts.append((ids, labels))
                self.size += len(ids)
            if self.size == self.max_len:
                out.append(self.flush())
            return out
        if self.parts and self.size + len(ids) > self.max_len:
            out.append(self.flush())
        self.parts.append((ids, labels))
        self.size += len(ids)
        return out

    def flush(self) -> tuple[np.ndarray, ...]:
        ids = np.concatenate([p[0] for p in self.parts])
        labels = np.concatenate([p[1] for p in self.parts])
        # position_ids restart at every document: the trainer derives cu_seqlens / RWKV
        # state resets from the zeros.
        positions = np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in self.parts])
        self.parts, self.size = [], 0
        return ids, labels, positions


class Holdout:
    """Routes train-bound samples to validation: seeded Bernoulli(fraction) or reservoir(size).

    The reservoir keeps exactly ``size`` uniformly chosen samples in memory (size x max_len
    tokens at most) and sends every evicted one on to train, so the stream stays one pass.
    """

    def __init__(self, fraction: float, size: int, seed: int) -> None:
        if fraction and size:
            raise DataError("give --validation_fraction or --validation_size, not both")
        if not 0.0 <= fraction < 1.0:
            raise DataError("--validation_fraction must be in [0, 1)")
        self.fraction, self.size = fraction, size
        self.rng = random.Random(seed)
        self.reservoir: list[tuple[np.ndarray, ...]] = []
        self.seen = 0

    def route(self, sample: tuple[np.ndarray, ...]) -> list[tuple[str, tuple[np.ndarray, ...]]]:
        if self.fraction:
            return [("validation" if self.rng.random() < self.fraction else "train", sample)]
        if not self.size:
            return [("train", sample)]
        self.seen += 1
        if len(self.reservoir) < self.size:
            self.reservoir.append(sample)
            return []
        slot = self.rng.randrange(self.seen)
        if slot < self.size:
            evicted, self.reservoir[slot] = self.reservoir[slot], sample
            return [("train", evicted)]
        return [("train", sample)]

    def finish(self) -> list[tuple[str, tuple[np.ndarray, ...]]]:
        out = [("validation", s) for s in self.reservoir]
        self.reservoir = []
        return out


def bucket_bounds(bucket: int, width: int | None, max_len: int) -> tuple[int, int]:
    if width is None:
        return 1, max_len
    return bucket * width + 1, min((bucket + 1) * width, max_len)


def bucket_name(lo: int, hi: int) -> str:
    return f"len_{lo:05d}_{hi:05d}"


class BucketWriter:
    """Appends samples of one (split, bucket) to an Arrow stream file in batches."""

    def __init__(self, path: Path, packed: bool, rows_per_batch: int = 1024) -> None:
        self.path = path
        self.packed = packed
        self.rows_per_batch = rows_per_batch
        self.buffer: list[tuple[np.ndarray, ...]] = []
        self.rows = self.tokens = self.trained = 0
        fields = [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                  ("length", pa.int32())]
        if packed:
            fields.append(("position_ids", pa.list_(pa.int32())))
        self.schema = pa.schema(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def add(self, sample: tuple[np.ndarray, ...]) -> None:
        self.buffer.append(sample)
        self.rows += 1
        self.tokens += len(sample[0])
        self.trained += int((sample[1] != IGNORE).sum())
        if len(self.buffer) >= self.rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        lengths = np.fromiter((len(s[0]) for s in self.buffer), dtype=np.int32,
                              count=len(self.buffer))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

        def column(i: int) -> pa.Array:
            values = pa.array(np.concatenate([s[i] for s in self.buffer]))
            return pa.ListArray.from_arrays(offsets, values)

        arrays = [column(0), column(1), pa.array(lengths)]
        if self.packed:
            arrays.append(column(2))
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.buffer = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.sink.close()


@dataclass
class Stats:
    samples_in: int = 0
    docs_out: int = 0
    truncated: int = 0
    prefix_fallbacks: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    tags: Counter = field(default_factory=Counter)

    def update(self, result: ChunkResult) -> None:
        self.samples_in += result.n_in
        self.docs_out += len(result.samples)
        self.truncated += result.truncated
        self.prefix_fallbacks += result.prefix_fallbacks
        self.dropped.update(result.dropped)
        self.tags.update(result.tags)
        for reason, text in result.examples.items():
            self.examples.setdefault(reason, text)


def build(chunks: Iterable[RawChunk], config: WorkerConfig, options: BuildOptions,
          card: dict[str, Any], total: int | None = None, desc: str = "tokenise") -> dict[str, Any]:
    """Run the whole pipeline; return the card (also written to OUTPUT/card.json)."""
    from tqdm.auto import tqdm

    out = Path(options.output_dir)
    tmp = out / ".tmp"
    width = options.bucket_width
    if width is not None and width <= 0:
        raise DataError("--buckets must be a positive bucket width in tokens")
    writers: dict[tuple[str, int], BucketWriter] = {}
    packers: dict[str, Packer] = {}
    holdout = Holdout(options.validation_fraction, options.validation_size, options.seed)
    stats = Stats()
    started = time.time()

    def emit(split: str, sample: tuple[np.ndarray, ...]) -> None:
        for dest, item in (holdout.route(sample) if split == "train" else [(split, sample)]):
            bucket = 0 if width is None else (len(item[0]) - 1) // width
            key = (dest, bucket)
            if key not in writers:
                writers[key] = BucketWriter(tmp / dest / f"{bucket}.arrow", options.pack)
            writers[key].add(item)

    bar = tqdm(total=total, desc=desc, unit=" samples", dynamic_ncols=True, mininterval=0.5)
    for result in process_chunks(chunks, config, options.num_proc):
        stats.update(result)
        for ids, labels in result.samples:
            if options.pack:
                packer = packers.setdefault(result.split,
                                             Packer(options.max_len, options.pack_fill))
                for packed in packer.add(ids, labels):
                    emit(result.split, packed)
            else:
                emit(result.split, (ids, labels))
        bar.update(result.n_in)
        bar.set_postfix(tokens=sum(w.tokens for w in writers.values()), refresh=False)
    bar.close()
    for split, packer in packers.items():
        if packer.parts:
            emit(split, packer.flush())
    for dest, sample in holdout.finish():
        emit(dest, sample)
    for writer in writers.values():
        writer.close()

    card["splits"] = _finalise(writers, out, width, options)
    card["stats"] = {
        "samples_in": stats.samples_in,
        "samples_out": sum(w.rows for w in writers.values()),
        "documents_out": stats.docs_out,
        "tokens": sum(w.tokens for w in writers.values()),
        "trained_tokens": sum(w.trained for w in writers.values()),
        "truncated": stats.truncated,
        "dropped": dict(sorted(stats.dropped.items())),
        "drop_examples": stats.examples,
        "prefix_fallbacks": stats.prefix_fallbacks,
        "seconds": round(time.time() - started, 2),
    }
    if stats.tags:
        card["stats"]["samples_in_by_source"] = dict(stats.tags)
    shutil.rmtree(tmp, ignore_errors=True)
    write_card(out, card)
    return card


def _finalise(writers: dict[tuple[str, int], BucketWriter], out: Path, width: int | None,
              options: BuildOptions) -> dict[str, Any]:
    """Turn the stream files into save_to_disk directories; return the card's split layout."""
    import datasets
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()  # one bar of ours instead of one per bucket
    splits: dict[str, Any] = {}
    n_buckets = 1 if width is None else -(-options.max_len // width)
    for (split, bucket), writer in tqdm(sorted(writers.items()), desc="save", unit=" buckets"):
        lo, hi = bucket_bounds(bucket, width, options.max_len)
        rel = split if width is None else f"{split}/{bucket_name(lo, hi)}"
        dataset = datasets.Dataset.from_file(str(writer.path))
        dataset.save_to_disk(str(out / rel), max_shard_size=options.max_shard_size)
        del dataset
        entry = splits.setdefault(split, {"samples": 0, "tokens": 0, "trained_tokens": 0,
                                          "buckets": []})
        entry["samples"] += writer.rows
        entry["tokens"] += writer.tokens
        entry["trained_tokens"] += writer.trained
        entry["buckets"].append({"name": bucket_name(lo, hi), "path": rel, "min_len": lo,
                                 "max_len": hi, "samples": writer.rows, "tokens": writer.tokens})
    for entry in splits.values():  # list empty buckets too: the layout is part of the card
        have = {b["min_len"] for b in entry["buckets"]}
        for bucket in range(n_buckets):
            lo, hi = bucket_bounds(bucket, width, options.max_len)
            if lo not in have:
                entry["buckets"].append({"name": bucket_name(lo, hi), "path": None, "min_len": lo,
                                         "max_len": hi, "samples": 0, "tokens": 0})
        entry["buckets"].sort(key=lambda b: b["min_len"])
    if width is None:  # OUTPUT is then also a plain DatasetDict: datasets.load_from_disk(OUTPUT)
        (out / "dataset_dict.json").write_text(json.dumps({"splits": sorted(splits)}) + "\n")
    return splits


def summary_line(name: str, card: dict[str, Any]) -> str:
    """The one-line result: samples in, samples out, tokens, truncated, dropped."""
    s = card["stats"]
    per_split = " / ".join(f"{v['samples']} {k}" for k, v in sorted(card["splits"].items()))
    dropped = sum(s["dropped"].values())
    reasons = ", ".join(f"{k} {v}" for k, v in s["dropped"].items())
    return (f"{name}: {s['samples_in']} samples in, {s['samples_out']} samples out"
            f"{f' ({per_split})' if per_split else ''}, {s['tokens']} tokens "
            f"({s['trained_tokens']} trained), {s['truncated']} truncated, {dropped} dropped"
            f"{f' ({reasons})' if reasons else ''}")
