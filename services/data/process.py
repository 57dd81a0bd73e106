"""Tokenisation workers: decode raw records, tokenise, build shifted labels, truncate.

A worker never raises on a bad record: empty texts, missing fields, undecodable bytes and
template errors become counted drops (with the first message per reason kept for the
summary). Anything unexpected is re-raised in the main process as a DataError naming the
source file, so no run ends in a traceback from deep inside a child process.

Workers are started with "spawn" (no inherited Arrow/tokenizer threads, the same on every
OS) and import no torch/transformers models, so they start in about a second. Tokenizer
threading is switched off: ``--num_proc`` is the only parallelism knob, which keeps the
benchmark honest and avoids the tokenizers-after-fork deadlock.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from shared.labels import IGNORE

from .render import ChatMasker, Drop, labels_from_targets, validate_messages
from .sources import DataError, RawChunk

SUB_BATCH_CHARS = 1 << 20


@dataclass
class WorkerConfig:
    """Everything a worker needs, picklable (the tokenizer travels as its JSON)."""

    mode: str                      # "text" or "chat"
    tokenizer_json: str
    max_len: int
    eos_id: int | None = None      # appended to every plain-text document
    template: str | None = None    # chat template (chat mode)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    special_ids: list[int] = field(default_factory=list)
    long_docs: str = "truncate"    # plain text: "truncate" or "split" into max_len pieces
    split_special_tokens: bool = True  # plain text: "<|eot_id|>" typed in a web page is text


@dataclass
class ChunkResult:
    split: str
    samples: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    n_in: int = 0
    truncated: int = 0
    prefix_fallbacks: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first message per drop reason
    tags: Counter = field(default_factory=Counter)

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, detail)


def _decode_arrow(array: pa.Array) -> list[Any]:
    """Python values of an Arrow array; a value with invalid UTF-8 becomes a Drop."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        pass
    out: list[Any] = []
    for i in range(len(array)):
        try:
            out.append(array[i].as_py())
        except UnicodeDecodeError as exc:
            out.append(Drop("bad_utf8", f"invalid UTF-8 in row {i}: {exc}"))
    return out


def _decode_json(lines: list[bytes], field_name: str) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        try:
            record = json.loads(line)
        except UnicodeDecodeError as exc:  # before ValueError: it is a subclass
            out.append(Drop("bad_utf8", f"invalid UTF-8: {exc}"))
            continue
        except ValueError as exc:
            out.append(Drop("bad_json", f"not JSON: {exc}"))
            continue
        if not isinstance(record, dict) or field_name not in record:
            out.append(Drop("missing_field", f"record without {field_name!r}"))
        else:
            out.append(record[field_name])
    return out


def _check_text(value: Any) -> str:
    if not isinstance(value, str):
        raise Drop("missing_field" if value is None else "bad_type",
                   f"text is {type(value).__name__}, not str")
    if not value.strip():
        raise Drop("empty", "empty or whitespace-only text")
    try:
        value.encode("utf-8")  # lone surrogates from JSON escapes would crash the tokenizer
    except UnicodeEncodeError as exc:
        raise Drop("bad_utf8", f"text is not valid Unicode: {exc}") from exc
    return value


