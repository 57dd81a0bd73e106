"""Real text for the quality experiment (issue 18), from Debian documentation packages.

    apt-get install linux-doc-6.1 python3.11-doc debian-handbook
    python -m benchmarks.quality_corpus --output bench/quality        # three .jsonl files
    # --broad: seven more documentation sets in train.jsonl (BROAD, ~2x the text)

* ``train.jsonl``: the training domain, technical documentation: the Linux kernel's
  (``linux-doc-6.1``: Documentation/**/*.rst.gz and *.txt.gz) and Python's
  (``python3.11-doc``: html/_sources/**/*.rst.txt), one record per source file;
* ``heldout_docs.jsonl``: held-out *files* of that same domain (1 in 50, chosen by a hash of
  the path, so the split never changes), never trained on;
* ``heldout_handbook.jsonl``: a domain the training never sees: the Debian Administrator's
  Handbook (``debian-handbook``, English HTML, tags stripped), system administration prose.

``--broad`` adds to ``train.jsonl`` the documentation of Perl (``perl-doc``'s pods), PostgreSQL
(``postgresql-doc-15``), SQLite (``sqlite3-doc``), Git (``git-doc``), Node.js (``nodejs-doc``),
LLVM (``llvm-14-doc``) and CMake (``cmake-doc``): 37.9M characters of training text become
75.9M (11.9M tokens packed become 23.4M), so 50M distillation tokens repeat it fewer times
(why: at 36.5M tokens each narrow document had been seen ~3 times, plain or wrapped, and the
unseen domain lagged the training one, docs/quality.md). Their own 1 in 50 held-out files go
to ``heldout_broad.jsonl``; ``heldout_docs.jsonl`` and the handbook stay exactly the files they
were, so figures compare across runs. No Debian administration text is added: the handbook
stays a domain the training never saw.

Each record is ``{"text": ..., "source": path}``, the ``text`` corpus format of
``python -m services.data text``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

KERNEL_DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
PACKAGES = {KERNEL_DOCS: "linux-doc-6.1", PYTHON_DOCS: "python3.11-doc",
            HANDBOOK: "debian-handbook"}
HELD_OUT_ONE_IN = 50
# --broad's sources: (root, glob, package); HTML pages have their tags stripped.
BROAD = [
    (Path("/usr/share/perl/5.36/pod"), "*.pod", "perl-doc"),
    (Path("/usr/share/doc/postgresql-doc-15/html"), "*.html", "postgresql-doc-15"),
    (Path("/usr/share/doc/sqlite3"), "*.html", "sqlite3-doc"),
    (Path("/usr/share/doc/git-doc"), "*.txt", "git-doc"),
    (Path("/usr/share/doc/nodejs/api"), "*.md.gz", "nodejs-doc"),
    (Path("/usr/share/doc/llvm-14-doc/html/_sources"), "**/*.rst.txt", "llvm-14-doc"),
    (Path("/usr/share/doc/cmake-data/html/_sources"), "**/*.rst.txt", "cmake-doc"),
]


def held_out(path: Path) -> bool:
    """The fixed in-domain held-out files: 1 in HELD_OUT_ONE_IN, by a hash of the path."""
    return int(hashlib.sha256(str(path).encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


class _TextOfHTML(HTMLParser):
    """The visible text of a page: script/style dropped, block elements as line breaks."""

    BLOCKS = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "pre", "tr", "br", "dt", "dd"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:  # noqa: ANN001 - HTMLParser's API
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _TextOfHTML()
    parser.feed(page)
    text = html.unescape("".join(parser.parts))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def documentation_files() -> Iterator[Path]:
    """The training domain's files, in a fixed order."""
    yield from sorted(p for p in KERNEL_DOCS.rglob("*") if p.name.endswith((".rst.gz", ".txt.gz")))
    yield from sorted(PYTHON_DOCS.rglob("*.rst.txt"))


def broad_files() -> Iterator[Path]:
    """--broad's extra training files, in a fixed order."""
    for root, pattern, _ in BROAD:
        yield from sorted(root.glob(pattern))


def _record(path: Path) -> dict:
    text = _read(path)
    return {"text": html_text(text) if path.suffix == ".html" else text, "source": str(path)}


def write_jsonl(path: Path, records: Iterator[dict]) -> tuple[int, int]:
    count = chars = 0
    with path.open("w") as out:
        for record in records:
            if len(record["text"].strip()) < 200:
                continue  # index pages, stubs
            out.write(json.dumps(record) + "\n")
            count, chars = count + 1, chars + len(record["text"])
    return count, chars


# The wrap arm's user turns as run on the GPU on 2026-12-02 (services/data/wrap.py does the rest).
WRAP_ASK = 'Write the documentation page "{title}".'
WRAP_ASK_MORE = 'Continue the documentation page "{title}" (part {part}).'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="directory for the .jsonl")
    parser.add_argument("--broad", action="store_true",
                        help="add BROAD's documentation sets to train.jsonl (~2x the text)")
    args = parser.parse_args(argv)
    needed = dict(PACKAGES) | ({root: pkg for root, _, pkg in BROAD} if args.broad else {})
    missing = [pkg for root, pkg in needed.items() if not root.is_dir()]
    if missing:
        print(f"error: {', '.join(missing)} not installed: apt-get install {' '.join(missing)}",
              file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    docs = list(documentation_files())
    extra = list(broad_files()) if args.broad else []
    sets = {
        "train": (_record(p) for p in docs + extra if not held_out(p)),
        "heldout_docs": (_record(p) for p in docs if held_out(p)),
        "heldout_handbook": (_record(p) for p in sorted(HANDBOOK.glob("*.html"))),
    }
    if extra:
        sets["heldout_broad"] = (_record(p) for p in extra if held_out(p))
    for name, records in sets.items():
        count, chars = write_jsonl(args.output / f"{name}.jsonl", records)
        print(f"{name}: {count} documents, {chars / 1e6:.1f}M characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
