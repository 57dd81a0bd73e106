"""The teacher's end of the link: publish a generation, gather the group's requests, answer.

An event loop per generation. Requests arrive on the control channel (TCP, CPU): the first
one opens a gather window of ``gather_window_seconds`` for the other trainers' (closed early
once every trainer has one queued); then one packed forward answers all of them. When the
forward is done the teacher tells each trainer its status; an answer leaves on the data
channel only when its trainer says GO, so a send never waits on a busy GPU for its peer. While
the GPU computes, the loop keeps serving: GOs, answers in flight, liveness checks.

A lost trainer (process gone, heartbeat stale, transfer failed, or a clean goodbye) ends the
generation: the model stays loaded, a new generation is published, and the teacher waits for
the group to join again; trainers re-send what they had in flight.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.config import LinkConfig, TeacherConfig
from shared.link.channel import Completion, PeerLost, wait_all
from shared.link.control import Listener, Receive
from shared.link.protocol import (
    HEADER_LEN,
    KIND_BYE,
    KIND_GO,
    KIND_REQUEST,
    PROTOCOL_VERSION,
    TAG_BODY,
    TAG_HEADER,
    TAG_PAYLOAD,
    TAG_STATUS,
    LinkError,
    Request,
    decode_request,
    encode_status,
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
from shared.link.teacher_model import TeacherModel, TeacherRequest
from shared.metrics import TeacherMetrics
from shared.profiling import StepProfiler

log = logging.getLogger(__name__)

POLL_SECONDS = 0.0002  # an idle loop sleeps this long between polls
CHECK_SECONDS = 0.5    # how often peers' heartbeats are read


@dataclass
class Queued:
    """A request received in full, waiting for the next forward."""

    trainer: int
    request: Request
    tensors: TeacherRequest
    arrived: float


@dataclass
class Answer:
    """A finished (or failed) forward's output for one request, held until its trainer's GO."""

    trainer: int
    seq: int
    tensors: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None
    sending: list[Completion] | None = None  # None: not posted yet (no GO)
    sent_at: float = 0.0


@dataclass
class Forward:
    """The batched forward running on the GPU."""

    batch: list[Queued]
    outputs: list[dict[str, torch.Tensor]]
    started: float
    timer: tuple[torch.cuda.Event, torch.cuda.Event] | None  # CUDA; None on CPU (already done)


class TeacherServer:
    """Serves one group until ``stop`` is set."""

    def __init__(self, teacher: TeacherModel, link: LinkConfig, teacher_cfg: TeacherConfig,
                 group: int, metrics: TeacherMetrics | None = None) -> None:
        self.teacher = teacher
        self.link = link
        self.teacher_cfg = teacher_cfg
        self.group = group
        self.metrics = metrics or TeacherMetrics(group)
        self.backend = resolve_backend(link.backend, teacher.device)
        self.rendezvous = GroupRendezvous(link.rendezvous_dir, group)
        self.trainers = link.trainers_per_group
        self.profiler = StepProfiler(teacher_cfg.profile_batches, teacher_cfg.profile_dir,
                                     f"teacher-group{group}")
        self.batches = 0
        self.ready = False
        self.generation = 0
        self._cuda = teacher.device.type == "cuda"
        self.listener = Listener(link.control_host, link.timeout_seconds)

    def manifest(self) -> dict:
        return {
            "protocol": PROTOCOL_VERSION,
            "fingerprint": self.teacher.fingerprint.as_dict(),
            "capabilities": {"logits": ["bf16", "topk", "fp32", "none"], "hidden_states": True},
            "limits": {"max_tokens_per_request": self.teacher_cfg.max_tokens_per_request,
                       "max_batch_tokens": self.teacher_cfg.max_batch_tokens},
            "trainers": self.trainers,
            "backend": self.backend,
            "control": list(self.listener.address),
        }

    def serve(self, stop: threading.Event) -> None:
        """Open generation after generation until ``stop`` is set (the caller holds the group's
        lock: GroupRendezvous.claim)."""
        heartbeat = None
        try:
            while not stop.is_set():
                heartbeat = self._serve_one_generation(stop, heartbeat)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            self.listener.close()
            self.ready = False
            self.metrics.ready.set(0)
            self.rendezvous.remove_manifest()

    def _serve_one_generation(self, stop: threading.Event, previous: Heartbeat | None) -> Heartbeat:
        """Serve one generation; returns its heartbeat, still beating.

        The previous generation's heartbeat stops only after this generation's manifest is
        published: a trainer of the old generation that finds the teacher's heartbeat gone then
        always finds the new generation in the manifest (and rejoins it).
        """
        rdv, link = self.rendezvous, self.link
        self.generation = rdv.open_generation(self.manifest())
        if previous is not None:
            previous.stop()
        gen_dir = rdv.gen_dir(self.generation)
        heartbeat = Heartbeat(gen_dir / "teacher.alive", link.heartbeat_seconds,
                              {"generation": self.generation})
        self.metrics.generation.set(self.generation)
        self.metrics.ready.set(1)
        self.ready = True
        log.info("group %d: generation %d published in %s, waiting for %d trainers",
                 self.group, self.generation, rdv.dir, self.trainers)
        links = None
        try:
            if not wait_until(lambda: len(rdv.joined_trainers(
                    self.generation, self.trainers, link.timeout_seconds)) >= self.trainers, stop):
                return heartbeat
            rdv.mark_complete(self.generation)
            connections = self.listener.accept(self.generation, self.trainers,
                                               time.monotonic() + link.timeout_seconds,
                                               self.check_trainers)
            data = (nccl_data_group(gen_dir / "store", self.trainers, self.trainers + 1,
                                    link.timeout_seconds) if self.backend == "nccl" else None)
            links = [Link(connections[r], data, r) for r in range(self.trainers)]
            self.metrics.trainers_connected.set(self.trainers)
            log.info("group %d: %d trainers joined generation %d", self.group,
                     self.trainers, self.generation)
            _GenerationLoop(self, links).run(stop)
        except (PeerLost, LinkError, RuntimeError) as err:
            log.warning("group %d: generation %d ended: %s", self.group, self.generation, err)
        except BaseException:
            heartbeat.stop()
            raise
        finally:
            self.metrics.trainers_connected.set(0)
            close_links(links)
        return heartbeat

    def check_trainers(self, which: list[int] | None = None) -> None:
        gen_dir = self.rendezvous.gen_dir(self.generation)
        for r in which if which is not None else range(self.trainers):
            alive, why = peer_state(gen_dir / f"trainer-{r}.alive", self.link.timeout_seconds)
            if not alive:
                raise PeerLost(f"trainer {r} of group {self.group} is gone: {why}")


def wait_until(ready: Callable[[], bool], stop: threading.Event, poll: float = 0.05) -> bool:
    """Poll ``ready`` until it holds (True) or ``stop`` is set (False).

    Sleeps between polls, never ``stop.wait(poll)``: the teacher's SIGTERM handler sets ``stop``
    in the main thread, and Event.wait holds the event's lock for an instant on entry; a signal
    landing in that instant made the handler's set() wait for a lock its own thread held,
    forever (a teacher still waiting for trainers hung after SIGTERM in CI on 2026-12-04;
    py-spy: on_signal > Event.set > Condition.__enter__, called from inside Event.wait)."""
    while not ready():
        if stop.is_set():
            return False
        time.sleep(poll)
    return True


class _GenerationLoop:
    """The serving loop of one generation (state that dies with it)."""

    def __init__(self, server: TeacherServer, links: list[Link]) -> None:
        self.server = server
        self.links = links
        self.metrics = server.metrics
        self.device = server.teacher.device
        self.headers: dict[int, tuple[torch.Tensor, Receive]] = {}
        self.queued: list[Queued] = []
        self.answers: dict[tuple[int, int], Answer] = {}
        self.go: set[tuple[int, int]] = set()       # GO received before the answer was ready
        self.active = set(range(server.trainers))   # trainers that have not said goodbye
        self.forward: Forward | None = None
        self.send_stream = torch.cuda.Stream(self.device) if server._cuda else None
        self.idle_since = time.perf_counter()
        self.profiler = server.profiler

    def _warm_up(self) -> None:
        """Connect the data channel to every trainer now (NCCL connects a pair on its first
        transfer, seconds), not inside the first answer's transfer."""
        if self.links[0].data is None:
            return
        one = torch.ones(1, device=self.device)
        sends = [Completion(link.data.send([one], link.data_peer, 0)) for link in self.links]
        wait_all(sends, self.server.link.timeout_seconds, self.server.check_trainers,
                 f"group {self.server.group}: connecting the data channel")

    def _post_header(self, r: int) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        self.headers[r] = (header, self.links[r].control.recv(header, TAG_HEADER))

    def run(self, stop: threading.Event) -> None:
        server = self.server
        self._warm_up()
        for r in range(server.trainers):
            self._post_header(r)
        last_check = time.monotonic()
        stop_deadline = None
        while True:
            busy = self._poll_headers()
            busy |= self._poll_forward()
            busy |= self._poll_sends()
            if stop.is_set():
                # finish the batch in flight and hand out its answers (bounded), start nothing
                stop_deadline = stop_deadline or time.monotonic() + server.link.timeout_seconds
                if (self.forward is None and not self.answers) or time.monotonic() > stop_deadline:
                    return
            elif self.forward is None and self._gather_due():
                self._start_forward()
                busy = True
            now = time.monotonic()
            if now - last_check > CHECK_SECONDS:
                server.check_trainers(sorted(self.active))
                last_check = now
            if not busy:
                time.sleep(POLL_SECONDS)

    # -- control messages ----------------------------------------------------------------
    def _poll_headers(self) -> bool:
        progressed = False
        for r, (header, completion) in list(self.headers.items()):
            if not completion.done():
                continue
            progressed = True
            request = decode_request(header)
            if request.kind == KIND_BYE:
                # The others may still have answers to collect: serve them until they leave
                # too (or one is lost); then the generation ends and a new one is published.
                self.active.discard(r)
                del self.headers[r]
                log.info("group %d: trainer %d left", self.server.group, r)
                if not self.active:
                    raise PeerLost("every trainer of the group left")
                continue
            if request.kind == KIND_GO:
                self.go.add((r, request.seq))
            elif request.kind == KIND_REQUEST:
                self._receive_body(r, request)
            else:
                raise LinkError(f"trainer {r} sent a message of unknown kind {request.kind}")
            self._post_header(r)
        for key in [k for k in self.go if k in self.answers and self.answers[k].sending is None]:
            self._send_answer(self.answers[key])
        return progressed

    def _receive_body(self, r: int, request: Request) -> None:
        start = time.perf_counter()
        ids = torch.empty(request.batch, request.length, dtype=torch.int64)
        lengths = torch.empty(request.batch, dtype=torch.int64)
        positions = torch.empty_like(ids) if request.packed else None
        comps = [self.links[r].control.recv(t, TAG_BODY)
                 for t in (ids, lengths, positions) if t is not None]
        wait_all(comps, self.server.link.timeout_seconds, lambda: self.server.check_trainers([r]),
                 f"group {self.server.group}: receiving the token ids of trainer {r}")
        self.metrics.recv_seconds.observe(time.perf_counter() - start)
        if not self.queued and self.forward is None:
            self.metrics.wait_seconds.observe(time.perf_counter() - self.idle_since)
        self.queued.append(Queued(r, request, TeacherRequest(request.spec, ids, lengths, positions),
                                  time.monotonic()))

    # -- forwards -------------------------------------------------------------------------
    def _gather_due(self) -> bool:
        if not self.queued:
            return False
        waiting = {q.trainer for q in self.queued}
        window = self.server.teacher_cfg.gather_window_seconds
        return (waiting >= self.active
                or time.monotonic() - self.queued[0].arrived >= window)

    def _start_forward(self) -> None:
        batch, self.queued = self.queued, []
        self.server.batches += 1
        self.profiler.begin(self.server.batches)
        started = time.time()
        timer = None
        if self.server._cuda:
            timer = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timer[0].record()
        t0 = time.perf_counter()
        try:
            outputs = self.server.teacher.forward([q.tensors for q in batch])
        except Exception as err:  # noqa: BLE001 - reported to the trainers, the service stays up
            self._fail_batch(batch, err, started)
            return
        if timer is not None:
            timer[1].record()
        else:
            self.metrics.forward_seconds.observe(time.perf_counter() - t0)
        self.forward = Forward(batch, outputs, started, timer)

    def _fail_batch(self, batch: list[Queued], err: Exception, started: float) -> None:
        oom = isinstance(err, torch.OutOfMemoryError)
        log.error("group %d: forward failed: %s", self.server.group, err, exc_info=not oom)
        if oom:
            torch.cuda.empty_cache()
        for q in batch:
            self._send_status(q.trainer, q.request.seq, False, 1 if oom else 2, started)
        self.idle_since = time.perf_counter()

    def _poll_forward(self) -> bool:
        fwd = self.forward
        if fwd is None:
            return False
        if fwd.timer is not None:
            if not fwd.timer[1].query():
                return False
            self.metrics.forward_seconds.observe(fwd.timer[0].elapsed_time(fwd.timer[1]) / 1e3)
        finished = time.time()
        self.forward = None
        self.profiler.end(self.server.batches)
        self.metrics.batches.inc()
        self.metrics.tokens.inc(sum(int(q.tensors.lengths.sum()) for q in fwd.batch))
        for q, out in zip(fwd.batch, fwd.outputs, strict=True):
            answer = Answer(q.trainer, q.request.seq, out, fwd.timer[1] if fwd.timer else None)
            self.answers[(q.trainer, q.request.seq)] = answer
            self._send_status(q.trainer, q.request.seq, True, 0, fwd.started, finished)
            if not out:
                answer.sending = []  # nothing to send: the status is the whole answer
            elif (q.trainer, q.request.seq) in self.go:
                self._send_answer(answer)
        self.idle_since = time.perf_counter()
        return True

    def _send_status(self, r: int, seq: int, ok: bool, code: int, started: float,
                     finished: float | None = None) -> None:
        status = encode_status(seq, ok, code, started, finished or time.time())
        self.links[r].control.send(status, TAG_STATUS)

    # -- answers --------------------------------------------------------------------------
    def _send_answer(self, answer: Answer) -> None:
        """Post the answer's sends now that its trainer has posted the receives."""
        self.go.discard((answer.trainer, answer.seq))
        answer.sent_at = time.perf_counter()
        tensors = list(answer.tensors.values())
        link = self.links[answer.trainer]
        if link.data is None:  # CPU: the answer travels on the control connection
            for t in tensors:
                link.control.send(t, TAG_PAYLOAD)
            answer.sending = []
            return
        try:
            # A stream of its own that waits only for this answer's forward: the NCCL send
            # must not queue behind a later forward running for the other trainers.
            with torch.cuda.stream(self.send_stream):
                self.send_stream.wait_event(answer.ready)
                answer.sending = [Completion(link.data.send([t], link.data_peer, 0))
                                  for t in tensors]
        except RuntimeError as err:
            raise PeerLost(f"trainer {answer.trainer}: sending answer {answer.seq}: {err}") from err

    def _poll_sends(self) -> bool:
        progressed = False
        for key, answer in list(self.answers.items()):
            if answer.sending is not None and all(c.done() for c in answer.sending):
                self.metrics.send_seconds.observe(time.perf_counter() - answer.sent_at)
                del self.answers[key]
                progressed = True
        return progressed

