"""The control channel: one TCP connection per trainer, carrying framed tensors, no pickles.

    frame = header (tag uint32, 0 uint32, length uint64, little-endian) + the tensor's raw bytes

Each end runs a reader thread that files arriving frames by tag. ``send`` writes a frame at
once (control messages are small; the socket has a timeout, so a stopped peer cannot block
us for longer than ``link.timeout_seconds``). ``recv(tensor, tag)`` posts a receive that is
filled by the next frame of that tag, in posting order; its ``done()`` raises PeerLost once
the connection is gone. The teacher listens on one port for its whole life and publishes it
in the manifest; a trainer connects and says hello (generation, index), so a connection meant
for another generation is refused.

Why not a Gloo group, as protocol 3 first had: rebuilding Gloo groups inside a process that
had lost its peer failed in about one rejoin in five on CPU (the new group never accepted
its peer: "Connect timeout"); plain sockets have no such state.
"""
from __future__ import annotations

import socket
import struct
import threading
from collections import defaultdict, deque

import torch

from shared.link.channel import PeerLost
from shared.link.protocol import LinkError

_FRAME = struct.Struct("<IIQ")
HELLO_TAG = 0xFFFF
_HELLO_MAGIC = 0x4C32524B48454C4F  # "L2RKHELO"


class ConnectionLost(PeerLost):
    """The other end closed the connection (it died, or left)."""


class Receive:
    """A posted receive; ``done()`` never blocks."""

    def __init__(self, connection: Connection, tensor: torch.Tensor) -> None:
        self.connection = connection
        self.tensor = tensor
        self.filled = False

    def fill(self, data: bytes) -> None:
        target = self.tensor.view(-1).view(torch.uint8)
        if len(data) != target.numel():
            raise LinkError(f"frame of {len(data)} bytes for a tensor of {target.numel()} "
                            "bytes: the two ends disagree on the protocol")
        target.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.filled = True

    def done(self) -> bool:
        if self.filled:
            return True
        if self.connection.error is not None:
            raise ConnectionLost(self.connection.error)
        return False


class Connection:
    """One end of a control connection."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.error: str | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        self._cond = threading.Lock()
        self._send_lock = threading.Lock()
        self._frames: dict[int, deque[bytes]] = defaultdict(deque)
        self._posted: dict[int, deque[Receive]] = defaultdict(deque)
        threading.Thread(target=self._read, daemon=True, name=f"control:{peer}").start()

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except TimeoutError:
                continue  # a quiet peer is not a dead one: liveness is the heartbeat's job
            if not chunk:
                raise ConnectionLost(f"{self.peer} closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read(self) -> None:
        try:
            while True:
                tag, _, length = _FRAME.unpack(self._read_exact(_FRAME.size))
                data = self._read_exact(length)
                with self._cond:
                    self._frames[tag].append(data)
                    self._match(tag)
        except (OSError, LinkError) as err:
            self.error = f"control connection to {self.peer}: {err}"

    def _match(self, tag: int) -> None:
        frames, posted = self._frames[tag], self._posted[tag]
        while frames and posted:
            posted.popleft().fill(frames.popleft())

    def recv(self, tensor: torch.Tensor, tag: int) -> Receive:
        receive = Receive(self, tensor)
        with self._cond:
            self._posted[tag].append(receive)
            self._match(tag)
        return receive

    def send(self, tensor: torch.Tensor, tag: int) -> None:
        if self.error is not None:
            raise ConnectionLost(self.error)
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        try:
            with self._send_lock:
                self.sock.sendall(_FRAME.pack(tag, 0, len(data)) + data)
        except OSError as err:
            self.error = f"control connection to {self.peer}: {err}"
            raise ConnectionLost(self.error) from err

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _hello(generation: int, index: int) -> torch.Tensor:
    return torch.tensor([_HELLO_MAGIC, generation, index], dtype=torch.int64)


def connect(address: tuple[str, int], generation: int, index: int,
            timeout: float) -> Connection:
    """Trainer ``index``'s connection to the teacher of ``generation``."""
    sock = socket.create_connection(address, timeout=timeout)
    connection = Connection(sock, f"teacher at {address[0]}:{address[1]}", timeout)
    connection.send(_hello(generation, index), HELLO_TAG)
    return connection


class Listener:
    """The teacher's listening socket; trainers connect and say hello."""

    def __init__(self, host: str, timeout: float) -> None:
        self.sock = socket.create_server((host, 0))
        self.address = (host, self.sock.getsockname()[1])
        self.timeout = timeout

    def accept(self, generation: int, trainers: int, until: float,
               check_trainers) -> dict[int, Connection]:  # noqa: ANN001 - a callable
        """A connection from each of ``trainers`` trainers of ``generation`` (others are closed),
        by the monotonic time ``until``; ``check_trainers()`` raises when one is lost."""
        import time

        joined: dict[int, Connection] = {}
        self.sock.settimeout(0.2)
        while len(joined) < trainers:
            if time.monotonic() > until:
                missing = sorted(set(range(trainers)) - set(joined))
                for c in joined.values():
                    c.close()
                raise ConnectionLost(f"trainers {missing} did not connect to the control port")
            try:
                sock, peer = self.sock.accept()
            except TimeoutError:
                check_trainers()
                continue
            connection = Connection(sock, f"trainer at {peer[0]}:{peer[1]}", self.timeout)
            hello = torch.zeros(3, dtype=torch.int64)
            receive = connection.recv(hello, HELLO_TAG)
            deadline = time.monotonic() + self.timeout
            while not receive.filled and connection.error is None and time.monotonic() < deadline:
                time.sleep(0.001)
            magic, gen, index = hello.tolist()
            if not receive.filled or magic != _HELLO_MAGIC or gen != generation \
                    or not 0 <= index < trainers or index in joined:
                connection.close()  # another generation's, or not ours at all
                continue
            joined[index] = connection
        return joined

    def close(self) -> None:
        self.sock.close()
