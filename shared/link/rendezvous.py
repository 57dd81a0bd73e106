"""Rendezvous of one teacher group on a shared volume: manifest, generations, heartbeats.

    <rendezvous_dir>/group-<G>/
        manifest.json        written atomically by the teacher (tmp file + rename)
        gen-<N>/store        torch FileStore of generation N (the NCCL group's unique ids)
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

import fcntl
import json
import os
import shutil
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
import torch.distributed as dist

from shared.link.control import Connection
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


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


# Containers with ``network_mode: host`` share the hostname but not the pid namespace: a pid is
# only checked where both processes see the same pids.
PID_NAMESPACE = _pid_namespace()


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
                                          "pidns": PID_NAMESPACE, "time": time.time(),
                                          **self.extra})
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

    A peer on this host (and in this pid namespace) is dead as soon as its pid is gone;
    elsewhere we rely on the age of its heartbeat, which must stay under ``stale_after`` s.
    """
    beat = read_json(path)
    if beat is None:
        return False, f"no heartbeat file {path}"
    age = time.time() - float(beat.get("time", 0))
    same_pids = beat.get("pidns", PID_NAMESPACE) == PID_NAMESPACE  # absent: an older writer
    if beat.get("host") == socket.gethostname() and same_pids:
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
    def claim(self) -> IO[str]:
        """Hold the group's teacher lock for this process's life (keep the returned file open;
        the kernel drops the lock when the process dies, even by kill -9, so a restarted teacher
        takes it at once). Without it a second teacher of the group would open a new generation
        and delete the running one's, cutting its trainers off."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "teacher.lock"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                owner = json.loads(handle.read())
                holder = f"pid {owner['pid']} on {owner['host']}"
            except (ValueError, KeyError, TypeError):
                holder = "another process"
            handle.close()
            raise LinkError(f"group {self.group} already has a teacher ({holder} holds {path}): "
                            "stop that one, or give this one another --group or "
                            "link.rendezvous_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        return handle

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

    def no_teacher_message(self, bound: float, why: str, rejoining: bool) -> str:
        """A trainer's error when no teacher served this group within ``bound`` seconds."""
        manifest = self.read_manifest() or {}
        beat = read_json(self.gen_dir(manifest.get("generation", 0)) / "teacher.alive")
        age = (f"its last heartbeat is {time.time() - float(beat['time']):.0f} s old (pid "
               f"{beat.get('pid')} on {beat.get('host')})" if beat else "no teacher heartbeat")
        same_dir = "that link.rendezvous_dir is the same shared directory on both sides"
        if rejoining:
            return (f"teacher of group {self.group} did not come back within {bound:.0f} s "
                    f"(link.reconnect_seconds): rendezvous {self.dir}, {age}; last problem: "
                    f"{why}. Check that the teacher service of group {self.group} is running "
                    "(its log; supervisorctl status or docker compose ps), that every trainer "
                    f"of the group is running, and {same_dir}")
        return (f"no live teacher for group {self.group} in {self.dir} within {bound:.0f} s "
                f"({why}; {age}): start it with `python -m services.teacher --config CFG "
                f"--group {self.group}` and check {same_dir}")

    def remove_manifest(self) -> None:
        try:
            self.manifest_path.unlink()
        except FileNotFoundError:
            pass


class Link(NamedTuple):
    """One trainer's link to its teacher in a generation (protocol.py: what travels on each)."""

    control: Connection               # headers, request bodies, statuses (control.py)
    data: dist.ProcessGroup | None    # NCCL over the group; None: answers travel on control
    data_peer: int                    # the other end's rank in ``data``


def nccl_data_group(store_path: Path, rank: int, world_size: int,
                    timeout_seconds: float) -> dist.ProcessGroup:
    """The generation's NCCL group on its FileStore (connects lazily, pair by pair)."""
    store = dist.FileStore(str(store_path), world_size)
    store.set_timeout(timedelta(seconds=timeout_seconds))
    options = dist.ProcessGroupNCCL.Options()
    # Our own bounded waits watch the peers; NCCL's watchdog must not kill the process
    # while a teacher legitimately waits hours for a paused trainer.
    options._timeout = timedelta(days=7)
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def close_links(links: Link | list[Link] | None) -> None:
    """Close a generation's connections and abort its NCCL communicator (which also ends any
    kernel still waiting for a lost peer); best effort, as the peer may be gone."""
    if links is None:
        return
    links = [links] if isinstance(links, Link) else links
    for link in links:
        link.control.close()
    for pg in dict.fromkeys(link.data for link in links if link.data is not None):
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
