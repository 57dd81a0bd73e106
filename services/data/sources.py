"""Local corpus readers: find files in the hub layouts and stream raw records in chunks.

Everything here runs in the main process and stays cheap on purpose: records are shipped to
the tokenisation workers as raw JSON lines (bytes) or Arrow array slices, and are decoded
there, so the main process never becomes the bottleneck and never holds more than a few
chunks in memory (files are read line by line or row group by row group).
"""
from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class DataError(Exception):
    """A problem with the user's input that we can explain; the CLI prints it without a
    traceback."""


@dataclass
class RawChunk:
    """Up to ``chunk_size`` undecoded records of one kind, bound for one output split.

    kind "json": ``items`` is a list of JSON lines (bytes); ``field`` names the record key.
    kind "arrow": ``items`` is a pyarrow Array holding the column itself.
    ``tags`` optionally labels each record (C4 language) for per-source counts in the card.
    """

    kind: str
    items: Any
    field: str
    split: str
    source: str
    tags: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------------------------------------
# File discovery (hub layouts)

ULTRACHAT_SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")
_ULTRACHAT_RE = re.compile(r"^(train|test)_(sft|gen)-\d{5}-of-\d{5}(-.*)?\.parquet$")


def ultrachat_files(input_dir: str | Path, splits: Sequence[str]) -> dict[str, list[Path]]:
    """Parquet shards per UltraChat split, laid out as on the hub:
    data/{split}-NNNNN-of-NNNNN-*.parquet."""
    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(f"--input {root} is not a directory (expected a local copy of "
                        "HuggingFaceH4/ultrachat_200k with a data/ folder)")
    data = root / "data" if (root / "data").is_dir() else root
    found: dict[str, list[Path]] = {}
    for split in splits:
        if split not in ULTRACHAT_SPLITS:
            raise DataError(f"unknown UltraChat split {split!r}; choose from "
                            f"{', '.join(ULTRACHAT_SPLITS)}")
        files = sorted(p for p in data.glob(f"{split}-*.parquet") if _ULTRACHAT_RE.match(p.name))
        if not files:
            raise DataError(f"no {split}-NNNNN-of-NNNNN-*.parquet files in {data}")
        found[split] = files
    return found


def c4_files(c4_dir: str | Path, language: str, split: str) -> list[Path]:
    """json.gz shards of one C4 language and split, laid out as allenai/c4 on the hub."""
    root = Path(c4_dir)
    if not root.is_dir():
        raise DataError(f"--local_c4_dir {root} is not a directory (expected a local copy of "
                        "allenai/c4)")
    if split not in ("train", "validation"):
        raise DataError(f"--split must be train or validation, not {split!r}")
    if language == "en":
        folder, pattern = root / "en", rf"^c4-{split}\.\d{{5}}-of-\d{{5}}\.json\.gz$"
    else:
        suffix = "" if split == "train" else "-validation"
        folder = root / "multilingual"
        pattern = rf"^c4-{re.escape(language)}{suffix}\.tfrecord-\d{{5}}-of-\d{{5}}\.json\.gz$"
    regex = re.compile(pattern)
    files = (sorted(p for p in folder.glob("*.json.gz") if regex.match(p.name))
             if folder.is_dir() else [])
    if not files:
        example = (f"en/c4-{split}.00000-of-01024.json.gz" if language == "en" else
                   f"multilingual/c4-{language}{'' if split == 'train' else '-validation'}"
                   ".tfrecord-00000-of-01024.json.gz")
        raise DataError(f"no C4 files for language {language!r}, split {split!r} under {root} "
                        f"(expected names like {example})")
    return files


TEXT_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz")


def _is_text_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TEXT_SUFFIXES)


def text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into parquet / jsonl / jsonl.gz files."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_text_file(p))
            if not found:
                raise DataError(f"{path} holds no {', '.join(TEXT_SUFFIXES)} files")
            out.extend(found)
        elif path.is_file():
            if not path.name.endswith(TEXT_SUFFIXES):
                raise DataError(f"{path}: unsupported file type (use {', '.join(TEXT_SUFFIXES)})")
            out.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return out


# ---------------------------------------------------------------------------------------------
# Record streams


