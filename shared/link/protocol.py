"""The teacher link's wire protocol: what a request and a response are, as plain tensors.

Nothing is pickled. Two channels join a trainer and its teacher (rendezvous.py builds both):

* **control** (one TCP connection per trainer, control.py; CPU tensors, always): fixed-size
  int64 headers, the request bodies (token
  ids are small) and the teacher's status; a pending control receive costs a sleeping thread;
* **data** (NCCL between GPUs, or the control group itself on CPU): the answer's tensors only,
  posted on both ends at the same moment, when the trainer asks for them (``KIND_GO``), so no
  NCCL kernel ever sits on a GPU waiting for a busy peer (they hold SMs while they wait).

    trainer ── header[HEADER_LEN] kind=REQUEST ─▶ teacher    control, tag TAG_HEADER
    trainer ── ids[B, T], lengths[B]           ─▶ teacher    control, tag TAG_BODY
    trainer ── positions[B, T]                 ─▶ teacher    only when the header says packed
                                                              (position ids restart at each
                                                              document: attention within it)
    trainer ◀─ status[STATUS_LEN]              ── teacher    control, tag TAG_STATUS, once the
                                                              forward is done (or failed)
    trainer ── header kind=GO (seq)            ─▶ teacher    control: "receiving seq now"
    trainer ◀─ payload tensors                 ── teacher    data; see ``response_layout``

Every request carries its own (batch, length) and sequence number, so no buffer has a fixed
shape, lengths vary freely between steps, and answers may be collected in any order.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

PROTOCOL_VERSION = 3  # 2: packed rows; 3: control channel apart, payload sent on GO
MAGIC = 0x4C32524B  # "L2RK"
MAX_HIDDEN_LAYERS = 128
HEADER_LEN = 16 + MAX_HIDDEN_LAYERS
STATUS_LEN = 8

KIND_REQUEST = 1
KIND_BYE = 2  # a trainer leaves cleanly; the teacher opens a new generation for the group
KIND_GO = 3   # the trainer posts its receives for answer ``seq`` now: the teacher sends it

# Control-channel tags: one FIFO per (peer, tag), so bodies never pass headers.
TAG_HEADER, TAG_BODY, TAG_STATUS, TAG_PAYLOAD = 0, 1, 2, 3

STATUS_OK = 0
STATUS_ERROR = 1

LOGITS_MODES = {"none": 0, "bf16": 1, "topk": 2, "fp32": 3}
_MODE_NAMES = {v: k for k, v in LOGITS_MODES.items()}
TEMPERATURE_SCALE = 1_000_000  # the header is int64: temperature travels as micro-units


class LinkError(RuntimeError):
    """A teacher-link failure with a message that names the cause and the fix."""


class RequestError(LinkError, ValueError):
    """A request that must not be sent (caught on the trainer before any byte moves)."""


@dataclass
class RequestSpec:
    """What one trainer asks the teacher for, besides the token ids themselves.

    ``hidden_layers`` index hidden states with the project's convention: state i < L is the
    input of decoder layer i (0 = embeddings), state L is the last layer's output before the
    final norm. Output of layer i is therefore state i + 1.
    """

    logits: str = "bf16"
    top_k: int = 128
    temperature: float = 1.0
    hidden_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.logits not in LOGITS_MODES:
            raise RequestError(f"logits={self.logits!r}: choose one of {list(LOGITS_MODES)}")
        if self.logits == "topk" and self.top_k < 1:
            raise RequestError(f"top_k={self.top_k}: must be at least 1")
        if len(self.hidden_layers) > MAX_HIDDEN_LAYERS:
            raise RequestError(f"{len(self.hidden_layers)} hidden layers requested; the "
                               f"protocol carries at most {MAX_HIDDEN_LAYERS}")
        if self.temperature <= 0:
            raise RequestError(f"temperature={self.temperature}: must be positive")

    @property
    def hidden_dtype(self) -> torch.dtype:
        # The reference protocol (fp32 logits) also sent fp32 hidden states; keep that
        # reproducible, everything else travels in bf16.
        return torch.float32 if self.logits == "fp32" else torch.bfloat16


def layer_io_states(layers: Iterable[int]) -> list[int]:
    """Hidden-state indices of the inputs and outputs of ``layers`` (input of layer i is state i,
    its output state i + 1): what per-layer alignment asks the teacher for."""
    return sorted({s for i in layers for s in (i, i + 1)})


def layer_output_states(num_layers: int) -> list[int]:
    """Hidden-state indices of every decoder layer's output (states 1..L)."""
    return list(range(1, num_layers + 1))


def encode_request(spec: RequestSpec, seq: int, batch: int, length: int,
                   packed: bool = False) -> torch.Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1], header[2], header[3] = MAGIC, PROTOCOL_VERSION, KIND_REQUEST, seq
    header[4], header[5] = batch, length
    header[6], header[7] = LOGITS_MODES[spec.logits], spec.top_k
    header[8] = round(spec.temperature * TEMPERATURE_SCALE)
    header[9] = len(spec.hidden_layers)
    header[10] = int(packed)
    for i, layer in enumerate(spec.hidden_layers):
        header[16 + i] = layer
    return header


