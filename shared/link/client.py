"""The trainer's end of the teacher link: join a group, send requests, collect answers.

    client = TeacherClient(link_cfg, group=rank // n, index=rank % n, device=dev,
                           tokenizer_fingerprint=fp, vocab_size=V, on_reconnect=metrics_cb)
    client.connect()                                  # handshake + join, bounded
    handle = client.request(ids, lengths, spec)       # returns at once (control channel only)
    ...train on the previous step...
    out = handle.result()                             # {"logits"|"topk_*"|"hidden_states"}

The trainer outlives its teacher: when a transfer fails, the teacher's heartbeat goes stale or
the teacher opens a new generation, ``result()`` closes the link, waits
(at most ``link.reconnect_seconds``) for a live teacher's new generation, rejoins it with the
other trainers of the group, sends the requests still in flight again (the same ids give the
same answer) and returns the answer as if nothing happened, apart from a log line and
``on_reconnect(seconds_lost)``.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.config import LinkConfig
from shared.link.channel import Completion, PeerLost, wait_all
from shared.link.control import Receive, connect
from shared.link.protocol import (
    ERROR_CODES,
    KIND_BYE,
    KIND_GO,
    PROTOCOL_VERSION,
    STATUS_LEN,
    TAG_BODY,
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_STATUS,
    LinkError,
    RequestSpec,
    Status,
    check_batch,
    decode_status,
    encode_control,
    encode_request,
    response_layout,
)
from shared.link.rendezvous import (
    GroupRendezvous,
    Heartbeat,
    Link,
    close_links,
    nccl_data_group,
    peer_state,
    resolve_backend,
)

log = logging.getLogger(__name__)


class TeacherHandle:
    """An answer on its way. ``result()`` waits (bounded); ``ready()`` never blocks."""

    def __init__(self, client: TeacherClient | None, seq: int,
                 answer: dict[str, torch.Tensor] | None = None,
                 teacher_forward: tuple[float, float] | None = None) -> None:
        self._client = client
        self.seq = seq
        self._answer = answer
        self.teacher_forward = teacher_forward  # the teacher's forward, wall-clock seconds

    def ready(self) -> bool:
        """True once the teacher has computed the answer (it then travels within result())."""
        return self._client is None or self._client._poll_status(self.seq)

    def result(self) -> dict[str, torch.Tensor]:
        if self._client is not None and self._answer is None:
            self._answer = self._client._result(self.seq)
        return self._answer


@dataclass
class _InFlight:
    """A request whose answer is not collected yet (kept whole for a re-send)."""

    spec: RequestSpec
    input_ids: torch.Tensor
    lengths: torch.Tensor
    position_ids: torch.Tensor | None
    handle: TeacherHandle
    status: Status | None = None


class _Retry(Exception):
    """This generation cannot be joined; look for the next one."""


class TeacherClient:
    """One trainer's connection to its group's teacher service."""

    def __init__(self, cfg: LinkConfig, group: int, index: int, device: torch.device,
                 tokenizer_fingerprint: str, vocab_size: int | None = None,
                 on_reconnect: Callable[[float], None] | None = None) -> None:
        if not 0 <= index < cfg.trainers_per_group:
            raise LinkError(f"trainer index {index} outside 0..{cfg.trainers_per_group - 1}")
        self.cfg = cfg
        self.group = group
        self.index = index
        self.device = device
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.vocab_size = vocab_size
        self.on_reconnect = on_reconnect
        self.backend = resolve_backend(cfg.backend, device)
        self.rendezvous = GroupRendezvous(cfg.rendezvous_dir, group)
        self.manifest: dict = {}
        self.generation = 0
        self.link: Link | None = None
        self._heartbeat: Heartbeat | None = None
        self._seq = 0
        self._in_flight: dict[int, _InFlight] = {}
        # one status receive posted per request in flight (FIFO on the status tag), so a
        # status is taken as soon as the teacher sends it (a socket read by a thread, no GPU)
        self._status_recvs: deque[tuple[torch.Tensor, Receive]] = deque()
        self._recv_stream = torch.cuda.Stream(device) if self.backend == "nccl" else None

    # -- joining ---------------------------------------------------------------------------
    def connect(self) -> dict:
        """Find the live teacher of our group, check it serves our vocabulary, and join."""
        self._join(self.cfg.timeout_seconds, after_generation=0)
        return self.manifest

    def _join(self, bound: float, after_generation: int) -> None:
        cfg, rdv = self.cfg, self.rendezvous
        deadline = time.monotonic() + bound
        why = "no manifest yet"
        while True:
            manifest = rdv.read_manifest()
            if manifest is not None and manifest["generation"] > after_generation:
                alive, why = peer_state(rdv.gen_dir(manifest["generation"]) / "teacher.alive",
                                        cfg.timeout_seconds)
                if alive:
                    self._check_manifest(manifest)  # a refusal is final: no retry
                    try:
                        self._join_generation(manifest, deadline)
                        return
                    except _Retry as err:
                        why = str(err)
                        after_generation = manifest["generation"]
            if time.monotonic() > deadline:
                raise LinkError(rdv.no_teacher_message(bound, why, after_generation > 0))
            time.sleep(0.1)

    def _join_generation(self, manifest: dict, deadline: float) -> None:
        cfg, rdv = self.cfg, self.rendezvous
        generation = manifest["generation"]
        gen_dir = rdv.gen_dir(generation)
        heartbeat = Heartbeat(gen_dir / f"trainer-{self.index}.alive", cfg.heartbeat_seconds,
                              {"generation": generation})
        link = None
        try:
            while not rdv.is_complete(generation):  # the teacher has all N heartbeats
                current = rdv.read_manifest() or {}
                if current.get("generation") != generation:
                    raise _Retry(f"generation {generation} was replaced")
                alive, why = peer_state(gen_dir / "teacher.alive", cfg.timeout_seconds)
                if not alive:
                    raise _Retry(f"teacher of generation {generation} gone: {why}")
                if time.monotonic() > deadline:
                    joined = rdv.joined_trainers(generation, cfg.trainers_per_group,
                                                 cfg.timeout_seconds)
                    raise _Retry(f"only trainers {joined} of 0..{cfg.trainers_per_group - 1} "
                                 f"joined generation {generation}: are all trainers of the "
                                 "group running?")
                time.sleep(0.05)
            n = cfg.trainers_per_group
            link = Link(connect(tuple(manifest["control"]), generation, self.index,
                                cfg.timeout_seconds), None, n)
            if self.backend == "nccl":  # the teacher connects the data channel now
                link = link._replace(data=nccl_data_group(gen_dir / "store", self.index, n + 1,
                                                          cfg.timeout_seconds))
                one = torch.empty(1, device=self.device)
                wait_all([Completion(link.data.recv([one], n, 0))], cfg.timeout_seconds,
                         lambda: None, "connecting the data channel")
        except (_Retry, OSError, RuntimeError, LinkError) as err:
            heartbeat.stop()
            close_links(link)
            raise _Retry(str(err)) from err
        self.manifest, self.generation, self.link = manifest, generation, link
        self._heartbeat = heartbeat
        log.info("joined teacher group %d generation %d over %s", self.group, generation,
                 self.backend)

    def _check_manifest(self, m: dict) -> None:
        problems = []
        if m.get("protocol") != PROTOCOL_VERSION:
            problems.append(f"the teacher speaks link protocol {m.get('protocol')}, this "
                            f"trainer {PROTOCOL_VERSION}: run the same llama2rwkv version on both")
        fp = m.get("fingerprint", {})
        if fp.get("tokenizer") != self.tokenizer_fingerprint:
            problems.append(f"tokenizer fingerprint differs (teacher {fp.get('tokenizer')}, "
                            f"trainer {self.tokenizer_fingerprint}): teacher, student and data "
                            "must use the same tokenizer")
        if self.vocab_size is not None and fp.get("vocab_size") != self.vocab_size:
            problems.append(f"vocabulary size differs (teacher {fp.get('vocab_size')}, "
                            f"student {self.vocab_size})")
        if m.get("trainers") != self.cfg.trainers_per_group:
            problems.append(f"the teacher serves {m.get('trainers')} trainers per group, this "
                            f"trainer expects {self.cfg.trainers_per_group}: set "
                            "link.trainers_per_group the same on both sides")
        if m.get("backend") != self.backend:
            problems.append(f"the teacher uses the {m.get('backend')} backend, this trainer "
                            f"{self.backend}: set link.backend the same on both sides")
        if problems:
            raise LinkError(f"refusing to join teacher group {self.group}: "
                            + "; ".join(problems))

    # -- liveness --------------------------------------------------------------------------
    def check_teacher(self) -> None:
        # Heartbeat first, manifest second: the teacher publishes a new generation before it
        # stops the old heartbeat, so a missing heartbeat is explained by the manifest read after.
        alive, why = peer_state(self.rendezvous.gen_dir(self.generation) / "teacher.alive",
                                self.cfg.timeout_seconds)
        manifest = self.rendezvous.read_manifest()
        if manifest is not None and manifest.get("generation") != self.generation:
            raise PeerLost(f"teacher of group {self.group} opened generation "
                           f"{manifest.get('generation')} (we joined {self.generation})")
        if not alive:
            raise PeerLost(f"teacher of group {self.group} is gone: {why}")

    def _reconnect(self, err: PeerLost) -> None:
        start = time.monotonic()
        log.warning("teacher link of group %d lost (%s); rejoining within %.0f s "
                    "(link.reconnect_seconds)", self.group, err, self.cfg.reconnect_seconds)
        lost_generation = self.generation
        self._leave()
        self._join(self.cfg.reconnect_seconds, after_generation=lost_generation)
        try:
            for seq, flight in sorted(self._in_flight.items()):
                flight.status = None
                self._send_request(seq, flight)
        except PeerLost:
            pass  # lost again at once: the next wait notices and rejoins once more
        lost = time.monotonic() - start
        log.warning("teacher link of group %d back on generation %d after %.1f s; %d requests "
                    "sent again", self.group, self.generation, lost, len(self._in_flight))
        if self.on_reconnect is not None:
            self.on_reconnect(lost)

    def _leave(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        close_links(self.link)
        self.link = None
        self._status_recvs.clear()

    # -- requests --------------------------------------------------------------------------
    def request(self, input_ids: torch.Tensor, lengths: torch.Tensor, spec: RequestSpec,
                position_ids: torch.Tensor | None = None) -> TeacherHandle:
        """Send one batch; ``position_ids`` (restarting at each document) for packed rows."""
        if self.link is None:
            raise LinkError("TeacherClient.request() before connect()")
        fp = self.manifest["fingerprint"]
        check_batch(input_ids, lengths, fp["vocab_size"],
                    self.manifest["limits"]["max_tokens_per_request"], fp["num_layers"], spec,
                    position_ids)
        self._seq += 1
        cpu = [None if t is None else t.to("cpu", torch.int64).contiguous()
               for t in (input_ids, lengths, position_ids)]
        flight = _InFlight(spec, *cpu, handle=TeacherHandle(self, self._seq))
        self._in_flight[self._seq] = flight
        try:
            self._send_request(self._seq, flight)
        except PeerLost:
            pass  # the first wait on this answer rejoins and sends it again
        return flight.handle

    def _send(self, tensor: torch.Tensor, tag: int) -> None:
        if self.link is None:
            raise PeerLost("no link (reconnecting)")
        self.link.control.send(tensor, tag)

    def _recv(self, tensor: torch.Tensor, tag: int) -> Receive:
        if self.link is None:
            raise PeerLost("no link (reconnecting)")
        return self.link.control.recv(tensor, tag)

    def _send_request(self, seq: int, flight: _InFlight) -> None:
        b, t = flight.input_ids.shape
        header = encode_request(flight.spec, seq, b, t, flight.position_ids is not None)
        self._send(header, TAG_HEADER)
        for tensor in (flight.input_ids, flight.lengths, flight.position_ids):
            if tensor is not None:
                self._send(tensor, TAG_BODY)
        status = torch.zeros(STATUS_LEN, dtype=torch.int64)
        self._status_recvs.append((status, self._recv(status, TAG_STATUS)))

    def _poll_status(self, seq: int) -> bool:
        """Take every status that has arrived; True once ``seq``'s has."""
        flight = self._in_flight.get(seq)
        if flight is None:
            return True
        try:
            while flight.status is None:
                if not self._status_recvs:
                    raise PeerLost("no status receive posted (the request was not sent)")
                status, completion = self._status_recvs[0]
                if not completion.done():
                    return False
                self._status_recvs.popleft()
                decoded = decode_status(status)
                arrived = self._in_flight.get(decoded.seq)
                if arrived is None:
                    raise LinkError(f"status for request {decoded.seq}, which is not in flight: "
                                    "the link is corrupt; restart the job")
                arrived.status = decoded
                arrived.handle.teacher_forward = decoded.forward
        except PeerLost:
            return False  # result() will notice and reconnect
        return True

    def _result(self, seq: int) -> dict[str, torch.Tensor]:
        flight = self._in_flight.get(seq)
        if flight is None:
            raise LinkError(f"request {seq} was already collected (result() twice?)")
        what = f"teacher of group {self.group}, request {seq}"
        while True:
            try:
                while not self._poll_status(seq):
                    if self.link is None or not self._status_recvs:
                        raise PeerLost("the control channel failed")
                    wait_all([self._status_recvs[0][1]], self.cfg.timeout_seconds,
                             self.check_teacher, what)
                if not flight.status.ok:
                    del self._in_flight[seq]
                    raise LinkError(f"teacher of group {self.group}: "
                                    f"{ERROR_CODES.get(flight.status.code, 'unknown error')}")
                answer = self._receive(seq, flight, what)
                del self._in_flight[seq]
                return answer
            except PeerLost as err:
                self._reconnect(err)

    def _receive(self, seq: int, flight: _InFlight, what: str) -> dict[str, torch.Tensor]:
        """Say GO and receive the answer's tensors (the teacher sends them on GO)."""
        fp = self.manifest["fingerprint"]
        b, t = flight.input_ids.shape
        layout = response_layout(flight.spec, b, t, fp["vocab_size"], fp["hidden_size"])
        if not layout:
            return {}
        self._send(encode_control(KIND_GO, seq), TAG_HEADER)
        if self._recv_stream is None:
            answer = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in layout}
            comps = [self._recv(tensor, TAG_PAYLOAD) for tensor in answer.values()]
            wait_all(comps, self.cfg.timeout_seconds, self.check_teacher, what)
            return answer
        # Allocated and received on a stream of our own, so the transfer neither waits for nor
        # races with the work still queued on the compute stream (the last optimizer step).
        with torch.cuda.stream(self._recv_stream):
            answer = {name: torch.empty(shape, dtype=dtype, device=self.device)
                      for name, shape, dtype in layout}
            link = self.link
            try:
                comps = [Completion(link.data.recv([tensor], link.data_peer, 0))
                         for tensor in answer.values()]
            except RuntimeError as err:
                raise PeerLost(f"{what}: {err}") from err
        wait_all(comps, self.cfg.timeout_seconds, self.check_teacher, what)
        compute = torch.cuda.current_stream(self.device)
        for tensor in answer.values():
            tensor.record_stream(compute)  # freed memory must wait for the compute stream's use
        return answer

    def close(self, clean: bool = True) -> None:
        """Leave the group; a clean close tells the teacher, which opens a new generation."""
        if self.link is not None and clean:
            try:
                self._send(encode_control(KIND_BYE, self._seq + 1), TAG_HEADER)
            except LinkError:
                pass
        self._leave()
