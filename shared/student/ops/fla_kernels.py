"""Tuned Triton configs for flash-linear-attention's kernels: shipped per GPU, and kept per user.

On its first call each fla kernel autotunes: it compiles and times every candidate config, which
took minutes per kernel on a fresh H200 (``chunk_rwkv7`` fwd+bwd > 4 min). fla can load fixed
configs instead (fla/ops/utils/cache.py): ``$FLA_CONFIG_DIR/{kernel}.json``, looked up as
``$FLA_CACHE_MODE`` says, but only for kernels built by its ``CachedAutotuner``. The RWKV-6/7
kernels are built by plain ``triton.autotune``, and fla's own switch
(``configure_fla_cache_autotune``) lives inside ``fla.ops``, whose import already builds them.
So :func:`cached_autotune`, around the first fla import, loads fla's cache module itself (as
``fla.ops.utils.cache``, the one module fla's other kernels import too) and makes
``triton.autotune`` build fla's ``CachedAutotuner`` for the duration of the import, as a subclass
that also keeps every config it had to tune (:class:`KeepingAutotuner` below).

Where the configs come from (:func:`prepare_fla`, before the first fla import):

* shipped: ``fla_configs/<GPU>/`` beside this file (``<GPU>`` is the device name as fla
  sanitises it, e.g. ``NVIDIA_H200``), made on that GPU by ``benchmarks/tune_fla.py``;
* kept: a shape nothing ships for tunes once, in the first process that runs it; each tuned
  config is written at once to the per-user cache (fla_config_cache.py: ``tuned/`` under
  ``$LLAMA2RWKV_KERNEL_CACHE/fla_configs/<GPU>/`` or ``~/.cache/llama2rwkv/fla_configs/<GPU>/``),
  so a crash or a kill later in the run loses nothing;
* fla reads one directory, so each process merges shipped + kept into ``merged/`` there and
  points ``FLA_CONFIG_DIR`` at it.

The user's own ``FLA_CONFIG_DIR`` / ``FLA_CACHE_MODE`` always win (then nothing is merged or
kept). The default mode is ``strict``: a config is used only for the exact autotune key (block
sizes, some head counts, dtypes) it was tuned for, anything else is tuned as before, so no file
can force a config onto a shape it was not measured on. One exception: a varlen launch (packed
documents) uses the config of the same launch without its ``cu_seqlens`` tensors
(:func:`dense_twin_key`), as the two differ only in those tensors' dtypes in the key.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from shared.student.ops.fla_config_cache import (
    gpu_cache_dir,
    keep_entries,
    prepare_merged_dir,
    read_config_file,
    runtime_versions,
    write_atomic,
)

SHIPPED_DIR = Path(__file__).with_name("fla_configs")
DEFAULT_CACHE_MODE = "strict"
_CACHE_MODULE = "fla.ops.utils.cache"
# FLA_CONFIG_DIR as prepare_fla set it: a child process inheriting it is not "the user's choice"
_OURS_ENV = "LLAMA2RWKV_FLA_CONFIG_DIR"
log = logging.getLogger(__name__)
_keep_dir: Path | None = None  # the GPU's cache dir where this process keeps what it tunes
_tuned_here: list[str] = []  # kernels this process tuned (not found in the config files)
_prepared: tuple[str | None] | None = None  # prepare_fla's answer, once it has run


def gpu_dir_name(device_name: str) -> str:
    """fla's sanitised GPU name (fla/ops/utils/cache.py ``sanitize_gpu_name``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def current_gpu() -> str | None:
    """This machine's GPU as fla names its config dirs (``FLA_GPU_NAME`` overrides), or None."""
    if os.environ.get("FLA_GPU_NAME"):
        return gpu_dir_name(os.environ["FLA_GPU_NAME"])
    import torch

    return gpu_dir_name(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def shipped_config_dir(gpu: str | None = None) -> Path | None:
    """Our tuned configs for ``gpu`` (default: the current CUDA device), if we ship any."""
    gpu = gpu or current_gpu()
    path = SHIPPED_DIR / gpu if gpu else None
    return path if path is not None and path.is_dir() else None


def _load_cache_module() -> ModuleType | None:
    """fla's fla/ops/utils/cache.py as ``fla.ops.utils.cache``, loaded without importing fla."""
    if _CACHE_MODULE in sys.modules:
        return sys.modules[_CACHE_MODULE]
    spec = importlib.util.find_spec("fla")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "utils" / "cache.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location(_CACHE_MODULE, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[_CACHE_MODULE] = module  # fla's own kernels import this very module later
    try:
        mod_spec.loader.exec_module(module)  # imports torch, triton and packaging only
    except BaseException:
        del sys.modules[_CACHE_MODULE]
        raise
    return module


def prepare_fla(gpu: str | None = None, include_shipped: bool = True) -> str | None:
    """Point fla at shipped + kept configs (unless the user chose theirs). Before any fla import.

    ``gpu`` defaults to the current device's name; ``include_shipped=False`` leaves the shipped
    configs out (tune_fla.py measures a shape we do not ship with it). Returns the config
    directory fla will read, or None (no GPU, or ``FLA_CACHE_MODE=disabled``). Once per
    process: later calls (the fla import guard makes one) return the first call's answer.
    """
    global _prepared
    if _prepared is not None:
        return _prepared[0]
    _prepared = (_choose_config_dir(gpu, include_shipped),)
    return _prepared[0]


def _choose_config_dir(gpu: str | None, include_shipped: bool) -> str | None:
    global _keep_dir
    chosen = os.environ.get("FLA_CONFIG_DIR")
    if chosen is not None and chosen != os.environ.get(_OURS_ENV):
        os.environ.setdefault("FLA_CACHE_MODE", DEFAULT_CACHE_MODE)
        return chosen
    os.environ.pop("FLA_CONFIG_DIR", None)
    mode = os.environ.setdefault("FLA_CACHE_MODE", DEFAULT_CACHE_MODE)
    gpu = gpu or current_gpu()
    if gpu is None or mode == "disabled":
        return None
    shipped = shipped_config_dir(gpu) if include_shipped else None
    cache_dir = gpu_cache_dir(gpu)
    try:
        config_dir: Path | None = prepare_merged_dir(shipped, cache_dir)
        _keep_dir = cache_dir
    except OSError as exc:
        log.warning("fla config cache %s is unusable (%s): shipped configs only, nothing tuned "
                    "is kept; set LLAMA2RWKV_KERNEL_CACHE to a writable directory",
                    cache_dir, exc)
        config_dir = shipped
    if config_dir is None:
        return None
    os.environ["FLA_CONFIG_DIR"] = os.environ[_OURS_ENV] = str(config_dir)
    return str(config_dir)


def tuned_in_this_process() -> list[str]:
    """Kernels (one name per key) that found no config in the files and tuned in this process."""
    return list(_tuned_here)


def _keep_new_configs(tuner: Any, cache: ModuleType) -> None:
    """Write the configs ``tuner`` tuned since last time into the user cache (at once: a run
    that is killed later still keeps them)."""
    global _keep_dir
    seen = tuner.__dict__.setdefault("_llama2rwkv_seen", set())
    new = {key: config for key, config in tuner.cache.items() if key not in seen}
    seen.update(new)
    if not new:
        return
    _tuned_here.extend(tuner.kernel_name for _ in new)
    if _keep_dir is None:
        return
    entries = {cache.AutotuneKey.key_hash(key): {
        "autotune_key": cache.AutotuneKey.normalize_autotune_key(list(key)),
        "config": config_as_dict(config)} for key, config in new.items()}
    try:
        keep_entries(_keep_dir, tuner.kernel_name, entries, runtime_versions())
    except Exception as exc:  # noqa: BLE001 - never fail a kernel launch over the cache
        log.warning("cannot keep tuned fla configs in %s (%s); not trying again", _keep_dir, exc)
        _keep_dir = None


# Arguments that only varlen calls (packed documents, ``cu_seqlens``) pass as tensors.
_VARLEN_ARGS = ("chunk_indices", "chunk_offsets", "split_indices", "split_offsets")


def _is_varlen_arg(name: str) -> bool:
    return name.startswith("cu_seqlens") or name in _VARLEN_ARGS


def dense_twin_key(build: Callable[..., Any], arg_names: list[str], key_names: list[str],
                   nargs: dict[str, Any], runtime_kwargs: dict[str, Any]) -> Any:
    """The autotune key the same launch would have without its varlen tensors, or None when it
    passes none. fla's key holds the dtype of every tensor argument, so a varlen launch
    (``student.packed_layout: segments``) has two or three int32 entries more than the launch
    the shipped configs were tuned on, and in strict mode it would tune every kernel again
    (> 120 s on an H200, 2026-12-02). Its tile configs are the dense ones' (same kernel, same
    block sizes; varlen only maps program ids to documents), so that key's config is used. A
    key that holds the batch size (a few cumsum kernels) still misses: varlen rows are one."""
    if not any(_is_varlen_arg(n) and v is not None
               for n, v in (*nargs.items(), *runtime_kwargs.items())):
        return None

    def dense(name: str, value: Any) -> Any:
        if name == "IS_VARLEN":  # fla's heuristic, part of some kernels' keys
            return False
        return None if _is_varlen_arg(name) else value

    positional = tuple(dense(n, v) for n, v in nargs.items())
    kwargs = {n: dense(n, v) for n, v in runtime_kwargs.items()}
    return build(arg_names, key_names, positional, kwargs)


def _keeping_autotune(cache: ModuleType, fla_autotune: Callable[..., Any]) -> Callable[..., Any]:
    """``fla_autotune`` (fla's ``fla_cache_autotune``, or tune_fla's shard of it) building a
    ``CachedAutotuner`` that keeps what it tunes."""

    class KeepingAutotuner(cache.CachedAutotuner):
        def maybe_load_cached_config(self, key: Any, nargs: dict[str, Any],
                                     runtime_kwargs: dict[str, Any]) -> None:
            super().maybe_load_cached_config(key=key, nargs=nargs, runtime_kwargs=runtime_kwargs)
            seen = self.__dict__.setdefault("_llama2rwkv_seen", set())
            twin = None
            if key.autotune_key not in self.cache:
                twin = dense_twin_key(cache.AutotuneKey.build, self.arg_names, self.keys, nargs,
                                      runtime_kwargs)
            if twin is not None:
                super().maybe_load_cached_config(key=twin, nargs=nargs,
                                                 runtime_kwargs=runtime_kwargs)
                if twin.autotune_key in self.cache:
                    self.cache[key.autotune_key] = self.cache[twin.autotune_key]
                    seen.add(twin.autotune_key)
            if key.autotune_key in self.cache:  # loaded from a file: nothing to keep
                seen.add(key.autotune_key)

        def run(self, *args: Any, **kwargs: Any) -> Any:
            known = len(self.cache)
            result = super().run(*args, **kwargs)
            if len(self.cache) > known:  # once per new key, so the hot path stays a len()
                _keep_new_configs(self, cache)
            return result

    def autotune(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        build = fla_autotune(*args, **kwargs)

        def decorator(fn: Any) -> Any:
            tuner = build(fn)
            tuner.__class__ = KeepingAutotuner  # same object, fla's constructor, our two hooks
            return tuner
        return decorator
    return autotune


@contextlib.contextmanager
def cached_autotune() -> Iterator[ModuleType | None]:
    """While fla's modules are imported, ``triton.autotune`` and fla's own
    ``fla_cache_autotune`` build a ``CachedAutotuner`` that keeps what it tunes."""
    if "fla.ops" in sys.modules:  # imported before us: its kernels are built already
        yield None
        return
    cache = _load_cache_module()
    if cache is None:
        yield None
        return
    import triton

    original, fla_original = triton.autotune, cache.fla_cache_autotune
    keeping = _keeping_autotune(cache, fla_original)
    triton.autotune = cache.fla_cache_autotune = keeping
    try:
        yield cache
    finally:
        triton.autotune = original
        if cache.fla_cache_autotune is keeping:
            cache.fla_cache_autotune = fla_original


def config_as_dict(config: Any) -> dict[str, Any]:
    """A triton.Config in the shape fla's config files hold."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": getattr(config, "num_ctas", 1),
            "maxnreg": getattr(config, "maxnreg", None)}


def fla_autotuners() -> list[Any]:
    """Every Triton autotuner defined at module level in the imported fla modules."""
    from triton.runtime.autotuner import Autotuner

    found: dict[int, Any] = {}
    for name, module in list(sys.modules.items()):
        if name == "fla" or name.startswith("fla."):
            for value in vars(module).values():
                while not isinstance(value, Autotuner) and hasattr(value, "fn"):
                    value = value.fn  # @triton.heuristics wraps the autotuner
                if isinstance(value, Autotuner):
                    found[id(value)] = value
    return list(found.values())


def dump_tuned(out_dir: Path) -> dict[str, int]:
    """Write every config this process holds into ``out_dir/{kernel}.json``, over the entries
    already there (so runs for other shapes add entries, and a retune replaces its keys).
    Returns entries per kernel. For ``tune_fla.py``, the one writer of the shipped dirs."""
    import triton

    cache = _load_cache_module()
    if cache is None:
        raise RuntimeError("flash-linear-attention is not installed: nothing to dump")
    found: dict[str, dict[str, dict[str, Any]]] = {}
    conflicts: dict[str, set[str]] = {}
    for tuner in fla_autotuners():
        if not tuner.cache or len(tuner.configs) <= 1:
            continue  # never ran, or nothing to choose
        name = getattr(tuner, "kernel_name", None) or tuner.base_fn.__name__
        entries = found.setdefault(name, {})
        for key, config in tuner.cache.items():
            digest = cache.AutotuneKey.key_hash(key)
            entry = {"autotune_key": cache.AutotuneKey.normalize_autotune_key(list(key)),
                     "config": config_as_dict(config)}
            if digest in entries and entries[digest]["config"] != entry["config"]:
                # two kernels of one name (different modules) with one key: keep neither guess
                log.warning("%s: conflicting configs for key %s; dropped", name, key)
                conflicts.setdefault(name, set()).add(digest)
            entries[digest] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, entries in found.items():
        path = out_dir / f"{name}.json"
        data = read_config_file(path) or {"kernel_name": name,
                                          "triton_version": triton.__version__,
                                          "autotune_entries": {}}
        data["autotune_entries"].update(entries)
        for digest in conflicts.get(name, ()):
            data["autotune_entries"].pop(digest, None)
        write_atomic(path, data)
        counts[name] = len(data["autotune_entries"])
    return counts
