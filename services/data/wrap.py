"""Plain documents as chat conversations (``python -m services.data wrap``).

A student distilled on plain text never sees an assistant turn with text in it: the all-RWKV-7
SmolLM2 student put 0.54-0.86 of its first answer token on ``<|im_end|>`` and answered nothing,
until one more kd stage on chat-formatted rows (docs/quality.md, the third run of 2026-12-02).
This writes each document as conversations, a user asking for it by its title and the assistant's
reply being the document, piece by piece, so that kd sees the template's tokens and the
teacher's logits after the assistant header, without the teacher having to write anything
(``services.data generate`` is the other way: the teacher's own replies, minutes on a GPU).
The output is a jsonl of ``{"messages": [...]}`` lines for ``services.data chat``.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

from .sources import (
    DataError,
    check_json_field,
    iter_json_lines,
    iter_parquet_arrays,
    parquet_column,
    text_files,
)

# One reply at most: ~800 tokens of technical English with SmolLM2's tokenizer, so a
# conversation and its template fit a 1024-token row.
MAX_CHARS = 3000
ASK = 'Write the text titled "{title}".'
ASK_MORE = 'Continue the text titled "{title}" (part {part}).'


def document_title(text: str) -> str:
    """The first line with a letter in it, reST/markdown marks stripped, at most 80 characters."""
    for line in text.splitlines():
        line = line.strip().strip("=-*#~^`:.'\"").strip()
        if re.search(r"[A-Za-z]", line):
            return line[:80]
    return "untitled"


def text_pieces(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """``text`` cut at paragraph breaks into pieces of at most ``max_chars`` (a longer paragraph
    is cut at whitespace, or hard where it has none)."""
    paragraphs: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        while len(para) > max_chars:
            cut = para.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            paragraphs.append(para[:cut])
            para = para[cut:].lstrip()
        if para.strip():
            paragraphs.append(para)
    pieces: list[str] = []
    for para in paragraphs:
        if pieces and len(pieces[-1]) + 2 + len(para) <= max_chars:
            pieces[-1] += "\n\n" + para
        else:
            pieces.append(para)
    return pieces


def as_conversations(text: str, max_chars: int = MAX_CHARS, ask: str = ASK,
                     ask_more: str = ASK_MORE) -> Iterator[dict]:
    """One document as conversations: the first asks for it by ``{title}``, the next ones for
    ``{part}`` 2, 3, ... of it; each reply is a piece of at most ``max_chars``."""
    title = document_title(text)
    for k, piece in enumerate(text_pieces(text, max_chars)):
        question = (ask if k == 0 else ask_more).format(title=title, part=k + 1)
        yield {"messages": [{"role": "user", "content": question},
                            {"role": "assistant", "content": piece}]}


def documents(paths: list[str | Path], column: str = "text") -> Iterator[str]:
    """The ``column`` of every record of the jsonl / jsonl.gz / parquet files under ``paths``."""
    for path in text_files(paths):
        if path.name.endswith(".parquet"):
            parquet_column(path, column)
            for array in iter_parquet_arrays(path, column, 1024):
                yield from (t for t in array.to_pylist() if isinstance(t, str))
            continue
        check_json_field(path, column)
        for n, line in enumerate(iter_json_lines(path), 1):
            try:
                value = json.loads(line).get(column)
            except (ValueError, AttributeError) as exc:
                raise DataError(f"{path}:{n}: not a JSON object ({exc})") from exc
            if isinstance(value, str):
                yield value


def write_conversations(paths: list[str | Path], out: Path, column: str = "text",
                        max_chars: int = MAX_CHARS, ask: str = ASK,
                        ask_more: str = ASK_MORE) -> tuple[int, int]:
    """The documents under ``paths`` as conversations in ``out`` (written whole, then renamed);
    returns (documents, conversations)."""
    for template in (ask, ask_more):
        try:
            template.format(title="t", part=2)
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"--ask / --ask_more {template!r}: only {{title}} and {{part}} may "
                            f"be filled in ({type(exc).__name__}: {exc})") from exc
    if max_chars < 100:
        raise DataError(f"--max_chars {max_chars}: at least 100 characters a reply")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    docs = count = 0
    try:
        with partial.open("w", encoding="utf-8") as sink:
            for text in documents(paths, column):
                docs += 1
                for conversation in as_conversations(text, max_chars, ask, ask_more):
                    sink.write(json.dumps(conversation, ensure_ascii=False) + "\n")
                    count += 1
    except BaseException:
        partial.unlink(missing_ok=True)  # bad input or an interrupt: no half file left behind
        raise
    if count == 0:
        partial.unlink()
        raise DataError(f"no text in {', '.join(map(str, paths))} (column {column!r}): nothing "
                        "to wrap")
    partial.replace(out)
    return docs, count


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paths", nargs="+", required=True, help="jsonl / jsonl.gz / parquet files "
                                                              "or directories of documents")
    p.add_argument("--output", type=Path, required=True, help="the conversations' .jsonl")
    p.add_argument("--text_column", default="text")
    p.add_argument("--max_chars", type=int, default=MAX_CHARS,
                   help="characters a reply at most (a longer document becomes several "
                        "conversations; keep one within --max_len tokens of services.data chat)")
    p.add_argument("--ask", default=ASK, help="the user's turn for a document's first piece "
                                              "({title}: its first line)")
    p.add_argument("--ask_more", default=ASK_MORE, help="the user's turn for piece {part}")


def wrap(args: argparse.Namespace) -> str:
    """Run the command; returns the summary line."""
    docs, count = write_conversations(args.paths, args.output, args.text_column, args.max_chars,
                                      args.ask, args.ask_more)
    return (f"wrap: {docs} documents as {count} conversations in {args.output}; next: "
            f"python -m services.data chat --paths {args.output} --tokenizer TEACHER ...")
