"""The trainer's end of the teacher link: join a group, send requests, wait for answers.

    client = TeacherClient(link_cfg, group=rank // n, index=rank % n, device=dev,
                           tokenizer_fingerprint=fp, vocab_size=V)
    client.connect()                                  # handshake + join, bounded
    handle = client.request(ids, lengths, spec)       # returns at once
    ...train on the previous step...
    out = handle.result()                             # {"logits"|"topk_*"|"hidden_states"}

``InProcessTeacher`` offers the same ``request`` API with the model in the trainer's process.
"""
from __future__ import annotations

import logging
import time

import torch

from shared.config import LinkConfig
from shared.link.channel import Completion, PeerLost, wait_all
from shared.link.protocol import (ERROR_CODES, MAGIC, PROTOCOL_VERSION, STATUS_LEN, STATUS_OK,
                                  LinkError, RequestSpec, check_batch, encode_bye,
                                  encode_request, response_layout)
from shared.link.rendezvous import (GroupRendezvous, Heartbeat, abort_process_group,
                                    make_process_group, peer_state, resolve_backend)
from shared.link.teacher_model import TeacherModel

log = logging.getLogger(__name__)


class TeacherHandle:
    """An answer on its way. ``result()`` waits (bounded); ``ready()`` never blocks."""

    def __init__(self, client: "TeacherClient | None", completions: list[Completion],
                 status: torch.Tensor | None, payload: dict[str, torch.Tensor],
                 keep_alive: list[torch.Tensor], seq: int) -> None:
        self._client = client
        self._completions = completions
        self._status = status
        self._payload = payload
        self._keep_alive = keep_alive  # tensors being sent must outlive the send
        self.seq = seq
        self.sent_at = time.time()
        self.arrived_at: float | None = None
        self.teacher_forward: tuple[float, float] | None = None

    def ready(self) -> bool:
        if all(c.done() for c in self._completions):
            if self.arrived_at is None:
                self.arrived_at = time.time()
            return True
        return False

    def result(self) -> dict[str, torch.Tensor]:
        if self._client is not None and self.arrived_at is None:
            c = self._client
            try:
                wait_all(self._completions, c.cfg.timeout_seconds, c.check_teacher,
                         f"teacher of group {c.group}, request {self.seq}")
            except PeerLost as err:
                c.fail(err)
        self.ready()
        if self._status is not None:
            status = self._status.tolist()
            if status[0] != MAGIC or status[2] != self.seq:
                raise LinkError(f"out-of-order answer from the teacher (seq {status[2]}, "
                                f"expected {self.seq}): the link is corrupt; restart the job")
            if status[1] != STATUS_OK:
                raise LinkError(f"teacher of group {self._client.group}: "
                                f"{ERROR_CODES.get(status[3], 'unknown error')}")
            if status[4]:
                self.teacher_forward = (status[4] / 1e6, status[5] / 1e6)
        self._keep_alive = []
        return self._payload