class Worker:
    """Turns RawChunks into (input_ids, labels) samples of at most ``max_len`` tokens."""

    def __init__(self, config: WorkerConfig) -> None:
        from tokenizers import Tokenizer

        self.config = config
        self.tokenizer = Tokenizer.from_str(config.tokenizer_json)
        self.masker = None
        if config.mode == "chat":
            self.masker = ChatMasker(self.tokenizer, config.template or "", config.template_kwargs,
                                     set(config.special_ids))
        elif config.split_special_tokens:
            self.tokenizer.encode_special_tokens = True

    def process(self, chunk: RawChunk) -> ChunkResult:
        result = ChunkResult(split=chunk.split, n_in=len(chunk))
        if chunk.tags:
            result.tags.update(chunk.tags)
        values = (_decode_arrow(chunk.items) if chunk.kind == "arrow"
                  else _decode_json(chunk.items, chunk.field))
        if self.config.mode == "chat":
            self._chat(values, result)
        else:
            self._text(values, result)
        return result

    # -- plain text ------------------------------------------------------------------------
    def _text(self, values: list[Any], result: ChunkResult) -> None:
        texts: list[str] = []
        for value in values:
            try:
                if isinstance(value, Drop):
                    raise value
                texts.append(_check_text(value))
            except Drop as drop:
                result.drop(drop.reason, str(drop))
        eos = [] if self.config.eos_id is None else [self.config.eos_id]
        for ids_list in self._encode(texts):
            self._text_sample(np.asarray(ids_list + eos, dtype=np.int32), result)

    def _encode(self, texts: list[str]) -> Iterator[list[int]]:
        """Token ids per text, encoded ~1 MB of text at a time: tokenizers' Encoding objects
        cost ~80 bytes per token (strings, offsets, masks), so a whole 4 MB task at once
        would briefly hold hundreds of MB. encode_batch_fast skips the offsets we do not need."""
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        start = 0
        while start < len(texts):
            stop, held = start, 0
            while stop < len(texts) and (stop == start
                                         or held + len(texts[stop]) <= SUB_BATCH_CHARS):
                held += len(texts[stop])
                stop += 1
            for enc in encode(texts[start:stop], add_special_tokens=True):
                yield enc.ids
            start = stop

    def _text_sample(self, ids: np.ndarray, result: ChunkResult) -> None:
        """One document (EOS already appended) -> one sample, or several with --long_docs split."""
        max_len = self.config.max_len
        # Every next token is a target, the appended EOS included; the last position has
        # no next token inside this document.
        labels = np.empty_like(ids)
        labels[:-1] = ids[1:]
        labels[-1] = IGNORE
        if len(ids) <= max_len:
            result.samples.append((ids, labels))
            return
        result.truncated += 1
        # Labels were built on the whole document first, so the last position of a cut
        # piece keeps its real next token as target (the model did see all the context).
        stop = len(ids) if self.config.long_docs == "split" else max_len
        for start in range(0, stop, max_len):
            piece_labels = labels[start:start + max_len]
            if (piece_labels != IGNORE).any():  # a 1-token tail teaches nothing
                result.samples.append((ids[start:start + max_len], piece_labels))

    # -- conversations ---------------------------------------------------------------------
    def _chat(self, values: list[Any], result: ChunkResult) -> None:
        assert self.masker is not None
        max_len = self.config.max_len
        for value in values:
            try:
                if isinstance(value, Drop):
                    raise value
                messages = validate_messages(value)
                for msg in messages:
                    try:  # lone surrogates from JSON escapes would crash the tokenizer
                        msg["content"].encode("utf-8")
                    except UnicodeEncodeError as exc:
                        raise Drop("bad_utf8", f"message is not valid Unicode: {exc}") from exc
                enc = self.masker.encode(messages)
                result.prefix_fallbacks += int(enc.prefix_fallback)
                labels = labels_from_targets(enc.ids, enc.targets)
                if not (labels != IGNORE).any():
                    raise Drop("no_trainable", "no assistant token survived rendering")
                ids = enc.ids
                if len(ids) > max_len:
                    # Cut after the last complete assistant turn that fits; only a first turn
                    # that alone exceeds max_len is cut mid-turn.
                    fits = [end + 1 for end in enc.turn_ends if end + 1 <= max_len]
                    cut = max(fits) if fits else max_len
                    ids, labels = ids[:cut], labels[:cut]
                    if not (labels != IGNORE).any():
                        raise Drop("too_long",
                                   f"no assistant token within the first {max_len} tokens")
                    result.truncated += 1
                result.samples.append((ids, labels))
            except Drop as drop:
                result.drop(drop.reason, str(drop))
            except Exception as exc:  # noqa: BLE001 - tokenizer errors on odd input: count, go on
                result.drop("error", f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Process pool

_WORKER: Worker | None = None


def _init(config: WorkerConfig) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Worker(config)


def _run(chunk: RawChunk) -> ChunkResult:
    assert _WORKER is not None
    try:
        return _WORKER.process(chunk)
    except Exception as exc:  # noqa: BLE001 - re-raised in the parent with the file name
        raise RuntimeError(f"{chunk.source}: {type(exc).__name__}: {exc}") from None


def process_chunks(chunks: Iterable[RawChunk], config: WorkerConfig,
                   num_proc: int = 1) -> Iterator[ChunkResult]:
    """Results in input order (so the output does not depend on ``num_proc``).

    At most ``3 * num_proc`` chunks are in flight: the reader blocks instead of filling
    memory when the workers are slower than the disk.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if num_proc <= 1:
        worker = Worker(config)
        for chunk in chunks:
            try:
                yield worker.process(chunk)
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"{chunk.source}: {type(exc).__name__}: {exc}") from exc
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init, initargs=(config,))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run, chunk))
            if len(pending) >= 3 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as exc:
        raise DataError(f"a tokenisation worker died or failed to start ({exc}); see its "
                        "message above; if it was killed (out of memory) try a smaller "
                        "--num_proc or --chunk_size") from None
    except RuntimeError as exc:
        raise DataError(str(exc)) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
