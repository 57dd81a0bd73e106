"""Trainer ranks watch each other, so that one lost rank ends its peers' wait within
``train.peer_timeout_seconds`` instead of the process group's timeout (30 minutes and more).

Why: torchrun's agent ends or restarts the ranks of its own node when one of them dies, but
the ranks on the other nodes keep waiting in the step's all-reduce for a peer that will never
come; a stopped rank (SIGSTOP, a hung driver) is not even noticed by its own agent.

How: every rank adds 1 to its own counter in the job's store (the TCP store at
MASTER_ADDR:MASTER_PORT: torchrun's agent store, or rank 0's) every
``min(2 s, peer_timeout_seconds / 10)`` from a daemon thread, and, once every rank has joined
the process group (:meth:`PeerWatch.arm`), watches the counter of the next rank on a ring
(r watches r + 1 mod world). Counters, not timestamps: the nodes' clocks need not agree. A
ring finds any lost set of ranks short of all of them: some live rank's successor is lost.
The rank that sees a stale counter posts the finding under one key that every rank checks
each beat, logs it, and exits with :data:`PEER_LOST_EXIT`; torchrun then ends the job or
restarts it (``--max-restarts``) from the latest complete checkpoint. A rank that fails with
an error posts it the same way (:func:`announce_failure`), so the others leave within a beat;
under torchrun the watch starts before ``init_process_group``, so that also holds for a rank
that fails on its way in (a taken port, a bad flag) while the others wait there. A rank that
finishes says so first, so a peer still exporting the student is never taken for lost. A
store that stops answering (node 0's agent gone) is a loss too.

Store traffic is four small requests per rank and beat, on a connection of our own with a
short timeout (a watchdog must not block on a dead store for the store's 30 minutes).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from services.trainer.errors import write_error_file

log = logging.getLogger("trainer")

PEER_LOST_EXIT = 75
"""Exit status of a rank that left because a peer rank was lost (EX_TEMPFAIL: a restart
may succeed)."""

LOST_KEY = "lost"


class PeerWatch:
    """The heartbeat and ring watch of one rank: :meth:`start` once the job's store exists,
    :meth:`arm` once the process group does, :meth:`finish` after the rank's last collective."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float,
                 exit_process: bool = True) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout = timeout
        self.interval = max(0.05, min(2.0, timeout / 10))
        self.watched = (rank + 1) % world_size
        self.exit_process = exit_process  # tests of the watch itself keep their process
        self.where = f"{socket.gethostname()} pid {os.getpid()}"
        self.lost: str | None = None
        self.armed = False  # until every rank has joined, only failures posted count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self.store.set(f"host/{self.rank}", self.where)
        self._thread.start()
        return self

    def arm(self) -> None:
        """Every rank has joined the process group: from now on silence is a loss."""
        self.armed = True

    def finish(self) -> None:
        """This rank is done (or stopping cleanly): peers must not take its silence for a
        loss. Called after its last collective."""
        self._halt()
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception as err:  # noqa: BLE001 - the store may be gone at the very end
            log.debug("peer watch: could not mark rank %d done: %s", self.rank, err)

    def fail(self, error: BaseException) -> None:
        """This rank is failing: tell the peers now rather than after the timeout."""
        self._halt()  # first: its own thread must not read the finding back and exit 75
        finding = f"trainer rank {self.rank} ({self.where}) failed: {type(error).__name__}: {error}"
        try:
            self.store.compare_set(LOST_KEY, "", finding)
        except Exception as err:  # noqa: BLE001 - the peers find out after the timeout
            log.debug("peer watch: could not post the failure: %s", err)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval * 2 + 5)

    def _run(self) -> None:
        last_count, last_change = -1, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.check([LOST_KEY]):
                    return self._leave(self.store.get(LOST_KEY).decode())
                if not self.armed or self.store.check([f"done/{self.watched}"]):
                    last_change = time.monotonic()
                    continue
                count = self.store.add(f"beat/{self.watched}", 0)  # a read that never blocks
            except Exception as err:  # noqa: BLE001 - any store failure is the finding
                return self._leave(f"the job's store stopped answering ({type(err).__name__}: "
                                   f"{err}); the node that hosts it (torchrun's node rank 0, "
                                   "MASTER_ADDR) is likely gone")
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > self.timeout:
                return self._report(now - last_change)

    def _report(self, silent: float) -> None:
        host = self._host(self.watched)
        finding = (f"trainer rank {self.watched} of {self.world_size} ({host}) sent no heartbeat "
                   f"for {silent:.0f} s (train.peer_timeout_seconds={self.timeout:g}): it died "
                   "or is stopped; see its log")
        try:
            self.store.compare_set(LOST_KEY, "", finding)  # the first finding wins
            finding = self.store.get(LOST_KEY).decode()
        except Exception as err:  # noqa: BLE001 - the others find out on their own
            log.debug("peer watch: could not post the finding: %s", err)
        self._leave(finding)

    def _host(self, rank: int) -> str:
        try:
            if self.store.check([f"host/{rank}"]):
                return self.store.get(f"host/{rank}").decode()
        except Exception:  # noqa: BLE001 - only for the message
            pass
        return "host unknown"

    def _leave(self, finding: str) -> None:
        self.lost = finding
        log.error("%s. Rank %d leaves too (exit %d) rather than wait in a collective until "
                  "the process group's timeout; torchrun ends the job or restarts it from "
                  "the latest complete checkpoint (--max-restarts).", finding, self.rank,
                  PEER_LOST_EXIT)
        if self.exit_process:
            write_error_file(f"{finding}: rank {self.rank} left (exit {PEER_LOST_EXIT})")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(PEER_LOST_EXIT)


def job_store(timeout: float) -> dist.Store | None:
    """A connection of our own to the job's TCP store (MASTER_ADDR:MASTER_PORT), with a
    short timeout, keyed by torchrun's restart attempt so each restart starts clean; None
    while no store can exist yet (no torchrun agent, no process group)."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not (agent_store or dist.is_initialized()) or "MASTER_PORT" not in os.environ:
        return None
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=max(5.0, timeout / 2)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"llama2rwkv/peers/attempt-{attempt}", store)


_active: PeerWatch | None = None


def start_peer_watch(timeout: float) -> PeerWatch | None:
    """This process's watch (RANK, WORLD_SIZE of the environment), started as soon as the
    job's store exists: under torchrun before the process group (its agent hosts the store),
    so that a rank failing on its way in (a taken port, bad input) frees the others from
    ``init_process_group`` at once; otherwise after it. None for one rank or ``timeout`` 0."""
    global _active
    world = int(os.environ.get("WORLD_SIZE", 1))
    if _active is not None or world < 2 or timeout <= 0:
        return _active
    store = job_store(timeout)
    if store is None:
        return None
    _active = PeerWatch(store, int(os.environ.get("RANK", 0)), world, timeout).start()
    return _active


def announce_failure(error: BaseException) -> None:
    """Called by the service on the error that ends this rank, even one before the watch
    started (a config error): the peers leave now instead of after a timeout."""
    watch, world = _active, int(os.environ.get("WORLD_SIZE", 1))
    if watch is None and world > 1:
        try:
            store = job_store(10.0)
        except Exception as err:  # noqa: BLE001 - no store: the peers find out by themselves
            log.debug("peer watch: cannot announce the failure: %s", err)
            return
        if store is not None:
            watch = PeerWatch(store, int(os.environ.get("RANK", 0)), world, 10.0)
    if watch is not None:
        watch.fail(error)
