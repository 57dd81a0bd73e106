"""Held-out sets: read one from disk into scored rows, in the data loader's row layout.

A set is either a dataset prepared by the data command (a directory with ``card.json``; its
``validation`` split when it has one, else ``train``; rows keep their own labels, so prompt
tokens masked at preparation stay unscored, and packed rows keep their ``position_ids``), or a
plain text file: ``.jsonl`` (a ``"text"`` field, or ``"messages"`` chat turns rendered with the
tokenizer's chat template), ``.parquet`` (a ``"text"`` column) or ``.txt`` (the whole file is one
document). Plain documents are tokenised with the teacher's tokenizer, joined with EOS between
them into one stream, and cut into rows of ``seq_len`` tokens; every position predicts the
stream's next token (across row ends too: labels are shifted targets, see shared/labels.py).

``max_tokens`` caps the scored positions of a set exactly: rows are taken in order and the
positions past the budget get IGNORE labels.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.data_card import read_card
from shared.data_loader import PreparedSplit, collate
from shared.labels import IGNORE

PLAIN_SUFFIXES = (".jsonl", ".parquet", ".txt")


class EvaluateError(Exception):
    """Bad input that we can explain in one line; the CLI prints it without a traceback."""


@dataclass
class HeldOutSet:
    """The rows of one held-out set, ready to batch."""

    name: str
    path: str
    kind: str                     # prepared | jsonl | parquet | txt
    split: str | None             # the prepared split read (None for plain files)
    rows: list[dict[str, Any]] = field(default_factory=list)  # input_ids, labels, length[, pos]

    @property
    def tokens(self) -> int:
        """Scored positions over all rows."""
        return sum(sum(1 for t in row["labels"] if t != IGNORE) for row in self.rows)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Right-padded batches, longest rows first (each batch padded to its own longest)."""
        order = sorted(self.rows, key=lambda row: -row["length"])
        for start in range(0, len(order), batch_size):
            # the pad value is never read: masks come from the lengths, padding is never scored
            yield collate(order[start:start + batch_size], pad_token_id=0)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.rows) // batch_size)


def parse_named(spec: str) -> tuple[str | None, str]:
    """``name=PATH`` -> (name, PATH); a plain ``PATH`` -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def default_name(path: str | Path) -> str:
    """A set's name from its path: the file's stem (``wiki.jsonl`` -> ``wiki``) or the dir name."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def load_set(spec: str, tokenizer: Any, teacher_dir: str | Path, max_tokens: int,
             seq_len: int) -> HeldOutSet:
    """Read the set ``spec`` (``PATH`` or ``name=PATH``) into rows, at most ``max_tokens``
    scored positions."""
    name, raw = parse_named(spec)
    path = Path(raw)
    if max_tokens < 1 or seq_len < 2:
        raise EvaluateError(f"--max-tokens ({max_tokens}) must be >= 1 and --seq-len ({seq_len}) "
                            ">= 2")
    if not path.exists():
        raise EvaluateError(f"--data {raw}: no such file or directory")
    name = name or default_name(path)
    if path.is_dir():
        return _prepared(name, path, teacher_dir, max_tokens)
    suffix = path.suffix.lower()
    if suffix not in PLAIN_SUFFIXES:
        raise EvaluateError(f"--data {raw}: unknown format {suffix or '(no suffix)'!r}; give a "
                            "prepared dataset directory (with card.json) or a .jsonl, .parquet "
                            "or .txt file")
    stream = _token_stream(path, tokenizer, max_tokens + 1)
    if len(stream) < 2:
        raise EvaluateError(f"--data {raw}: fewer than 2 tokens of text, nothing to score")
    held = HeldOutSet(name, str(path), suffix[1:], None)
    inputs, targets = stream[:-1], stream[1:]
    for start in range(0, len(inputs), seq_len):
        ids = inputs[start:start + seq_len]
        held.rows.append({"input_ids": ids, "labels": targets[start:start + seq_len],
                          "length": len(ids)})
    return held