class TeacherClient:
    """One trainer's connection to its group's teacher service."""

    def __init__(self, cfg: LinkConfig, group: int, index: int, device: torch.device,
                 tokenizer_fingerprint: str, vocab_size: int | None = None) -> None:
        if not 0 <= index < cfg.trainers_per_group:
            raise LinkError(f"trainer index {index} outside 0..{cfg.trainers_per_group - 1}")
        self.cfg = cfg
        self.group = group
        self.index = index
        self.device = device
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.vocab_size = vocab_size
        self.backend = resolve_backend(cfg.backend, device)
        self.rendezvous = GroupRendezvous(cfg.rendezvous_dir, group)
        self.manifest: dict = {}
        self.generation = 0
        self.pg = None
        self._heartbeat: Heartbeat | None = None
        self._seq = 0
        self._broken: LinkError | None = None

    # -- joining ---------------------------------------------------------------------------
    def connect(self) -> dict:
        """Find the live teacher of our group, check it serves our vocabulary, and join."""
        cfg, rdv = self.cfg, self.rendezvous
        deadline = time.monotonic() + cfg.timeout_seconds
        why = "no manifest yet"
        while True:
            manifest = rdv.read_manifest()
            if manifest is not None:
                alive, why = peer_state(rdv.gen_dir(manifest["generation"]) / "teacher.alive",
                                        cfg.timeout_seconds)
                if alive:
                    break
            if time.monotonic() > deadline:
                raise LinkError(
                    f"no live teacher for group {self.group} in {rdv.dir} within "
                    f"{cfg.timeout_seconds:.0f} s ({why}): start it with `python -m "
                    f"services.teacher --config CFG --group {self.group}` and check that "
                    "link.rendezvous_dir is the same shared directory on both sides")
            time.sleep(0.2)
        self._check_manifest(manifest)
        self.manifest = manifest
        self.generation = manifest["generation"]
        gen_dir = rdv.gen_dir(self.generation)
        self._heartbeat = Heartbeat(gen_dir / f"trainer-{self.index}.alive",
                                    cfg.heartbeat_seconds, {"generation": self.generation})
        n = cfg.trainers_per_group
        try:
            self.pg = make_process_group(gen_dir / "store", self.index, n + 1, self.backend,
                                         cfg.timeout_seconds)
        except Exception as err:
            self._heartbeat.stop()
            raise LinkError(f"could not join teacher group {self.group} (generation "
                            f"{self.generation}) within {cfg.timeout_seconds:.0f} s: {err}. "
                            f"Are all {n} trainers of the group running?") from err
        log.info("joined teacher group %d generation %d over %s", self.group,
                 self.generation, self.backend)
        return manifest

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
                           f"{manifest.get('generation')} (we joined {self.generation}): a peer "
                           "of the group was lost; restart the trainers to rejoin")
        if not alive:
            raise PeerLost(f"teacher of group {self.group} is gone: {why}")

    def fail(self, err: LinkError) -> None:
        self._broken = LinkError(f"teacher link of group {self.group} broken: {err}")
        self.close(clean=False)
        raise self._broken from err

    # -- requests --------------------------------------------------------------------------
    def request(self, input_ids: torch.Tensor, lengths: torch.Tensor, spec: RequestSpec,
                position_ids: torch.Tensor | None = None) -> TeacherHandle:
        """Send one batch; ``position_ids`` (restarting at each document) for packed rows."""
        if self._broken is not None:
            raise self._broken
        if self.pg is None:
            raise LinkError("TeacherClient.request() before connect()")
        fp = self.manifest["fingerprint"]
        check_batch(input_ids, lengths, fp["vocab_size"],
                    self.manifest["limits"]["max_tokens_per_request"], fp["num_layers"], spec,
                    position_ids)
        self._seq += 1
        batch, length = input_ids.shape
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        header = encode_request(spec, self._seq, batch, length, position_ids is not None).to(dev)
        sent = [header] + [t.to(dev, torch.int64).contiguous()
                           for t in (input_ids, lengths, position_ids) if t is not None]
        teacher = self.cfg.trainers_per_group
        comps = [Completion(self.pg.send([t], teacher, 0), self.backend) for t in sent]
        status = torch.zeros(STATUS_LEN, dtype=torch.int64, device=dev)
        payload = {name: torch.empty(shape, dtype=dtype, device=dev) for name, shape, dtype in
                   response_layout(spec, batch, length, fp["vocab_size"], fp["hidden_size"])}
        for t in (status, *payload.values()):
            comps.append(Completion(self.pg.recv([t], teacher, 0), self.backend))
        return TeacherHandle(self, comps, status, payload, sent, self._seq)

    def close(self, clean: bool = True) -> None:
        """Leave the group; a clean close tells the teacher, which opens a new generation."""
        if self.pg is not None and clean and self._broken is None:
            try:
                dev = self.device if self.backend == "nccl" else torch.device("cpu")
                wait_all([Completion(self.pg.send([encode_bye(self._seq + 1).to(dev)],
                                                  self.cfg.trainers_per_group, 0), self.backend)],
                         5.0, lambda: None, "goodbye")
            except LinkError:
                pass
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.pg is not None and not clean:
            abort_process_group(self.pg)
        self.pg = None


class InProcessTeacher:
    """The same ``request`` API, with the teacher model in the trainer's own process.

    For small setups and as a performance baseline: the forward runs at ``request`` time on
    the trainer's device, so nothing overlaps.
    """

    def __init__(self, teacher: TeacherModel, max_tokens_per_request: int = 1 << 30) -> None:
        self.teacher = teacher
        self.max_tokens = max_tokens_per_request
        self._seq = 0

    def request(self, input_ids: torch.Tensor, lengths: torch.Tensor, spec: RequestSpec,
                position_ids: torch.Tensor | None = None) -> TeacherHandle:
        fp = self.teacher.fingerprint
        check_batch(input_ids, lengths, fp.vocab_size, self.max_tokens, fp.num_layers, spec,
                    position_ids)
        self._seq += 1
        start = time.time()
        (out,) = self.teacher.forward([(spec, input_ids, lengths, position_ids)])
        handle = TeacherHandle(None, [], None, out, [], self._seq)
        handle.sent_at, handle.teacher_forward = start, (start, time.time())
        return handle

    def close(self, clean: bool = True) -> None:
        pass
