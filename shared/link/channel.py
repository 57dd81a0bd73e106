"""Bounded waiting on posted operations: NCCL transfers and control-channel receives.

Anything with a non-blocking ``done()`` (raising PeerLost when its peer is gone) is waited on
by polling, and between polls the caller checks that the peer is still alive, so a dead peer
becomes a clear error within the configured timeout, never a hang.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from shared.link.protocol import LinkError

EXPLAIN_SECONDS = 2.0  # after a failed transfer, how long the peer's files may take to explain it


class PeerLost(LinkError):
    """The peer of a posted operation died, left, or stopped answering."""


class Completion:
    """Completion of one posted NCCL send or recv (a CUDA event underneath: cheap to poll)."""

    def __init__(self, work) -> None:  # noqa: ANN001 - a torch.distributed Work
        self.work = work

    def done(self) -> bool:
        try:
            return self.work.is_completed()
        except Exception as err:  # noqa: BLE001 - an aborted communicator
            raise PeerLost(f"transfer failed: {err}") from err


def wait_all(completions: Iterable, timeout: float | None,
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

