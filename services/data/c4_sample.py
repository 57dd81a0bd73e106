#!/usr/bin/env python3
"""Build a small real-text dataset in the allenai/c4 on-disk layout from Debian's documentation.

    python -m services.data.c4_sample --output runs/demo/c4 [--max-mb 3] [--seed 0]

writes ``en/c4-train.00000-of-01024.json.gz`` and ``en/c4-validation.00000-of-00008.json.gz``:
gzip'ed JSON lines ``{"text", "timestamp", "url"}``, as in the real C4, so that
``python -m services.data c4 --local_c4_dir OUTPUT`` reads them exactly as it reads C4.

The text is English prose that ships with every Debian system, no network needed:
licences (/usr/share/common-licenses), package copyright files, README/NEWS/changelog files of
/usr/share/doc (``.gz`` ones decompressed) and English man pages (roff stripped roughly). A
source file becomes one or more documents of paragraphs (about 0.5-4 KB each, like C4's web
pages), at most 16 KB per file; identical documents (the many verbatim GPL copies) are kept
once; about 1 file in 10 goes to the validation shard, whole, so validation text is held out at
the file level. The ``url`` is the source's ``file://`` URL, the ``timestamp`` its modification
time. Output is deterministic for a given system and seed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import gzip
import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

TRAIN_NAME = "c4-train.00000-of-01024.json.gz"
VALIDATION_NAME = "c4-validation.00000-of-00008.json.gz"
DOC_MIN, DOC_MAX = 400, 4000          # characters per document
FILE_MAX = 16_000                     # characters taken from one file (variety over volume)
VALIDATION_EVERY = 10                 # about 1 source file in 10 is held out

# --------------------------------------------------------------------------- sources


def source_files() -> list[str]:
    """Candidate files, grouped by kind so that every kind contributes (sorted, stable)."""
    doc = "/usr/share/doc"
    kinds = [
        sorted(glob.glob("/usr/share/common-licenses/*")),
        sorted(glob.glob(f"{doc}/*/copyright")),
        sorted(p for pat in ("README*", "NEWS*", "changelog.gz", "FAQ*", "*.txt*", "*.md*")
               for p in glob.glob(f"{doc}/*/{pat}")),
        # English man pages only: /usr/share/man/manN, not the translated /usr/share/man/<lang>
        sorted(glob.glob("/usr/share/man/man[1-8]/*")),
    ]
    out: list[str] = []
    seen: set[str] = set()
    for files in kinds:
        for f in files:
            if f not in seen and os.path.isfile(f) and not os.path.islink(f):
                seen.add(f)
                out.append(f)
    return out


def read_text(path: str) -> str:
    """The file's text; .gz decompressed; undecodable bytes dropped."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(2_000_000)
        else:
            with open(path, "rb") as f:
                raw = f.read(2_000_000)
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if b"\0" in raw[:4096]:
        return ""  # binary
    return raw.decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------- roff

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),     # font changes \fB \fI \fR \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d"), ""),                  # size changes
    (re.compile(r"\\\(em|\\\[em\]"), "—"),
    (re.compile(r"\\\(en|\\\[en\]"), "–"),
    (re.compile(r"\\\((aq|cq)|\\\[(aq|cq)\]"), "'"),
    (re.compile(r"\\\((lq|rq|dq)|\\\[(lq|rq|dq)\]"), '"'),
    (re.compile(r"\\\(bu|\\\[bu\]"), "•"),
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),     # strings \*(lq \*R
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),         # other special characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&/,%:|^)]"), ""),                # zero-width escapes
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\(.)"), r"\1"),
]
# Macros whose arguments are text (man and mdoc); the others are formatting only.
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "TP",
                "IP", "UR", "MT", "Nm", "Nd", "Ar", "Fl", "Op", "Cm", "Pa", "Xr", "Sh", "Ss",
                "Em", "Sy", "Dq", "Qq", "Sq", "Li", "Va", "Ev", "Fn", "Ft", "Fa", "Ic", "It"}
_BREAK_MACROS = {"PP", "LP", "P", "sp", "SH", "SS", "TP", "IP", "Pp", "Sh", "Ss", "Bl", "El"}


