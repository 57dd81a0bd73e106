"""Prepare distillation data from local files (no hub access): ultrachat, c4, text, chat.

    python -m services.data ultrachat --input DIR --tokenizer DIR --output_dir DIR \\
        --max_len 2048
    python -m services.data generate --teacher DIR --output chats.jsonl --conversations 20000
    python -m services.data wrap --paths docs.jsonl --output wrapped.jsonl   # documents as chats
    python -m services.data chat --paths chats.jsonl --tokenizer DIR --output_dir DIR \\
        --max_len 2048
    python -m services.data c4 --local_c4_dir DIR --languages en zh --tokenizer DIR \\
        --output_dir DIR --max_len 2048 --split train
    python -m services.data text --paths DIR_OR_FILE... --tokenizer DIR --output_dir DIR \\
        --max_len 2048 --pack

See docs/data.md for the output format, the label convention and the card.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.data_card import CARD_FORMAT, DATA_COMMAND
from shared.labels import LABEL_CONVENTION

from .build import BuildOptions, build, prepare_output_dir, summary_line
from .generate import add_arguments as add_generate_arguments  # imports no torch
from .process import WorkerConfig
from .render import PLAIN_TEMPLATE
from .sources import (
    TEXT_COLUMN_HINT,
    DataError,
    Interleaver,
    RawChunk,
    c4_files,
    check_json_field,
    chunk_tagged,
    file_chunks,
    iter_json_lines,
    limit_chunks,
    parquet_column,
    parquet_rows,
    text_files,
    ultrachat_files,
)
from .wrap import add_arguments as add_wrap_arguments


def load_tokenizer(path: str) -> tuple[Any, dict[str, Any]]:
    """The tokenizer (transformers) and its card entry; every failure is a DataError."""
    from shared.fingerprint import tokenizer_fingerprint

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--tokenizer {root} does not exist or is not a directory: pass the "
                        "directory that holds tokenizer.json (usually the model directory)")
    try:
        fingerprint = tokenizer_fingerprint(root)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root))
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise DataError(f"--tokenizer {root}: cannot load ({type(exc).__name__}: {exc})") from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(f"--tokenizer {root}: needs a fast tokenizer (tokenizer.json)")
    pad_id, pad_source = tokenizer.pad_token_id, "pad_token"
    if pad_id is None:  # padding value only; masks come from lengths, never from token values
        pad_id, pad_source = tokenizer.eos_token_id, "eos_token (tokenizer has no pad token)"
    info = {"path": str(root.resolve()), "fingerprint": fingerprint, "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": pad_id if pad_id is not None else 0,
            "pad_token_id_source": pad_source if pad_id is not None else "none (0)"}
    return tokenizer, info


def _special_ids(tokenizer: Any) -> list[int]:
    decoder = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return sorted(int(i) for i, tok in decoder.items() if tok.special)


def chat_config(tokenizer: Any, fmt: str, max_len: int) -> WorkerConfig:
    if fmt == "plain":
        if tokenizer.eos_token is None:
            raise DataError("--format plain closes assistant turns with EOS, but the tokenizer "
                            "has none")
        template = PLAIN_TEMPLATE
    else:
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise DataError("the tokenizer has no chat template; use --format plain")
    kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    kwargs.setdefault("bos_token", None)
    kwargs.setdefault("eos_token", None)
    return WorkerConfig(mode="chat", tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                        max_len=max_len, template=template, template_kwargs=kwargs,
                        special_ids=_special_ids(tokenizer))


def text_config(tokenizer: Any, args: argparse.Namespace) -> WorkerConfig:
    if args.eos:
        eos_id = tokenizer.convert_tokens_to_ids(args.eos)
        if eos_id is None or eos_id == tokenizer.unk_token_id:
            raise DataError(f"--eos {args.eos!r} is not a token of this tokenizer")
    else:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise DataError("the tokenizer has no EOS token; name one with --eos")
    return WorkerConfig(mode="text", tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                        max_len=args.max_len, eos_id=int(eos_id), long_docs=args.long_docs,
                        split_special_tokens=not args.parse_special_tokens)


# ---------------------------------------------------------------------------------------------
# Sources per sub-command


def ultrachat_chunks(args: argparse.Namespace) -> tuple[Iterator[RawChunk], int, list[str]]:
    files = ultrachat_files(args.input, args.splits)
    for paths in files.values():
        for path in paths:
            parquet_column(path, "messages")  # fail now, naming the file, not hours later

    def gen() -> Iterator[RawChunk]:
        for split, paths in files.items():
            dest = "train" if split.startswith("train") else "validation"
            for path in paths:
                yield from file_chunks(path, "messages", dest, args.chunk_size)

    all_files = [p for paths in files.values() for p in paths]
    return gen(), parquet_rows(all_files), [str(p) for p in all_files]


def c4_chunks(args: argparse.Namespace) -> tuple[Iterator[RawChunk], None, list[str]]:
    files = {lang: c4_files(args.local_c4_dir, lang, args.split) for lang in args.languages}
    for paths in files.values():
        check_json_field(paths[0], "text")
    if args.probabilities and len(args.probabilities) != len(args.languages):
        raise DataError("--probabilities needs one weight per language")
    streams = {lang: itertools.chain.from_iterable(iter_json_lines(p) for p in paths)
               for lang, paths in files.items()}
    mixed = Interleaver(streams, args.probabilities, args.seed)
    chunks = chunk_tagged(mixed, args.chunk_size, "text", args.split, "c4 " + "+".join(files))
    return chunks, None, [str(p) for paths in files.values() for p in paths]


def column_chunks(paths: list[str], column: str, chunk_size: int,
                  hint: str) -> tuple[Iterator[RawChunk], int | None, list[str]]:
    """Records of one column from parquet / jsonl / jsonl.gz files, all bound for train."""
    files = text_files(paths)
    for path in files:  # a file with the wrong schema stops the run now, naming the file
        if path.name.endswith(".parquet"):
            parquet_column(path, column, hint)
        else:
            check_json_field(path, column, hint)
    parquet = [p for p in files if p.name.endswith(".parquet")]
    total = parquet_rows(parquet) if len(parquet) == len(files) else None
    chunks = itertools.chain.from_iterable(
        file_chunks(p, column, "train", chunk_size) for p in files)
    return chunks, total, [str(p) for p in files]


def text_chunks(args: argparse.Namespace) -> tuple[Iterator[RawChunk], int | None, list[str]]:
    return column_chunks(args.paths, args.text_column, args.chunk_size, TEXT_COLUMN_HINT)


def chat_chunks(args: argparse.Namespace) -> tuple[Iterator[RawChunk], int | None, list[str]]:
    """Conversations from any files with a "messages" column: generate's output, or
    UltraChat-like data in other layouts."""
    return column_chunks(args.paths, "messages", args.chunk_size,
                         "chat reads a 'messages' list of {role, content} per record")


# ---------------------------------------------------------------------------------------------
# CLI


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer (model) directory")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--max_len", required=True, type=int, help="tokens per sample, at most")
    parser.add_argument("--buckets", type=int, default=None, metavar="WIDTH",
                        help="write length buckets 1..WIDTH, WIDTH+1..2*WIDTH, ...")
    parser.add_argument("--pack", action="store_true",
                        help="pack several samples per sequence (position_ids restart per "
                             "document)")
    parser.add_argument("--pack_fill", action="store_true",
                        help="with --pack: fill every row to --max_len, cutting the document "
                             "that does not fit (its rest starts the next row as a new "
                             "segment) instead of leaving the row short")
    parser.add_argument("--validation_fraction", type=float, default=0.0)
    parser.add_argument("--validation_size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_proc", type=int, default=1, help="tokenisation processes")
    parser.add_argument("--chunk_size", type=int, default=256, help="records per worker task")
    parser.add_argument("--max_samples", type=int, default=None, help="stop after N input records")
    parser.add_argument("--max_shard_size", default="500MB")
    parser.add_argument("--overwrite", action="store_true")


def _plain_text_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--long_docs", choices=("truncate", "split"), default="truncate",
                        help="documents over max_len: keep the first max_len tokens, or split "
                             "them into max_len pieces")
    parser.add_argument("--eos", default=None, help="token appended to each document "
                                                    "(default: the tokenizer's eos_token)")
    parser.add_argument("--parse_special_tokens", action="store_true",
                        help="let '<|eot_id|>' typed in the text become the special token "
                             "(default: it is encoded as plain text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=DATA_COMMAND,
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ultrachat", help="HuggingFaceH4/ultrachat_200k parquet -> chat SFT data")
    p.add_argument("--input", required=True, help="local copy of ultrachat_200k (holds data/)")
    p.add_argument("--splits", nargs="+", default=["train_sft", "test_sft"],
                   help="train_* go to the train split, test_* to validation")
    p.add_argument("--format", choices=("chat", "plain"), default="chat",
                   help="chat: the tokenizer's chat template; plain: 'User : / Assistant : '")
    _common(p)
    p = sub.add_parser("chat", help="parquet / jsonl / jsonl.gz files with a 'messages' column "
                                    "(e.g. generate's output) -> chat SFT data")
    p.add_argument("--paths", nargs="+", required=True, help="files or directories")
    p.add_argument("--format", choices=("chat", "plain"), default="chat",
                   help="chat: the tokenizer's chat template; plain: 'User : / Assistant : '")
    _common(p)
    p = sub.add_parser("generate", help="sample conversations from the teacher -> jsonl "
                                        "(docs/data.md)")
    add_generate_arguments(p)
    p = sub.add_parser("wrap", help="plain documents -> conversations jsonl (a user asks for the "
                                    "document, the assistant's reply is it) for chat")
    add_wrap_arguments(p)
    p = sub.add_parser("c4", help="allenai/c4 json.gz -> interleaved plain-text data")
    p.add_argument("--local_c4_dir", required=True)
    p.add_argument("--languages", nargs="+", default=["en"])
    p.add_argument("--probabilities", nargs="+", type=float, default=None,
                   help="sampling weight per language (seeded); default: alternate")
    p.add_argument("--split", choices=("train", "validation"), default="train")
    _common(p)
    _plain_text_options(p)
    p = sub.add_parser("text", help="parquet / jsonl / jsonl.gz files with a text column")
    p.add_argument("--paths", nargs="+", required=True, help="files or directories")
    p.add_argument("--text_column", default="text")
    _common(p)
    _plain_text_options(p)
    return parser


def run(argv: list[str]) -> dict[str, Any]:
    """Run one sub-command; returns the card. Raises DataError on bad input."""
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "wrap"):
        raise DataError(f"{args.command} writes a jsonl file, not a dataset: call main() or "
                        f"services.data.{args.command}.{args.command}()")
    if args.max_len < 2:
        raise DataError("--max_len must be at least 2")
    if args.num_proc < 1 or args.chunk_size < 1:
        raise DataError("--num_proc and --chunk_size must be at least 1")
    tokenizer, tok_info = load_tokenizer(args.tokenizer)
    if args.command == "ultrachat":
        config = chat_config(tokenizer, args.format, args.max_len)
        chunks, total, inputs = ultrachat_chunks(args)
    elif args.command == "chat":
        config = chat_config(tokenizer, args.format, args.max_len)
        chunks, total, inputs = chat_chunks(args)
    elif args.command == "c4":
        config = text_config(tokenizer, args)
        chunks, total, inputs = c4_chunks(args)
    else:
        config = text_config(tokenizer, args)
        chunks, total, inputs = text_chunks(args)
    if args.max_samples is not None:
        total = min(total, args.max_samples) if total is not None else args.max_samples
    if args.pack_fill and not args.pack:
        raise DataError("--pack_fill fills packed rows: add --pack")
    options = BuildOptions(output_dir=args.output_dir, max_len=args.max_len, pack=args.pack,
                           pack_fill=args.pack_fill,
                           bucket_width=args.buckets, validation_fraction=args.validation_fraction,
                           validation_size=args.validation_size, seed=args.seed,
                           num_proc=args.num_proc, overwrite=args.overwrite,
                           max_shard_size=args.max_shard_size)
    prepare_output_dir(args.output_dir, args.overwrite)
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"{DATA_COMMAND} " + shlex.join(argv),
        "subcommand": args.command,
        "inputs": inputs,
        "tokenizer": tok_info,
        "max_len": args.max_len,
        "packed": args.pack,
        "pack_fill": args.pack_fill,
        "columns": ["input_ids", "labels", "length"] + (["position_ids"] if args.pack else []),
        "labels": LABEL_CONVENTION,
        "bucket_width": args.buckets,
        "seed": args.seed,
    }
    if args.command in ("ultrachat", "chat"):
        card["chat_format"] = args.format
    else:
        card["eos_token_id"] = config.eos_id
        card["long_docs"] = args.long_docs
    if args.command == "c4":
        card["languages"], card["probabilities"] = args.languages, args.probabilities
    return build(limit_chunks(chunks, args.max_samples), config, options, card, total=total,
                 desc=args.command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if argv[:1] == ["generate"]:
            from .generate import generate

            print(generate(build_parser().parse_args(argv)))
            return 0
        if argv[:1] == ["wrap"]:
            from .wrap import wrap

            print(wrap(build_parser().parse_args(argv)))
            return 0
        card = run(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; " + ("--output holds whole batches only: the same command goes on "
                                 "from there" if argv[:1] == ["generate"] else
                                 "the output directory is incomplete (no card.json)"),
              file=sys.stderr)
        return 130
    for reason, example in card["stats"]["drop_examples"].items():
        print(f"dropped ({reason}), e.g.: {example[:200]}", file=sys.stderr)
    print(summary_line(card["subcommand"], card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
