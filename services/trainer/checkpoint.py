"""Atomic checkpoints: a checkpoint is used only once it is complete on every rank.

    <output_dir>/checkpoints/
        .partial-step-40/      being written (DeepSpeed shards, trainer state, RNG states)
        step-40/               complete: renamed from .partial-* after every rank finished
        latest                 "step-40", replaced atomically after the rename

A crash mid-write leaves a ``.partial-*`` directory that resume ignores (the next save
removes it); ``latest`` only ever names a complete directory. Besides DeepSpeed's
model/optimizer state a checkpoint holds the step, the data sampler's position (the next batch
to train) and every rank's RNG states, so a resumed run continues with exactly the next sample.
``trainer_state.json`` is written last and lists every file with its size: a file cut short
afterwards (a full disk, a damaged copy) is an error that names it, never a silent half-load.

Frozen parameters (align trains only the RWKV mixers: most of the model) are not written:
they never change, and a resumed run rebuilds them from the teacher or ``student.init_from``
as the first start did. The checkpoint records their names and an exact checksum of their
bits instead, and a resume whose rebuilt frozen weights differ (another teacher, another
``train.trainable``) is refused. For an 8B align stage this leaves ~16 GB of bf16 weights
out of every checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG = "state"
STATE = "trainer_state.json"
log = logging.getLogger("trainer")


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


CHECKSUM_CHUNK = 1 << 24  # elements per step of the checksum: bounded temporary memory


def frozen_parameters(engine) -> dict[str, Any]:
    """Names of the frozen parameters and an exact checksum of their bits (collective under
    ZeRO-3, which gathers each one in turn). Frozen weights never change: call it once."""
    import deepspeed

    names, total = [], 0
    weights = None
    zero3 = engine.zero_optimization_stage() == 3
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            continue
        names.append(name)
        gathered = (deepspeed.zero.GatheredParameters([p], modifier_rank=None) if zero3
                    else contextlib.nullcontext())
        with gathered:
            flat = p.detach().contiguous().view(-1).view(torch.uint8)
            for i, start in enumerate(range(0, flat.numel(), CHECKSUM_CHUNK)):
                # bytes weighted by their position: integer arithmetic, so the same bits give
                # the same number whatever the threads or the device
                chunk = flat[start:start + CHECKSUM_CHUNK].to(torch.int64)
                if weights is None or weights.device != chunk.device:
                    weights = torch.arange(CHECKSUM_CHUNK, device=chunk.device) % 65521 + 1
                total += (i + 1) * int((chunk * weights[:chunk.numel()]).sum())
    return {"names": names, "checksum": total}


def save(engine, output_dir: str | Path, step: int, trainer_state: dict[str, Any],
         keep: int, frozen: dict[str, Any]) -> Path:
    """Write a checkpoint collectively (every rank calls this); returns the final path.

    ``frozen`` is :func:`frozen_parameters` of the engine: recorded, not written."""
    started = time.perf_counter()
    root = _root(output_dir)
    rank = dist.get_rank()
    name = f"step-{step}"
    partial = root / f".partial-{name}"
    if rank == 0:
        for stale in root.glob(".partial-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(partial), tag=TAG, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), partial / f"rng-{rank}.pt")
    dist.barrier()
    written = time.perf_counter()
    final = root / name
    if rank == 0:
        files = {str(p.relative_to(partial)): p.stat().st_size
                 for p in sorted(partial.rglob("*")) if p.is_file()}
        (partial / STATE).write_text(json.dumps({**trainer_state, "step": step,
                                                 "frozen": frozen, "files": files}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = root / ".latest.tmp"
        tmp.write_text(name)
        os.replace(tmp, root / "latest")
        _prune(root, keep)
    dist.barrier()
    if rank == 0:
        log.info("checkpoint %s in %.2f s (writing %.2f s, %.1f MB)", final,
                 time.perf_counter() - started, written - started,
                 sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) / 1e6)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*"))
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Partial directories are never returned.

    A checkpoint that ``latest`` names but that is incomplete or has a file of another size
    than the one recorded is an error naming the file and the fix.
    """
    root = _root(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    earlier = sorted((p for p in root.glob("step-*") if p != path and (p / STATE).is_file()),
                     key=lambda p: int(p.name.split("-")[1]))
    fix = (f"delete {path} and write {earlier[-1].name!r} into {pointer} to resume from the "
           f"previous complete checkpoint" if earlier else
           f"delete {root} to start the run from scratch")
    if not (path / STATE).is_file():
        raise RuntimeError(f"{pointer} names {path}, which is incomplete (no {STATE}): {fix}")
    try:
        recorded = json.loads((path / STATE).read_text()).get("files", {})
    except ValueError as err:
        raise RuntimeError(f"{path / STATE} is damaged ({err}): {fix}") from None
    for rel, size in recorded.items():
        f = path / rel
        have = f.stat().st_size if f.is_file() else None
        if have != size:
            found = "missing" if have is None else f"{have} bytes"
            raise RuntimeError(f"checkpoint {path} is damaged: {rel} is {found}, the checkpoint "
                               f"recorded {size} bytes (truncated copy or full disk?): {fix}")
    return path


def load(engine, path: Path, frozen: dict[str, Any]) -> dict[str, Any]:
    """Restore DeepSpeed state and this rank's RNG; return the trainer state.

    ``frozen`` (:func:`frozen_parameters` of this start) must match what the checkpoint
    recorded: the frozen weights are not in it."""
    state = json.loads((path / STATE).read_text())
    recorded = state.get("frozen")  # absent in checkpoints that hold every parameter
    if recorded is not None and frozen != recorded:
        changed = sorted(set(recorded["names"]) ^ set(frozen["names"]))
        what = (f"the frozen parameters differ ({', '.join(changed[:4])}"
                f"{' ...' if len(changed) > 4 else ''}: train.stage or train.trainable "
                "changed)" if changed else
                "the frozen weights rebuilt at this start differ from those of the run "
                "that wrote it (teacher.model_path or student.init_from changed)")
        raise RuntimeError(f"cannot resume from {path}: {what}. Checkpoints leave frozen "
                           "weights out, so resume with the settings of the run that wrote "
                           "them, or use a new train.output_dir")
    left_out = set(recorded["names"]) if recorded is not None else set()

    def load_module(src: dict, dst: torch.nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = set(result.missing_keys) - left_out
        if missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint {path} does not fit the student: missing "
                               f"{sorted(missing)[:4]}, unexpected "
                               f"{sorted(result.unexpected_keys)[:4]}")

    load_path, _ = engine.load_checkpoint(str(path), tag=TAG, custom_load_fn=load_module)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rank = dist.get_rank()
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise RuntimeError(f"{rng_file} missing: the checkpoint was written by a job with "
                           "another number of ranks; resume with the same world size")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state