def strip_roff(text: str) -> str:
    """Man page source → plain text, roughly: macro names, comments and escapes removed."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"', ".\\#")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, args = parts[0], parts[1] if len(parts) > 1 else ""
            if macro == "so":
                return ""  # a link to another page
            if macro in _BREAK_MACROS:
                out.append("")
            if macro not in _TEXT_MACROS or not args:
                continue
            if macro in {"IP", "TP"}:
                args = args.split('" ')[0] if args.startswith('"') else args.split()[0]
            args = args.replace('"', "")
            if macro in {"BR", "RB", "IR", "RI", "BI", "IB"}:
                args = args.replace(" ", "")  # alternating fonts: words are joined
            line = args
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- documents


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", " ")
    lines = [re.sub(r" {2,}", " ", ln).strip() for ln in text.splitlines()]
    return "\n".join(lines)


def paragraphs(text: str) -> list[str]:
    """Paragraphs with enough letters to be prose (drops separators, tables of dashes)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        letters = sum(c.isalpha() for c in para)
        if len(para) >= 40 and letters >= 0.5 * len(para):
            out.append(para)
    return out


def documents(text: str) -> Iterator[str]:
    """Group consecutive paragraphs into documents of DOC_MIN..DOC_MAX characters."""
    current: list[str] = []
    size = 0  # len("\n\n".join(current))
    for para in paragraphs(text):
        para = para[:DOC_MAX]
        if current and size + 2 + len(para) > DOC_MAX:
            if size >= DOC_MIN:
                yield "\n\n".join(current)
            current, size = [], 0
        size += len(para) + (2 if current else 0)
        current.append(para)
    if size >= DOC_MIN:
        yield "\n\n".join(current)


def timestamp(path: str) -> str:
    mtime = os.stat(path).st_mtime
    return dt.datetime.fromtimestamp(mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_manpage(path: str) -> bool:
    return path.startswith("/usr/share/man/")


def build(output: Path, max_bytes: int, seed: int = 0) -> dict:
    """Write the two shards; returns counts per split and the number of source files read."""
    files = source_files()
    if not files:
        raise SystemExit("error: no documentation found under /usr/share (common-licenses, "
                         "doc, man): this system ships none")
    rng = random.Random(seed)
    # Interleave the kinds by a seeded shuffle, so a small budget still samples all of them.
    rng.shuffle(files)
    seen: set[bytes] = set()
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    total = 0
    read = 0
    for path in files:
        if total >= max_bytes:
            break
        text = read_text(path)
        if not text:
            continue
        if is_manpage(path):
            text = strip_roff(text)
        read += 1
        held_out = int(hashlib.sha1(path.encode()).hexdigest(), 16) % VALIDATION_EVERY == 0
        split = "validation" if held_out else "train"
        taken = 0
        for doc in documents(clean(text)):
            if taken >= FILE_MAX:
                break
            taken += len(doc)
            digest = hashlib.sha1(doc.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            rows[split].append({"text": doc, "timestamp": timestamp(path),
                                "url": Path(path).as_uri()})
            total += len(doc.encode())
    if not rows["validation"] and len(rows["train"]) > 1:  # tiny systems: still hold some out
        rows["validation"].append(rows["train"].pop())
    if not rows["train"]:
        raise SystemExit("error: the system's documentation gave no usable text")
    folder = output / "en"
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", TRAIN_NAME), ("validation", VALIDATION_NAME)):
        tmp = folder / f".{name}.tmp"
        # mtime=0: the same input gives the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            for row in rows[split]:
                gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        os.replace(tmp, folder / name)
    return {"train": len(rows["train"]), "validation": len(rows["validation"]),
            "bytes": total, "files": read}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, type=Path, help="C4 root to write (holds en/)")
    ap.add_argument("--max-mb", type=float, default=3.0, help="text to collect, in MB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts = build(args.output, int(args.max_mb * 1e6), args.seed)
    print(f"C4 sample in {args.output / 'en'}: {counts['train']} train and "
          f"{counts['validation']} validation documents, {counts['bytes'] / 1e6:.1f} MB of "
          f"text from {counts['files']} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
