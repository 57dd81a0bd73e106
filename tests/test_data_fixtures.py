"""Shared by the data tests: corpus builders in exactly the hub layouts, tokenizer and dataset
fixtures (conftest.py registers this module as a plugin, so tests name the fixtures without
importing them)."""
from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

EOT = "<|eot_id|>"


def conversation(i: int, turns: int = 2, long_reply: int = 0) -> list[dict[str, str]]:
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {i}.{t}: where is the river?"})
        reply = f"  The river {i}.{t} flows north." + " Again and again." * long_reply + "  "
        msgs.append({"role": "assistant", "content": reply})
    return msgs


def write_ultrachat(root: Path, split: str, conversations: Sequence[Any],
                    shards: int = 1) -> list[Path]:
    """data/{split}-NNNNN-of-NNNNN-<hash>.parquet with columns prompt, prompt_id, messages."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        part = conversations[s::shards]
        rows = {
            "prompt": [m[0]["content"] if m else "" for m in part],
            "prompt_id": [f"id{s}-{i}" for i in range(len(part))],
            "messages": list(part),
        }
        path = data / f"{split}-{s:05d}-of-{shards:05d}-0123456789abcdef.parquet"
        pq.write_table(pa.table(rows), path, row_group_size=7)
        paths.append(path)
    return paths


def write_jsonl(path: Path, records: Sequence[Any], raw_lines: Sequence[bytes] = ()) -> Path:
    """JSON lines (gzip when the name ends in .gz); ``raw_lines`` are appended verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    payload += b"".join(raw_lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def c4_record(text: str) -> dict[str, str]:
    return {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.com/x"}


def write_c4(root: Path, language: str, split: str, texts: Sequence[str], shards: int = 2) -> None:
    """en/c4-{split}.NNNNN-of-NNNNN.json.gz or multilingual/c4-{lang}[-validation].tfrecord-..."""
    total = 1024 if split == "train" else 8
    for s in range(shards):
        part = [c4_record(t) for t in texts[s::shards]]
        if language == "en":
            path = root / "en" / f"c4-{split}.{s:05d}-of-{total:05d}.json.gz"
        else:
            suffix = "" if split == "train" else "-validation"
            name = f"c4-{language}{suffix}.tfrecord-{s:05d}-of-{total:05d}.json.gz"
            path = root / "multilingual" / name
        write_jsonl(path, part)


def invalid_utf8_string_array(values: Sequence[bytes]) -> pa.Array:
    """A parquet-writable string array that holds bytes which are not UTF-8 (pyarrow does
    not validate buffers it is handed, just as a foreign writer would not)."""
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    buffers = [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


# A Qwen-style template on the tiny tokenizer's specials: default system prompt, and a
# newline after every end-of-turn token that must not be trained.
QWEN_LIKE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|start_header_id|>system\nYou are helpful.<|eot_id|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}"
)

# Breaks the prefix property (the header counts the messages), so the masker must fall back
# to searching each reply after the previous one.
NON_INCREMENTAL_TEMPLATE = (
    "{{ bos_token }}[{{ messages | length }} messages]\n"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from shared.tiny import train_tokenizer

    path = tmp_path_factory.mktemp("data-tokenizer")
    train_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def prep(*args) -> dict:
    """Run a data sub-command in-process; returns the card."""
    from services.data.__main__ import run

    return run([str(a) for a in args])


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != -100])


def assert_shifted(row) -> None:
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) == row["length"]
    assert all(labels[t] in (-100, ids[t + 1]) for t in range(len(ids) - 1))


DOCS = [f"Document {i} says hello." + " More words here." * (i % 7) for i in range(40)]


@pytest.fixture(scope="module")
def packed_dir(tok_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packed")
    write_jsonl(tmp / "corpus" / "a.jsonl.gz", [{"text": t} for t in DOCS])
    prep("text", "--paths", tmp / "corpus", "--tokenizer", tok_dir, "--output_dir", tmp / "out",
         "--max_len", 96, "--pack", "--buckets", 32, "--validation_size", 3)
    return tmp / "out"
