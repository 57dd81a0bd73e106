"""Bounded waiting on posted point-to-point operations, for NCCL and Gloo alike.

NCCL work objects report completion through CUDA events (``is_completed`` is cheap to poll);
Gloo's report it only from ``wait()``, so a daemon thread waits for each and records the
outcome. Either way the caller polls, and between polls it checks that the peer is still
alive, so a dead peer becomes a clear error within the configured timeout, never a hang.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from shared.link.protocol import LinkError

# Gloo's own timeout must not fire during legitimate long waits (a paused trainer): our
# polling loop bounds every wait instead.
_GLOO_WAIT = timedelta(days=7)
EXPLAIN_SECONDS = 2.0  # after a failed transfer, how long the peer's files may take to explain it


class PeerLost(LinkError):
    """The peer of a posted operation died, left, or stopped answering."""


class Completion:
    """Completion state of one posted send or recv."""

    def __init__(self, work, backend: str) -> None:
        self.work = work
        self.error: BaseException | None = None
        if backend == "gloo":
            self._event: threading.Event | None = threading.Event()
            threading.Thread(target=self._wait, daemon=True, name="link-wait").start()
        else:
            self._event = None

    def _wait(self) -> None:
        try:
            self.work.wait(_GLOO_WAIT)
        except BaseException as err:  # noqa: BLE001 - re-raised by done() in the caller
            self.error = err
        assert self._event is not None
        self._event.set()

    def done(self) -> bool:
        if self._event is not None:
            finished = self._event.is_set()
        else:
            try:
                finished = self.work.is_completed()
            except BaseException as err:  # noqa: BLE001
                self.error, finished = err, True
        if finished and self.error is not None:
            raise PeerLost(f"transfer failed: {self.error}")
        return finished


def wait_all(completions: Iterable[Completion], timeout: float | None,
             check_peer: Callable[[], None], what: str) -> None:
    """Wait until every completion is done; ``check_peer`` raises when the peer is gone."""
    pending = list(completions)
    start = time.monotonic()
    last_check = start
    delay = 0.00005
    while True:
        try:
            pending = [c for c in pending if not c.done()]
        except PeerLost as err:
            # Name the cause (process gone, new generation) when we can. A teacher that lost
            # another trainer aborts the transfers a moment before it publishes the new
            # generation, so give the peer EXPLAIN_SECONDS to say so.
            explain_until = time.monotonic() + EXPLAIN_SECONDS
            while True:
                check_peer()
                if time.monotonic() > explain_until:
                    break
                time.sleep(0.05)
            raise PeerLost(f"{what}: {err}") from err
        if not pending:
            return
        now = time.monotonic()
        if now - last_check > 0.5:
            check_peer()
            last_check = now
        if timeout is not None and now - start > timeout:
            raise PeerLost(f"{what}: no answer within {timeout:.0f} s (link.timeout_seconds); "
                           "the peer is alive but stuck — see its log")
        time.sleep(delay)
        delay = min(delay * 2, 0.0005)  # a 1.6 GB NVLink transfer takes ~4 ms: poll finely
