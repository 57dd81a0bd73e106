"""Atomic checkpoints: a checkpoint is used only once it is complete on every rank.

    <output_dir>/checkpoints/
        .partial-step-40/      being written (DeepSpeed shards, trainer state, RNG states)
        step-40/               complete: renamed from .partial-* after every rank finished
        latest                 "step-40", replaced atomically after the rename

A crash mid-write leaves a ``.partial-*`` directory that resume ignores (and cleans up);
``latest`` only ever names a complete directory. Besides DeepSpeed's model/optimizer state a
checkpoint holds the step, the data sampler's position (the next batch to train) and every
rank's RNG states, so a resumed run continues with exactly the next sample.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG = "state"


def _root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, output_dir: str | Path, step: int, trainer_state: dict[str, Any],
         keep: int) -> Path:
    """Write a checkpoint collectively (every rank calls this); returns the final path."""
    root = _root(output_dir)
    rank = dist.get_rank()
    name = f"step-{step}"
    partial = root / f".partial-{name}"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(partial), tag=TAG, save_latest=False)
    torch.save(rng_state(), partial / f"rng-{rank}.pt")
    if rank == 0:
        (partial / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}))
    dist.barrier()
    final = root / name
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = root / ".latest.tmp"
        tmp.write_text(name)
        os.replace(tmp, root / "latest")
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*"))
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Partial directories are never returned."""
    root = _root(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise RuntimeError(f"{pointer} names {path}, which is incomplete: remove {pointer} to "
                           "restart from an earlier step-* directory or from scratch")
    return path


def load(engine, path: Path) -> dict[str, Any]:
    """Restore DeepSpeed state and this rank's RNG; return the trainer state."""
    load_path, _ = engine.load_checkpoint(str(path), tag=TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rank = dist.get_rank()
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise RuntimeError(f"{rng_file} missing: the checkpoint was written by a job with "
                           "another number of ranks; resume with the same world size")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
