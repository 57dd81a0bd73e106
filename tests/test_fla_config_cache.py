"""fla config cache on CPU: the cache directory, shipped + kept merge, concurrent keeping, and
prepare_fla's choice of FLA_CONFIG_DIR, with real files in fla's format (fla/ops/utils/cache.py).

The end-to-end case (a real Triton autotuner built through fla's own cache module keeps what it
tuned, and a second process tunes nothing) needs triton and flash-linear-attention: on CPU it
runs in Triton's interpreter where they are installed, otherwise it is skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.student.ops import fla_config_cache as fcc
from shared.student.ops import fla_kernels

ROOT = Path(__file__).resolve().parents[1]
H200 = fla_kernels.SHIPPED_DIR / "NVIDIA_H200"
V1 = {"triton_version": "3.5.1", "fla_version": "0.6.0"}
ENV = ("FLA_CONFIG_DIR", "FLA_CACHE_MODE", "LLAMA2RWKV_FLA_CONFIG_DIR", "FLA_GPU_NAME",
       fcc.KERNEL_CACHE_ENV, "XDG_CACHE_HOME")


@pytest.fixture
def clean_env(monkeypatch):
    """No fla / cache variables; whatever prepare_fla sets is undone after the test."""
    for name in ENV:
        monkeypatch.setenv(name, "")  # records the original, so teardown restores it
        monkeypatch.delenv(name)
    monkeypatch.setattr(fla_kernels, "_keep_dir", None)
    monkeypatch.setattr(fla_kernels, "_prepared", None)  # as in a new process
    return monkeypatch


def entry(key: list, block: int, warps: int = 4) -> dict:
    return {"autotune_key": key, "config": {"kwargs": {"BT": block}, "num_warps": warps,
                                            "num_stages": 2, "num_ctas": 1, "maxnreg": None}}


def write(path: Path, entries: dict, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kernel_name": path.stem, "triton_version": "3.5.1",
                                "autotune_entries": entries, **extra}))


def entries_of(path: Path) -> dict:
    return json.loads(path.read_text())["autotune_entries"]


def test_cache_dir_from_env_then_xdg_then_home(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path / "home"))
    assert fcc.gpu_cache_dir("NVIDIA_H200") == (
        tmp_path / "home/.cache/llama2rwkv/fla_configs/NVIDIA_H200")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fcc.gpu_cache_dir("X") == tmp_path / "xdg/llama2rwkv/fla_configs/X"
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path / "volume"))
    assert fcc.gpu_cache_dir("X") == tmp_path / "volume/fla_configs/X"


def test_merge_shipped_wins_conflicts_and_tuned_adds(tmp_path, caplog):
    shipped, tuned, merged = tmp_path / "shipped", tmp_path / "tuned", tmp_path / "merged"
    write(shipped / "k.json", {"a": entry([64], 64), "b": entry([32], 32)})
    write(tuned / "k.json", {"b": entry([32], 16, warps=8), "c": entry([16], 16)})
    write(tuned / "only_tuned.json", {"d": entry([8], 8)})
    write(shipped / "only_shipped.json", {"e": entry([4], 4)}, default_config={"num_warps": 2})
    (tuned / "broken.json").write_text("{not json")
    write(merged / "gone.json", {"z": entry([1], 1)})  # from an earlier merge, no source now

    counts = fcc.merge_config_dirs(shipped, tuned, merged)

    assert counts == {"k": 3, "only_tuned": 1, "only_shipped": 1}
    k = entries_of(merged / "k.json")
    assert k["b"] == entry([32], 32)  # the shipped config, not the tuned one
    assert k["a"] == entry([64], 64) and k["c"] == entry([16], 16)
    assert entries_of(merged / "only_tuned.json") == {"d": entry([8], 8)}
    assert json.loads((merged / "only_shipped.json").read_text())["default_config"] == {
        "num_warps": 2}
    assert sorted(p.name for p in merged.iterdir()) == [
        "k.json", "only_shipped.json", "only_tuned.json"]
    assert "broken.json" in caplog.text

    inode = (merged / "k.json").stat().st_ino
    fcc.merge_config_dirs(shipped, tuned, merged)  # unchanged sources: files stay as they are
    assert (merged / "k.json").stat().st_ino == inode


def test_merge_keeps_every_shipped_entry(tmp_path):
    tuned = tmp_path / "tuned"
    write(tuned / "wu_fwd_kernel.json", {"new": entry([9, 64, 64, 64, 64, 64, False], 64)})
    counts = fcc.merge_config_dirs(H200, tuned, tmp_path / "merged")
    shipped = {p.stem: len(entries_of(p)) for p in H200.glob("*.json")}
    assert counts == {k: n + (k == "wu_fwd_kernel") for k, n in shipped.items()}
    for path in H200.glob("*.json"):
        assert entries_of(path).items() <= entries_of(tmp_path / "merged" / path.name).items()


def test_keep_entries_first_writer_wins(tmp_path):
    gpu = tmp_path / "GPU"
    assert fcc.keep_entries(gpu, "k", {"a": entry([1], 16)}, V1) == 1
    assert fcc.keep_entries(gpu, "k", {"a": entry([1], 32), "b": entry([2], 32)}, V1) == 1
    assert entries_of(gpu / "tuned/k.json") == {"a": entry([1], 16), "b": entry([2], 32)}
    assert [p.name for p in (gpu / "tuned").iterdir()] == ["k.json"]  # no temporary files left


def test_versions_guard_kept_configs(tmp_path):
    gpu = tmp_path / "GPU"
    fcc.keep_entries(gpu, "k", {"a": entry([1], 16)}, V1)
    v2 = {**V1, "fla_version": "0.7.0"}
    # merged under other versions: the kept file is left out
    assert fcc.merge_config_dirs(None, gpu / "tuned", tmp_path / "merged", v2) == {}
    assert fcc.merge_config_dirs(None, gpu / "tuned", tmp_path / "merged", V1) == {"k": 1}
    # kept under other versions: the old entries go
    fcc.keep_entries(gpu, "k", {"b": entry([2], 16)}, v2)
    data = json.loads((gpu / "tuned/k.json").read_text())
    assert data["fla_version"] == "0.7.0" and list(data["autotune_entries"]) == ["b"]


# loaded by path: the stdlib-only module, without the package's torch import (seconds per
# process on a busy machine)
KEEPER = """
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("fla_config_cache", sys.argv[3])
cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)
gpu, tag = pathlib.Path(sys.argv[1]), sys.argv[2]
for i in range(100):
    for kernel in ("shared_a", "shared_b"):
        cache.keep_entries(gpu, kernel, {f"{tag}{i}": {"autotune_key": [i],
                                                       "config": {"num_warps": 4}}}, {})