def _prepared(name: str, path: Path, teacher_dir: str | Path, max_tokens: int) -> HeldOutSet:
    from shared.fingerprint import tokenizer_fingerprint

    if not (path / "card.json").is_file():
        raise EvaluateError(f"--data {path}: a directory without card.json is not a prepared "
                            "dataset; prepare it with the data command or pass a .jsonl, "
                            ".parquet or .txt file")
    try:
        card = read_card(path)
    except ValueError as exc:  # a card of another format
        raise EvaluateError(f"--data {path}: {exc}") from exc
    have, want = card["tokenizer"]["fingerprint"], tokenizer_fingerprint(teacher_dir)
    if have != want:
        raise EvaluateError(f"--data {path} was tokenised with tokenizer fingerprint {have}, the "
                            f"teacher {teacher_dir} has {want}: re-run the data command with "
                            "--tokenizer set to the teacher's directory")
    split = "validation" if "validation" in card["splits"] else "train"
    if split not in card["splits"]:
        raise EvaluateError(f"--data {path}: the card lists no validation or train split")
    data = PreparedSplit(path, split)
    held = HeldOutSet(name, str(path), "prepared", split)
    budget = max_tokens
    columns = ["input_ids", "labels", "length"]
    for bucket in data.buckets:
        packed = "position_ids" in bucket.column_names
        for row in bucket.select_columns(columns + (["position_ids"] if packed else [])):
            if budget <= 0:
                return held
            labels = list(row["labels"])
            for t, label in enumerate(labels):
                if label != IGNORE:
                    if budget <= 0:
                        labels[t] = IGNORE
                    else:
                        budget -= 1
            row = dict(row, labels=labels)
            if any(t != IGNORE for t in labels):
                held.rows.append(row)
    return held


def _token_stream(path: Path, tokenizer: Any, limit: int) -> list[int]:
    """Documents of ``path`` tokenised and joined with EOS, until ``limit`` tokens."""
    if path.suffix.lower() == ".txt":
        return _txt_tokens(path, tokenizer, limit)
    documents = (_parquet_texts(path) if path.suffix.lower() == ".parquet"
                 else _jsonl_texts(path, tokenizer))
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        if stream and eos is not None and stream[-1] != eos:
            stream.append(eos)
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(stream) >= limit:
            break
    return stream[:limit]


def _txt_tokens(path: Path, tokenizer: Any, limit: int) -> list[int]:
    """The first ``limit`` tokens of a text file (one document), reading only a prefix of it:
    the prefix doubles until it holds more than ``limit`` tokens; its last token is dropped,
    since the text after the prefix could have made it a longer one."""
    text = ""
    with path.open(encoding="utf-8", errors="replace") as handle:
        while True:
            block = handle.read(max(1 << 16, len(text), 8 * limit - len(text)))
            text += block
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not block or len(ids) > limit:
                return ids[:limit]


def _parquet_texts(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise EvaluateError(f"--data {path}: not a readable parquet file ({exc})") from exc
    if "text" not in handle.schema_arrow.names:
        raise EvaluateError(f"--data {path}: no 'text' column (columns: "
                            f"{', '.join(handle.schema_arrow.names)})")
    for batch in handle.iter_batches(batch_size=1024, columns=["text"]):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _jsonl_texts(path: Path, tokenizer: Any) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise EvaluateError(f"--data {path}:{number}: not JSON ({exc})") from exc
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                yield render_chat(record["messages"], tokenizer, f"--data {path}:{number}")
            else:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise EvaluateError(f"--data {path}:{number}: a record needs a 'text' string or a "
                                    f"'messages' list (found: {keys})")


def render_chat(messages: list[dict[str, str]], tokenizer: Any, where: str,
                add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (it carries its own BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluateError(f"{where}: chat messages, but the teacher's tokenizer has no chat "
                            "template; give plain 'text' records instead")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises many types on malformed turns
        raise EvaluateError(f"{where}: cannot render the chat turns ({type(exc).__name__}: "
                            f"{exc}); each turn needs 'role' and 'content'") from exc
