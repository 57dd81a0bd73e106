"""The teacher's end of the link: publish a generation, gather the group's requests, answer.

One round: wait for a request header from any trainer of the group, give the others
``gather_window_seconds`` to send theirs, receive the ids, run one packed forward for all of
them, send each trainer its slice. A lost trainer (process gone, heartbeat stale, transfer
failed, or a clean goodbye) ends the generation: the model stays loaded, a new generation is
published, and the teacher waits for trainers again.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from shared.config import LinkConfig, TeacherConfig
from shared.link.channel import Completion, PeerLost, wait_all
from shared.link.protocol import (HEADER_LEN, KIND_BYE, PROTOCOL_VERSION, LinkError,
                                  decode_request, encode_status)
from shared.link.rendezvous import (GroupRendezvous, Heartbeat, abort_process_group,
                                    make_process_group, peer_state, resolve_backend)
from shared.link.teacher_model import TeacherModel
from shared.metrics import TeacherMetrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    header: torch.Tensor
    completion: Completion


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
        self.ready = False
        self.generation = 0
        self._dev = teacher.device if self.backend == "nccl" else torch.device("cpu")

    def manifest(self) -> dict:
        return {
            "protocol": PROTOCOL_VERSION,
            "fingerprint": self.teacher.fingerprint.as_dict(),
            "capabilities": {"logits": ["bf16", "topk", "fp32", "none"], "hidden_states": True},
            "limits": {"max_tokens_per_request": self.teacher_cfg.max_tokens_per_request,
                       "max_batch_tokens": self.teacher_cfg.max_batch_tokens},
            "trainers": self.trainers,
            "backend": self.backend,
        }

    def serve(self, stop: threading.Event) -> None:
        """Open generation after generation until ``stop`` is set."""
        heartbeat = None
        try:
            while not stop.is_set():
                heartbeat = self._serve_one_generation(stop, heartbeat)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            self.ready = False
            self.metrics.ready.set(0)
            self.rendezvous.remove_manifest()

    def _serve_one_generation(self, stop: threading.Event, previous: Heartbeat | None) -> Heartbeat:
        """Serve one generation; returns its heartbeat, still beating.

        The previous generation's heartbeat stops only after this generation's manifest is
        published: a trainer of the old generation that finds the teacher's heartbeat gone then
        always finds the new generation in the manifest, and says so (not "teacher gone").
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
        pg = None
        try:
            while len(rdv.joined_trainers(self.generation, self.trainers,
                                          link.timeout_seconds)) < self.trainers:
                if stop.wait(0.2):
                    return heartbeat
            pg = make_process_group(gen_dir / "store", self.trainers, self.trainers + 1,
                                    self.backend, link.timeout_seconds)
            self.metrics.trainers_connected.set(self.trainers)
            log.info("group %d: %d trainers joined generation %d", self.group,
                     self.trainers, self.generation)
            self._serve_rounds(pg, stop)
        except (PeerLost, LinkError, RuntimeError) as err:
            log.warning("group %d: generation %d ended: %s", self.group, self.generation, err)
        except BaseException:
            heartbeat.stop()
            raise
        finally:
            self.metrics.trainers_connected.set(0)
            if pg is not None:
                abort_process_group(pg)
        return heartbeat

    # -- rounds ----------------------------------------------------------------------------
    def _check_trainers(self, which: list[int] | None = None) -> None:
        gen_dir = self.rendezvous.gen_dir(self.generation)
        for r in which if which is not None else range(self.trainers):
            alive, why = peer_state(gen_dir / f"trainer-{r}.alive", self.link.timeout_seconds)
            if not alive:
                raise PeerLost(f"trainer {r} of group {self.group} is gone: {why}")

    def _post_header(self, pg, r: int) -> _Pending:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self._dev)
        return _Pending(header, Completion(pg.recv([header], r, 0), self.backend))

    def _serve_rounds(self, pg, stop: threading.Event) -> None:
        pending = {r: self._post_header(pg, r) for r in range(self.trainers)}
        m = self.metrics
        while not stop.is_set():
            wait_start = time.perf_counter()
            ready = self._gather(pending, stop)
            if not ready:
                return  # stop requested while idle
            m.wait_seconds.observe(time.perf_counter() - wait_start)
            recv_start = time.perf_counter()
            batches, comps = [], []
            for r in ready:
                req = decode_request(pending[r].header.cpu())
                if req.kind == KIND_BYE:
                    raise PeerLost(f"trainer {r} left the group")
                ids = torch.empty(req.batch, req.length, dtype=torch.int64, device=self._dev)
                lengths = torch.empty(req.batch, dtype=torch.int64, device=self._dev)
                positions = torch.empty_like(ids) if req.packed else None
                comps += [Completion(pg.recv([t], r, 0), self.backend)
                          for t in (ids, lengths, positions) if t is not None]
                batches.append((r, req, ids, lengths, positions))
            wait_all(comps, self.link.timeout_seconds, lambda: self._check_trainers(ready),
                     f"group {self.group}: receiving token ids")
            m.recv_seconds.observe(time.perf_counter() - recv_start)
            outputs, ok, code, started = self._forward(batches)
            finished = time.time()
            send_start = time.perf_counter()
            comps = []
            keep = []
            for (r, req, *_), out in zip(batches, outputs):
                status = encode_status(req.seq, ok, code)
                status[4], status[5] = int(started * 1e6), int(finished * 1e6)
                status = status.to(self._dev)
                keep.append(status)
                comps.append(Completion(pg.send([status], r, 0), self.backend))
                for tensor in (out.values() if ok else ()):
                    comps.append(Completion(pg.send([tensor], r, 0), self.backend))
            wait_all(comps, self.link.timeout_seconds, lambda: self._check_trainers(ready),
                     f"group {self.group}: sending results")
            m.send_seconds.observe(time.perf_counter() - send_start)
            for r in ready:
                pending[r] = self._post_header(pg, r)

    def _gather(self, pending: dict[int, _Pending], stop: threading.Event) -> list[int]:
        """Trainers whose request arrived: the first one, plus those within the window."""
        last_check = time.monotonic()
        first_at = None
        while True:
            ready = [r for r, p in pending.items() if p.completion.done()]
            now = time.monotonic()
            if ready and first_at is None:
                first_at = now
            if len(ready) == len(pending) or (
                    first_at is not None and now - first_at >= self.teacher_cfg.gather_window_seconds):
                return ready
            if first_at is None and stop.is_set():
                return []
            if now - last_check > 0.5:
                self._check_trainers()
                last_check = now
            time.sleep(0.0005)

    def _forward(self, batches) -> tuple[list[dict], bool, int, float]:
        m = self.metrics
        start = time.time()
        t0 = time.perf_counter()
        try:
            outputs = self.teacher.forward([(req.spec, ids, lengths, positions)
                                            for _, req, ids, lengths, positions in batches])
            if self.teacher.device.type == "cuda":
                torch.cuda.synchronize(self.teacher.device)
        except torch.OutOfMemoryError:
            log.exception("group %d: out of memory", self.group)
            torch.cuda.empty_cache()
            return [{} for _ in batches], False, 1, start
        except Exception:  # noqa: BLE001 - reported to the trainers, the service stays up
            log.exception("group %d: forward failed", self.group)
            return [{} for _ in batches], False, 2, start
        m.forward_seconds.observe(time.perf_counter() - t0)
        m.batches.inc()
        m.tokens.inc(sum(int(lengths.sum()) for _, _, _, lengths, _ in batches))
        return outputs, True, 0, start
