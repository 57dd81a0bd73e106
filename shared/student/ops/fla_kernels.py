"""Tuned Triton configs for flash-linear-attention's kernels, shipped per GPU model.

On its first call each fla kernel autotunes: it compiles and times every candidate config, which
took minutes per kernel on a fresh H200 (``chunk_rwkv7`` fwd+bwd > 4 min). fla can load fixed
configs instead (fla/ops/utils/cache.py): ``$FLA_CONFIG_DIR/{kernel}.json``, looked up as
``$FLA_CACHE_MODE`` says, but only for kernels built by its ``CachedAutotuner``. The RWKV-6/7
kernels are built by plain ``triton.autotune``, and fla's own switch
(``configure_fla_cache_autotune``) lives inside ``fla.ops``, whose import already builds them.
So :func:`prepare_fla`, called before the first fla import, loads fla's cache module on its own
and makes it ``triton.autotune`` for the duration of the import.

Shipped configs live in ``fla_configs/<GPU>/`` beside this file (``<GPU>`` is the device name as
fla sanitises it, e.g. ``NVIDIA_H200``), made on that GPU by ``benchmarks/tune_fla.py``. The user's
own ``FLA_CONFIG_DIR`` / ``FLA_CACHE_MODE`` always win. The default mode is ``strict``: a config is
used only for the exact autotune key (block sizes, head counts, dtypes) it was tuned for, anything
else is tuned as before, so a shipped file can never force a config onto a shape it was not
measured on.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

SHIPPED_DIR = Path(__file__).with_name("fla_configs")
DEFAULT_CACHE_MODE = "strict"
_CACHE_MODULE = "_llama2rwkv_fla_cache"
log = logging.getLogger(__name__)

def gpu_dir_name(device_name: str) -> str:
    """fla's sanitised GPU name (fla/ops/utils/cache.py ``sanitize_gpu_name``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def shipped_config_dir() -> Path | None:
    """Our tuned configs for the current CUDA device, if we ship any."""
    import torch

    if not torch.cuda.is_available():
        return None
    path = SHIPPED_DIR / gpu_dir_name(torch.cuda.get_device_name())
    return path if path.is_dir() else None


def _load_cache_module() -> ModuleType | None:
    spec = importlib.util.find_spec("fla")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    if _CACHE_MODULE in sys.modules:
        return sys.modules[_CACHE_MODULE]
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "utils" / "cache.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location(_CACHE_MODULE, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[_CACHE_MODULE] = module
    mod_spec.loader.exec_module(module)  # imports torch, triton and packaging only
    return module


def prepare_fla() -> str | None:
    """Point fla at our tuned configs (unless the user chose theirs). Before any fla import.

    Returns the config directory fla will read, or None.
    """
    if "FLA_CONFIG_DIR" not in os.environ:
        shipped = shipped_config_dir()
        if shipped is not None:
            os.environ["FLA_CONFIG_DIR"] = str(shipped)
    if "FLA_CONFIG_DIR" in os.environ:
        os.environ.setdefault("FLA_CACHE_MODE", DEFAULT_CACHE_MODE)
    return os.environ.get("FLA_CONFIG_DIR")


@contextlib.contextmanager
def cached_autotune() -> Iterator[ModuleType | None]:
    """While fla's modules are imported, ``triton.autotune`` builds fla's ``CachedAutotuner``."""
    if "fla.ops" in sys.modules:  # imported before us: its kernels are built already
        yield None
        return
    cache = _load_cache_module()
    if cache is None:
        yield None
        return
    import triton

    original = triton.autotune

    triton.autotune = cache.fla_cache_autotune
    try:
        yield cache
    finally:
        triton.autotune = original


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
    """Write every tuned result of this process into ``out_dir/{kernel}.json``, merged with the
    files already there (so runs for other shapes add entries). Returns entries per kernel."""
    import triton

    cache = _load_cache_module()
    if cache is None:
        raise RuntimeError("flash-linear-attention is not installed: nothing to dump")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for tuner in fla_autotuners():
        if not tuner.cache or len(tuner.configs) <= 1:
            continue  # never ran, or nothing to choose
        name = getattr(tuner, "kernel_name", None) or tuner.base_fn.__name__
        path = out_dir / f"{name}.json"
        data = json.loads(path.read_text()) if path.is_file() else {
            "kernel_name": name, "triton_version": triton.__version__,
            "autotune_entries": {}}
        entries = data["autotune_entries"]
        for key, config in tuner.cache.items():
            digest = cache.AutotuneKey.key_hash(key)
            entry = {"autotune_key": cache.AutotuneKey.normalize_autotune_key(list(key)),
                     "config": config_as_dict(config)}
            if digest in entries and entries[digest]["config"] != entry["config"]:
                # two kernels of one name (different modules) with one key: keep neither guess
                log.warning("%s: conflicting configs for key %s; dropped", name, key)
                entries[digest]["conflict"] = True
                continue
            entries[digest] = entry
        data["autotune_entries"] = {h: e for h, e in entries.items() if not e.get("conflict")}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
        counts[name] = len(data["autotune_entries"])
    return counts