"""
READER = """
import json, pathlib, sys
tuned = pathlib.Path(sys.argv[1]) / "tuned"
bad = reads = 0
while not (pathlib.Path(sys.argv[1]) / "done").exists():
    for path in tuned.glob("*.json"):
        try:
            json.loads(path.read_text()); reads += 1
        except FileNotFoundError:
            pass
        except ValueError:
            bad += 1
print(reads, bad)
"""


def test_concurrent_keepers_lose_nothing_and_readers_see_whole_files(tmp_path):
    gpu = tmp_path / "GPU"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(gpu)], stdout=subprocess.PIPE,
                              text=True)
    keepers = [subprocess.Popen([sys.executable, "-c", KEEPER, str(gpu), tag, fcc.__file__])
               for tag in ("p", "q")]
    assert [p.wait(timeout=300) for p in keepers] == [0, 0]
    (gpu / "done").touch()
    reads, bad = map(int, reader.communicate(timeout=60)[0].split())
    for kernel in ("shared_a", "shared_b"):
        assert sorted(entries_of(gpu / f"tuned/{kernel}.json")) == sorted(
            f"{tag}{i}" for tag in "pq" for i in range(100))
    assert bad == 0 and reads > 0


def test_prepare_fla_points_fla_at_shipped_plus_kept(clean_env, tmp_path):
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path))
    gpu_dir = tmp_path / "fla_configs/NVIDIA_H200"
    write(gpu_dir / "tuned/wu_fwd_kernel.json", {"new": entry([9], 64)}, **fcc.runtime_versions())

    chosen = fla_kernels.prepare_fla(gpu="NVIDIA_H200")

    assert chosen == os.environ["FLA_CONFIG_DIR"] == str(gpu_dir / "merged")
    assert os.environ["FLA_CACHE_MODE"] == "strict"
    assert fla_kernels._keep_dir == gpu_dir
    assert sorted(p.name for p in (gpu_dir / "merged").glob("*.json")) == sorted(
        p.name for p in H200.glob("*.json"))
    assert "new" in entries_of(gpu_dir / "merged/wu_fwd_kernel.json")
    # a child process inherits our FLA_CONFIG_DIR: that is not the user's choice, so it
    # merges (and keeps) as well
    (gpu_dir / "tuned/wu_fwd_kernel.json").unlink()
    assert fla_kernels.prepare_fla(gpu="NVIDIA_H200") == chosen  # once per process: as it was
    assert "new" in entries_of(gpu_dir / "merged/wu_fwd_kernel.json")
    clean_env.setattr(fla_kernels, "_prepared", None)  # the child process
    assert fla_kernels.prepare_fla(gpu="NVIDIA_H200") == chosen
    assert "new" not in entries_of(gpu_dir / "merged/wu_fwd_kernel.json")


def test_prepare_fla_for_a_gpu_we_do_not_ship_uses_the_cache_alone(clean_env, tmp_path):
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path))
    write(tmp_path / "fla_configs/NVIDIA_B200/tuned/k.json", {"a": entry([1], 16)},
          **fcc.runtime_versions())
    chosen = Path(fla_kernels.prepare_fla(gpu="NVIDIA_B200"))
    assert [p.name for p in chosen.glob("*.json")] == ["k.json"]


def test_prepare_fla_without_shipped_uses_the_cache_alone(clean_env, tmp_path):
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path))
    chosen = Path(fla_kernels.prepare_fla(gpu="NVIDIA_H200", include_shipped=False))
    assert chosen.is_dir() and not list(chosen.iterdir())
    assert fla_kernels.prepare_fla() == str(chosen)  # the import guard's call changes nothing


def test_users_own_config_dir_wins(clean_env, tmp_path):
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path / "cache"))
    clean_env.setenv("FLA_CONFIG_DIR", str(tmp_path / "mine"))
    clean_env.setenv("FLA_CACHE_MODE", "fuzzy")
    assert fla_kernels.prepare_fla(gpu="NVIDIA_H200") == str(tmp_path / "mine")
    assert os.environ["FLA_CACHE_MODE"] == "fuzzy"
    assert fla_kernels._keep_dir is None and not (tmp_path / "cache").exists()


def test_disabled_mode_loads_and_keeps_nothing(clean_env, tmp_path):
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path))
    clean_env.setenv("FLA_CACHE_MODE", "disabled")
    assert fla_kernels.prepare_fla(gpu="NVIDIA_H200") is None
    assert "FLA_CONFIG_DIR" not in os.environ and fla_kernels._keep_dir is None


def test_unwritable_cache_falls_back_to_shipped(clean_env, tmp_path, caplog):
    (tmp_path / "file").write_text("")
    clean_env.setenv(fcc.KERNEL_CACHE_ENV, str(tmp_path / "file"))  # not a directory
    assert fla_kernels.prepare_fla(gpu="NVIDIA_H200") == str(H200)
    assert fla_kernels._keep_dir is None
    assert "LLAMA2RWKV_KERNEL_CACHE" in caplog.text


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_has("triton") and _has("fla")),
                    reason="needs triton and flash-linear-attention (the GPU extra)")
def test_second_process_tunes_nothing(tmp_path):
    """A real autotuner through fla's cache module: process 1 tunes and keeps, process 2 loads
    the kept config in strict mode (on CPU in Triton's interpreter)."""
    import torch

    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               LLAMA2RWKV_KERNEL_CACHE=str(tmp_path / "cache"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    worker = [sys.executable, str(ROOT / "tests/fla_keep_worker.py")]
    first = json.loads(subprocess.run(worker, env=env, check=True, capture_output=True,
                                      text=True).stdout)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-2")  # Triton's own autotune cache: empty
    second = json.loads(subprocess.run(worker, env=env, check=True, capture_output=True,
                                       text=True).stdout)
    assert first["tuned"] == ["add_one_kernel"] and second["tuned"] == []
    assert first["config_dir"] == second["config_dir"]
    kept = entries_of(Path(first["config_dir"]).parent / "tuned/add_one_kernel.json")
    assert [e["config"]["kwargs"]["BLOCK"] for e in kept.values()] == [second["block"]]


def fla_key_build(arg_names, key_names, positional, runtime_kwargs):
    """fla 0.6's AutotuneKey.build (fla/ops/utils/cache.py): the key arguments' values, then the
    dtype of every tensor argument, in argument order."""
    given = {**dict(zip(arg_names, positional, strict=False)), **runtime_kwargs}
    tracked = {k: v for k, v in given.items() if k in arg_names}
    key = [tracked[n] for n in key_names if n in tracked]
    key += [str(v.dtype) for v in tracked.values() if hasattr(v, "dtype")]
    return tuple(key)


def test_a_varlen_launch_finds_the_config_of_its_dense_twin():
    """A packed-documents launch's key (int32 cu_seqlens and chunk_indices among the dtypes) maps
    to the key the shipped configs hold; a dense launch has no twin."""
    import torch

    names = ["q", "k", "h", "cu_seqlens", "chunk_indices", "T", "H", "K", "BT", "IS_VARLEN"]
    q = k = torch.zeros(1, dtype=torch.bfloat16)
    h = torch.zeros(1, dtype=torch.float32)
    cu = idx = torch.zeros(1, dtype=torch.int32)
    dense = fla_key_build(names, ["H", "K", "BT"], (q, k, h, None, None, 2048, 9, 64),
                          {"BT": 64, "IS_VARLEN": False})
    dense_args = dict(zip(names[:8], (q, k, h, None, None, 2048, 9, 64), strict=True))
    assert fla_kernels.dense_twin_key(fla_key_build, names, ["H", "K", "BT"], dense_args,
                                      {"BT": 64, "IS_VARLEN": False}) is None
    varlen_args = dict(zip(names[:8], (q, k, h, cu, idx, 8192, 9, 64), strict=True))
    varlen = fla_key_build(names, ["H", "K", "BT"], tuple(varlen_args.values()),
                           {"BT": 64, "IS_VARLEN": True})
    assert varlen != dense and varlen.count("torch.int32") == 2
    twin = fla_kernels.dense_twin_key(fla_key_build, names, ["H", "K", "BT"], varlen_args,
                                      {"BT": 64, "IS_VARLEN": True})
    assert twin == dense
    # a kernel whose key holds fla's IS_VARLEN heuristic finds the dense launch's key too
    with_flag = ["H", "BT", "IS_VARLEN"]
    assert fla_kernels.dense_twin_key(fla_key_build, names, with_flag, varlen_args,
                                      {"BT": 64, "IS_VARLEN": True}) == fla_key_build(
        names, with_flag, tuple(dense_args.values()), {"BT": 64, "IS_VARLEN": False})
    # a cu_seqlens given as a keyword argument counts too
    kw_twin = fla_kernels.dense_twin_key(fla_key_build, names, ["H", "K", "BT"],
                                         dict(zip(names[:3], (q, k, h), strict=True)),
                                         {"cu_seqlens": cu, "H": 9, "K": 64, "BT": 64})
    assert kw_twin == fla_key_build(names, ["H", "K", "BT"], (q, k, h), {"H": 9, "K": 64,
                                                                         "BT": 64})
