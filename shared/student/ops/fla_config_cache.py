"""fla kernel configs on disk: the per-user cache runs keep, and the merged directory fla reads.

fla reads one directory (``FLA_CONFIG_DIR``) of ``{kernel}.json`` files, each holding
``autotune_entries``: ``{md5 of the autotune key: {"autotune_key": [...], "config": {...}}}``
(fla/ops/utils/cache.py). We have two sources for it: the configs we ship
(``fla_configs/<GPU>/`` beside this file) and what earlier runs on this machine tuned for shapes
we do not ship. The cache of one GPU model is ``<root>/fla_configs/<GPU>/`` with

* ``tuned/{kernel}.json``: entries a run tuned itself, added as soon as they are tuned;
* ``merged/{kernel}.json``: shipped + tuned, rebuilt when a process prepares fla; the directory
  fla is pointed at.

``<root>`` is ``$LLAMA2RWKV_KERNEL_CACHE`` (compose sets it to the ``kernel-cache`` volume) or
``$XDG_CACHE_HOME/llama2rwkv`` (default ``~/.cache/llama2rwkv``). Several ranks of one node
share it: every change happens under an exclusive lock on the GPU's directory and replaces a
file atomically, so a reader sees a whole old or a whole new file. Entries are keyed exactly as
fla keys them; nothing here reads a key, so strict lookup is untouched.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

KERNEL_CACHE_ENV = "LLAMA2RWKV_KERNEL_CACHE"
log = logging.getLogger(__name__)
_thread_lock = threading.Lock()  # flock is per open file: threads of one process also serialise


@functools.cache
def runtime_versions() -> dict[str, str | None]:
    """The installed Triton and fla versions. A kept file records them and is only used under
    the same ones: after an upgrade a kernel may need other resources than it was tuned with."""
    versions: dict[str, str | None] = {}
    for field, dist in (("triton_version", "triton"), ("fla_version", "fla-core")):
        try:
            versions[field] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[field] = None
    return versions


def _same_versions(data: dict[str, Any], versions: dict[str, str | None]) -> bool:
    return all(data.get(field) == value for field, value in versions.items())


def cache_root() -> Path:
    """Where our kernel caches live: ``$LLAMA2RWKV_KERNEL_CACHE`` or the user's cache dir."""
    root = os.environ.get(KERNEL_CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama2rwkv"


def gpu_cache_dir(gpu: str) -> Path:
    """The fla config cache of one GPU model (``gpu`` as fla sanitises device names)."""
    return cache_root() / "fla_configs" / gpu


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` (created if missing) across processes and threads."""
    directory.mkdir(parents=True, exist_ok=True)
    with _thread_lock:
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
            yield
        finally:
            os.close(fd)


def read_config_file(path: Path) -> dict[str, Any] | None:
    """A config file's contents, or None (with a warning) when it is missing or not fla's format.

    Entries without a ``config`` dict are dropped, as fla would refuse the whole file for them.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring fla config file %s: %s", path, exc)
        return None
    entries = data.get("autotune_entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        log.warning("ignoring fla config file %s: no 'autotune_entries' dict", path)
        return None
    data["autotune_entries"] = {h: e for h, e in entries.items()
                                if isinstance(e, dict) and isinstance(e.get("config"), dict)}
    return data


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file in the same directory and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        # no fsync: a cache; a file lost to a power cut is only ignored (with a warning)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def keep_entries(gpu_dir: Path, kernel: str, entries: dict[str, dict[str, Any]],
                 versions: dict[str, str | None]) -> int:
    """Add tuned entries to ``gpu_dir/tuned/{kernel}.json``; returns how many were new.

    An entry already there stays: when several ranks tune one key at once their winners differ
    only by timing noise, and the first one kept is what every later process loads. A file kept
    under other ``versions`` (see :func:`runtime_versions`) is started afresh.
    """
    tuned = gpu_dir / "tuned"
    with locked(gpu_dir):
        tuned.mkdir(exist_ok=True)
        path = tuned / f"{kernel}.json"
        data = read_config_file(path)
        if data is None or not _same_versions(data, versions):
            data = {"kernel_name": kernel, **versions, "autotune_entries": {}}
        known = data["autotune_entries"]
        new = {h: e for h, e in entries.items() if h not in known}
        if new:
            known.update(new)
            write_atomic(path, data)
        return len(new)


def merge_file(shipped: dict[str, Any] | None, tuned: dict[str, Any] | None,
               kernel: str) -> dict[str, Any]:
    """One kernel's merged file: the tuned entries, overridden by shipped ones for the same key
    (a shipped config was measured on purpose; it also lets a newer release replace a guess)."""
    base = shipped or tuned or {}
    merged: dict[str, Any] = {"kernel_name": base.get("kernel_name", kernel),
                              "triton_version": base.get("triton_version"),
                              "autotune_entries": {}}
    for source in (tuned, shipped):
        if source:
            merged["autotune_entries"].update(source["autotune_entries"])
            if isinstance(source.get("default_config"), dict):
                merged["default_config"] = source["default_config"]
    return merged


def merge_config_dirs(shipped: Path | None, tuned: Path, merged: Path,
                      versions: dict[str, str | None] | None = None) -> dict[str, int]:
    """Make ``merged`` hold shipped + tuned for every kernel; returns entries per kernel.

    Tuned files kept under other ``versions`` than given are left out (shipped ones are pinned
    by constraints.txt). Only files whose content changes are rewritten; files of kernels in
    neither source go. The caller holds the lock (see :func:`prepare_merged_dir`).
    """
    def files(directory: Path | None) -> dict[str, Path]:
        if directory is None or not directory.is_dir():
            return {}
        return {p.stem: p for p in directory.glob("*.json")}

    shipped_files, tuned_files = files(shipped), files(tuned)
    merged.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for kernel in sorted(shipped_files.keys() | tuned_files.keys()):
        sources = [read_config_file(found[kernel]) if kernel in found else None
                   for found in (shipped_files, tuned_files)]
        if sources[1] is not None and versions and not _same_versions(sources[1], versions):
            log.info("fla configs kept in %s were tuned under %s, not %s: left out",
                     tuned_files[kernel], {k: sources[1].get(k) for k in versions}, versions)
            sources[1] = None
        if sources == [None, None]:
            continue  # unreadable (warned): fla tunes this kernel as if it had no file
        data = merge_file(*sources, kernel)
        target = merged / f"{kernel}.json"
        if read_config_file(target) != data:
            write_atomic(target, data)
        counts[kernel] = len(data["autotune_entries"])
    for stale in files(merged).keys() - counts.keys():
        (merged / f"{stale}.json").unlink(missing_ok=True)
    return counts


def prepare_merged_dir(shipped: Path | None, gpu_dir: Path) -> Path:
    """Rebuild ``gpu_dir/merged`` from the shipped configs and ``gpu_dir/tuned`` (the files kept
    under this process's :func:`runtime_versions`), under the lock; returns the merged
    directory (the one to give fla as ``FLA_CONFIG_DIR``)."""
    with locked(gpu_dir):
        counts = merge_config_dirs(shipped, gpu_dir / "tuned", gpu_dir / "merged",
                                   runtime_versions())
    log.info("fla configs: %d kernels, %d entries in %s", len(counts), sum(counts.values()),
             gpu_dir / "merged")
    return gpu_dir / "merged"