def encode_control(kind: int, seq: int) -> torch.Tensor:
    """A header without a body: ``KIND_BYE`` or ``KIND_GO``."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[1], header[2], header[3] = MAGIC, PROTOCOL_VERSION, kind, seq
    return header


@dataclass
class Request:
    """A decoded request header (the teacher's view)."""

    kind: int
    seq: int
    batch: int
    length: int
    spec: RequestSpec
    packed: bool = False  # position ids follow the lengths


def decode_request(header: torch.Tensor) -> Request:
    h = header.tolist()
    if h[0] != MAGIC or h[1] != PROTOCOL_VERSION:
        raise LinkError(f"bad request header (magic {h[0]:#x}, version {h[1]}): the trainer "
                        f"speaks another protocol than version {PROTOCOL_VERSION}")
    n = h[9]
    spec = RequestSpec(logits=_MODE_NAMES.get(h[6], "none"), top_k=max(h[7], 1),
                       temperature=max(h[8], 1) / TEMPERATURE_SCALE,
                       hidden_layers=h[16:16 + n])
    return Request(kind=h[2], seq=h[3], batch=h[4], length=h[5], spec=spec, packed=bool(h[10]))


def encode_status(seq: int, ok: bool, code: int = 0, started: float = 0.0,
                  finished: float = 0.0) -> torch.Tensor:
    """``started``/``finished``: wall-clock seconds of the forward (trainers log the overlap)."""
    status = torch.zeros(STATUS_LEN, dtype=torch.int64)
    status[0], status[1], status[2], status[3] = MAGIC, STATUS_OK if ok else STATUS_ERROR, seq, code
    status[4], status[5] = int(started * 1e6), int(finished * 1e6)
    return status


@dataclass
class Status:
    """A decoded status (the trainer's view)."""

    seq: int
    ok: bool
    code: int
    forward: tuple[float, float] | None  # the teacher's forward, wall-clock seconds


def decode_status(status: torch.Tensor) -> Status:
    s = status.tolist()
    if s[0] != MAGIC:
        raise LinkError(f"bad status from the teacher (magic {s[0]:#x}): the link is corrupt")
    forward = (s[4] / 1e6, s[5] / 1e6) if s[4] else None
    return Status(seq=s[2], ok=s[1] == STATUS_OK, code=s[3], forward=forward)


ERROR_CODES = {1: "the teacher ran out of memory on this batch (lower micro_batch_size or "
                  "teacher.max_batch_tokens)",
               2: "the teacher failed on this batch (see the teacher's log)"}


def response_layout(spec: RequestSpec, batch: int, length: int, vocab_size: int,
                    hidden_size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of each payload tensor, in the order they travel."""
    layout: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    if spec.logits == "bf16":
        layout.append(("logits", (batch, length, vocab_size), torch.bfloat16))
    elif spec.logits == "fp32":
        layout.append(("logits", (batch, length, vocab_size), torch.float32))
    elif spec.logits == "topk":
        k = min(spec.top_k, vocab_size)
        layout.append(("topk_logprobs", (batch, length, k), torch.float32))
        layout.append(("topk_indices", (batch, length, k), torch.int32))
    if spec.hidden_layers:
        layout.append(("hidden_states", (len(spec.hidden_layers), batch, length, hidden_size),
                       spec.hidden_dtype))
    return layout


def check_batch(input_ids: torch.Tensor, lengths: torch.Tensor, vocab_size: int,
                max_tokens: int, num_layers: int, spec: RequestSpec,
                position_ids: torch.Tensor | None = None) -> None:
    """Refuse, before anything is sent, a batch the teacher could not serve correctly."""
    if input_ids.dim() != 2:
        raise RequestError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise RequestError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise RequestError(f"empty batch of shape {tuple(input_ids.shape)}")
    if lengths.shape != (batch,):
        raise RequestError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > length:
        raise RequestError(f"row lengths must be within 1..{length}, got "
                           f"{int(lengths.min())}..{int(lengths.max())}")
    if position_ids is not None:
        if tuple(position_ids.shape) != (batch, length):
            raise RequestError(f"position_ids must have the shape of input_ids {(batch, length)}, "
                               f"got {tuple(position_ids.shape)}")
        if position_ids.dtype not in (torch.int64, torch.int32) or int(position_ids.min()) < 0:
            raise RequestError("position_ids must be non-negative integers (restarting at 0 for "
                               "each packed document)")
    if batch * length > max_tokens:
        raise RequestError(f"request of {batch}×{length} = {batch * length} tokens exceeds the "
                           f"teacher's limit of {max_tokens} tokens per request: lower "
                           "micro_batch_size or max_len, or raise teacher.max_tokens_per_request")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise RequestError(f"token ids span {lo}..{hi} but the teacher's vocabulary has "
                           f"{vocab_size} entries: the data was tokenised with another "
                           "tokenizer; re-run the data preparation with the teacher's tokenizer")
    for layer in spec.hidden_layers:
        if not 0 <= layer <= num_layers:
            raise RequestError(f"hidden state {layer} requested; the teacher has states "
                               f"0..{num_layers} ({num_layers} layers)")