def iter_json_lines(path: Path) -> Iterator[bytes]:
    """Non-empty lines of a .jsonl / .json.gz file as bytes; corrupt gzip is a clear error."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    yield line
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}); is the file truncated or not gzip?") from exc


TEXT_COLUMN_HINT = "pass --text_column with the right name"


def check_json_field(path: Path, field_name: str, hint: str = TEXT_COLUMN_HINT) -> None:
    """Fail early, naming the file, when its first decodable record lacks ``field_name``.

    Later records without the field are counted drops: one bad line in a huge shard should not
    stop a multi-hour run, but a file with the wrong schema should stop it at once.
    """
    for line in iter_json_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # undecodable lines are counted later by the workers
        if not isinstance(record, dict) or field_name not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}: records have no {field_name!r} field (found: {keys}); "
                            f"{hint}")
        return


def parquet_column(path: Path, column: str, hint: str = TEXT_COLUMN_HINT) -> pq.ParquetFile:
    """Open a parquet file and check that ``column`` exists, naming the file if it does not."""
    try:
        handle = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    names = handle.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no {column!r} column (columns: {', '.join(names)}); {hint}")
    return handle


def iter_parquet_arrays(path: Path, column: str, batch_rows: int) -> Iterator[pa.Array]:
    """The column in slices of ``batch_rows`` rows; reads one row group at a time."""
    handle = parquet_column(path, column)
    try:
        for batch in handle.iter_batches(batch_size=batch_rows, columns=[column]):
            yield batch.column(0)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def parquet_rows(paths: Iterable[Path]) -> int:
    """Row count from parquet footers only (for the progress bar total)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


# A task carries at most this much raw text: with book-sized documents a record count alone
# would let one task, and the token lists it turns into, grow to gigabytes.
CHUNK_BYTES = 4 << 20


def chunk_lines(lines: Iterable[bytes], size: int, field_name: str, split: str, source: str,
                max_bytes: int = CHUNK_BYTES) -> Iterator[RawChunk]:
    tagged = (("", line) for line in lines)
    for chunk in chunk_tagged(tagged, size, field_name, split, source, max_bytes):
        chunk.tags = None
        yield chunk


def _slices_by_bytes(array: pa.Array, max_bytes: int) -> Iterator[pa.Array]:
    """Cut a string/binary array into slices of at most ``max_bytes`` (one row at least)."""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
            or pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
        yield array
        return
    ends = np.cumsum(pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False))
    start = 0
    while start < len(array):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + max_bytes, side="right")), start + 1)
        yield array.slice(start, stop - start)
        start = stop


def file_chunks(path: Path, field_name: str, split: str, size: int,
                max_bytes: int = CHUNK_BYTES) -> Iterator[RawChunk]:
    """Chunks of one parquet or JSON-lines file."""
    if path.name.endswith(".parquet"):
        for array in iter_parquet_arrays(path, field_name, size):
            for piece in _slices_by_bytes(array, max_bytes):
                yield RawChunk("arrow", piece, field_name, split, str(path))
    else:
        check_json_field(path, field_name)
        yield from chunk_lines(iter_json_lines(path), size, field_name, split, str(path), max_bytes)


@dataclass
class Interleaver:
    """Mix several record streams: round robin, or seeded random picks with ``probabilities``.

    A stream that runs dry drops out and the others continue (probabilities renormalised), so
    every record of every language is used exactly once.
    """

    streams: dict[str, Iterator[bytes]]
    probabilities: Sequence[float] | None = None
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        names = list(self.streams)
        weights = list(self.probabilities) if self.probabilities else [1.0] * len(names)
        if len(weights) != len(names) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError("--probabilities needs one non-negative weight per language")
        rng = random.Random(self.seed)
        live = [i for i, w in enumerate(weights) if w > 0]
        pos = 0  # round-robin position in ``live``
        while live:
            if self.probabilities:
                pos = live.index(rng.choices(live, weights=[weights[i] for i in live])[0])
            idx = live[pos]
            try:
                item = next(self.streams[names[idx]])
            except StopIteration:
                live.pop(pos)  # the next stream slides into ``pos``
                pos = pos % len(live) if live else 0
                continue
            pos = (pos + 1) % len(live)
            self.counts[names[idx]] = self.counts.get(names[idx], 0) + 1
            yield names[idx], item


def chunk_tagged(items: Iterable[tuple[str, bytes]], size: int, field_name: str, split: str,
                 source: str, max_bytes: int = CHUNK_BYTES) -> Iterator[RawChunk]:
    buf: list[bytes] = []
    tags: list[str] = []
    held = 0
    for tag, line in items:
        buf.append(line)
        tags.append(tag)
        held += len(line)
        if len(buf) >= size or held >= max_bytes:
            yield RawChunk("json", buf, field_name, split, source, tags)
            buf, tags, held = [], [], 0
    if buf:
        yield RawChunk("json", buf, field_name, split, source, tags)


def limit_chunks(chunks: Iterable[RawChunk], max_records: int | None) -> Iterator[RawChunk]:
    """Stop after ``max_records`` records in total (cutting the last chunk)."""
    if max_records is None:
        yield from chunks
        return
    left = max_records
    for chunk in chunks:
        if left <= 0:
            return
        if len(chunk) > left:
            chunk.items = chunk.items[:left]
            if chunk.tags is not None:
                chunk.tags = chunk.tags[:left]
        left -= len(chunk)
        yield chunk
