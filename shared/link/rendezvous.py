"""Rendezvous of one teacher group on a shared volume: manifest, generations, heartbeats.

    <rendezvous_dir>/group-<G>/
        manifest.json        written atomically by the teacher (tmp file + rename)
        gen-<N>/store        torch FileStore of generation N (Gloo addresses, NCCL unique ids)
        gen-<N>/teacher.alive, gen-<N>/trainer-<r>.alive   heartbeat files (JSON, rewritten
                             every heartbeat_seconds; a trainer's file is also its join)
        gen-<N>/complete     the teacher saw every trainer's heartbeat: build the groups now

Every teacher start, and every recovery after a lost peer, opens a new generation with a new
store file, so nothing from an earlier run is ever joined: a trainer joins only the generation
the manifest names, and only while that teacher's heartbeat is fresh. Nobody builds a process
group before ``complete`` exists, so a trainer that dies while joining costs one generation
(everyone times out on it and moves to the next), never a store left half-used.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from shared.link.protocol import LinkError

MANIFEST = "manifest.json"
COMPLETE = "complete"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Heartbeat:
    """A daemon thread that rewrites ``path`` with (host, pid, time) every ``interval`` s."""

    def __init__(self, path: Path, interval: float, extra: dict[str, Any] | None = None) -> None:
        self.path = path
        self.interval = interval
        self.extra = extra or {}
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"hb:{path.name}")
        self._thread.start()

    def beat(self) -> None:
        try:
            write_json_atomic(self.path, {"host": socket.gethostname(), "pid": os.getpid(),
                                          "time": time.time(), **self.extra})
        except FileNotFoundError:  # the generation directory was removed: we are stale
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self, remove: bool = True) -> None:
        self._stop.set()
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def peer_state(path: Path, stale_after: float) -> tuple[bool, str]:
    """(alive, why) of the peer whose heartbeat file is ``path``.

    A peer on this host is dead as soon as its pid is gone; elsewhere we rely on the age of
    its heartbeat, which must stay under ``stale_after`` seconds.
    """
    beat = read_json(path)
    if beat is None:
        return False, f"no heartbeat file {path}"
    age = time.time() - float(beat.get("time", 0))
    if beat.get("host") == socket.gethostname():
        try:
            os.kill(int(beat["pid"]), 0)
        except ProcessLookupError:
            return False, f"process {beat['pid']} on {beat['host']} has exited"
        except PermissionError:
            pass
    if age > stale_after:
        return False, (f"heartbeat of pid {beat.get('pid')} on {beat.get('host')} is "
                       f"{age:.0f} s old (limit {stale_after:.0f} s)")
    return True, "alive"


class GroupRendezvous:
    """The rendezvous directory of one group (both ends use it)."""

    def __init__(self, root: str | Path, group: int) -> None:
        self.group = group
        self.dir = Path(root) / f"group-{group}"

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def gen_dir(self, generation: int) -> Path:
        return self.dir / f"gen-{generation}"

    def read_manifest(self) -> dict[str, Any] | None:
        return read_json(self.manifest_path)

    # -- teacher side ---------------------------------------------------------------------
    def claim(self) -> None:
        """Refuse to serve a group another live teacher serves (teacher start)."""
        manifest = self.read_manifest()
        if manifest is None:
            return
        beat_path = self.gen_dir(int(manifest.get("generation", 0))) / "teacher.alive"
        beat = read_json(beat_path) or {}
        alive, _ = peer_state(beat_path, float(manifest.get("heartbeat_stale_seconds", 60)))
        if alive and (beat.get("host"), beat.get("pid")) != (socket.gethostname(), os.getpid()):
            raise LinkError(
                f"group {self.group} in {self.dir} is already served by a live teacher (pid "
                f"{beat.get('pid')} on {beat.get('host')}): stop it first, or give this teacher "
                "another --group or link.rendezvous_dir")

    def open_generation(self, manifest: dict[str, Any]) -> int:
        """Create a new generation (store dir) and publish its manifest; return its number."""
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = self.read_manifest() or {}
        existing = [int(p.name.split("-", 1)[1]) for p in self.dir.glob("gen-*")
                    if p.name.split("-", 1)[1].isdigit()]
        generation = max([int(previous.get("generation", 0)), *existing]) + 1
        self.gen_dir(generation).mkdir()
        write_json_atomic(self.manifest_path, {**manifest, "generation": generation,
                                               "group": self.group, "created": time.time()})
        # Old generations go only after the new manifest is out: a trainer that finds its
        # generation's files gone then reads the new generation in the manifest.
        for old in self.dir.glob("gen-*"):
            if old != self.gen_dir(generation):
                shutil.rmtree(old, ignore_errors=True)
        return generation

    def mark_complete(self, generation: int) -> None:
        write_json_atomic(self.gen_dir(generation) / COMPLETE, {"time": time.time()})

    def is_complete(self, generation: int) -> bool:
        return (self.gen_dir(generation) / COMPLETE).is_file()

    def joined_trainers(self, generation: int, trainers: int, stale_after: float) -> list[int]:
        gen = self.gen_dir(generation)
        return [r for r in range(trainers)
                if peer_state(gen / f"trainer-{r}.alive", stale_after)[0]]

    def remove_manifest(self) -> None:
        try:
            self.manifest_path.unlink()
        except FileNotFoundError:
            pass


class LinkGroups(NamedTuple):
    """The two process groups of one generation (protocol.py says what travels on each)."""

    control: dist.ProcessGroup  # Gloo: headers, request bodies, statuses (CPU tensors)
    data: dist.ProcessGroup     # NCCL for GPU payloads; on CPU, the control group itself


def make_link_groups(store_path: Path, rank: int, world_size: int, backend: str,
                     timeout_seconds: float) -> LinkGroups:
    """The link's own groups on a FileStore, outside any default group. Building the control
    group waits (at most ``timeout_seconds``) for every rank; NCCL connects lazily, per pair."""
    store = dist.FileStore(str(store_path), world_size)
    store.set_timeout(timedelta(seconds=timeout_seconds))
    # The timeout bounds the connection set-up; each receive is waited on with its own (long)
    # timeout by channel.Completion, and our polling bounds it with the peer's liveness.
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, world_size,
                                    timedelta(seconds=timeout_seconds))
    if backend == "gloo":
        return LinkGroups(control, control)
    if backend != "nccl":
        raise LinkError(f"unknown link backend {backend!r}")
    options = dist.ProcessGroupNCCL.Options()
    # Our own bounded waits watch the peers; NCCL's watchdog must not kill the process
    # while a teacher legitimately waits hours for a paused trainer.
    options._timeout = timedelta(days=7)
    return LinkGroups(control, dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank,
                                                     world_size, options))


def abort_link_groups(groups: LinkGroups | None) -> None:
    """Best effort: free a generation's connections and communicators after a peer was lost
    (an NCCL abort also ends any kernel still waiting for the lost peer)."""
    if groups is None:
        return
    for pg in dict.fromkeys((groups.data, groups.control)):  # data first; once if the same
        for name in ("abort", "_abort", "shutdown"):
            fn = getattr(pg, name, None)
            if fn is not None:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - aborting a broken group may itself fail
                    pass
                break


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LinkError("link.backend=nccl needs CUDA devices on both ends; use gloo on CPU")
    return backend
