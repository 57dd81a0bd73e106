"""The teacher's side of a forward: load the model, pack a group's requests, answer each.

Used by the teacher service and by the in-process teacher alike, so both return exactly the
same tensors. Rows of all requests are packed into one batch (right padding + attention mask:
padding never relies on a token value), sorted by length and cut into chunks of at most
``max_batch_tokens`` so a large group batch cannot exhaust memory. Hidden states are taken
with hooks at the decoder layers' boundaries (the project's convention, see protocol.py),
and the forward stops early when a chunk needs no logits and no deeper state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from shared.compiling import compile_decoder_layers
from shared.config import TeacherConfig
from shared.fingerprint import tokenizer_fingerprint
from shared.link.protocol import RequestSpec, response_layout

log = logging.getLogger(__name__)

LOGITS_SLICE_TOKENS = 2048  # log-softmax/top-k in fp32 over this many tokens at a time


class _StopForward(Exception):
    """Raised from a hook once every wanted hidden state of a chunk is captured."""


class TeacherRequest(NamedTuple):
    """One trainer's request as the teacher model answers it."""

    spec: RequestSpec
    input_ids: torch.Tensor            # [B, T]
    lengths: torch.Tensor | list[int]  # [B] real tokens per row (right padding), on the CPU
    position_ids: torch.Tensor | None  # [B, T] for packed rows, else None


class Row(NamedTuple):
    """Row ``row`` of request ``request``, with ``length`` real tokens."""

    request: int
    row: int
    length: int


LAST = -1  # key of the last layer's output (before the final norm) in ``_run``'s states


@dataclass
class Fingerprint:
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str
    tokenizer: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(device: str, device_id: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("teacher.device=cuda but no CUDA device is visible; use "
                           "--teacher.device cpu or check CUDA_VISIBLE_DEVICES")
    if device_id >= torch.cuda.device_count():
        raise RuntimeError(f"--device-id {device_id} but only {torch.cuda.device_count()} GPUs "
                           "are visible; every process must see all GPUs of the node")
    return torch.device("cuda", device_id)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class TeacherModel:
    """A loaded causal LM that answers link requests."""

    def __init__(self, model: torch.nn.Module, tokenizer_dir: str | Path,
                 max_batch_tokens: int = 16384) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        cfg = model.config
        self.layers = model.get_decoder().layers
        self.fingerprint = Fingerprint(
            vocab_size=model.get_output_embeddings().weight.shape[0],
            hidden_size=cfg.hidden_size,
            num_layers=len(self.layers),
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            tokenizer=tokenizer_fingerprint(tokenizer_dir),
        )

    @classmethod
    def load(cls, cfg: TeacherConfig) -> TeacherModel:
        from transformers import AutoModelForCausalLM

        path = Path(cfg.model_path)
        if not cfg.model_path or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher.model_path={cfg.model_path!r} is not a Hugging Face model directory "
                "(no config.json): point it at a local checkpoint, e.g. one made with "
                "`python -m shared.tiny --output DIR`")
        device = resolve_device(cfg.device, cfg.device_id)
        dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code).to(device)
        log.info("teacher %s loaded on %s as %s", path, device, dtype)
        if compiled := compile_decoder_layers(model.get_decoder().layers, cfg.compile, device):
            log.info("teacher: %d decoder layers compiled (teacher.compile %s)", compiled,
                     cfg.compile)
        return cls(model, path, cfg.max_batch_tokens)

    @torch.inference_mode()
    def forward(self, requests: list[TeacherRequest]) -> list[dict[str, torch.Tensor]]:
        """Answer several requests with one batched forward.

        ``lengths`` must be on the CPU (row lengths steer the packing). Position ids that restart
        inside a row mark packed documents; each attends only to itself (transformers builds the
        block-diagonal causal mask from the position ids). On CUDA the work is only enqueued:
        nothing here waits for the GPU, so the caller can serve its peers meanwhile."""
        fp = self.fingerprint
        def to_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device)
        on_device = [TeacherRequest(q.spec, to_device(q.input_ids),
                                    [int(n) for n in q.lengths.tolist()], to_device(q.position_ids))
                     for q in requests]
        outputs: list[dict[str, torch.Tensor]] = []
        rows: list[Row] = []
        for index, q in enumerate(on_device):
            b, t = q.input_ids.shape
            outputs.append({name: torch.empty(shape, dtype=dtype, device=self.device)
                            for name, shape, dtype in
                            response_layout(q.spec, b, t, fp.vocab_size, fp.hidden_size)})
            rows += [Row(index, i, q.lengths[i]) for i in range(b)]
        # Longest rows first: each chunk is padded only to its own longest row.
        rows.sort(key=lambda row: -row.length)
        start = 0
        while start < len(rows):
            chunk_len = rows[start].length
            n = max(1, min(len(rows) - start, self.max_batch_tokens // chunk_len))
            self._forward_chunk(on_device, outputs, rows[start:start + n], chunk_len)
            start += n
        for q, out in zip(on_device, outputs, strict=True):
            # Positions past a row's length carry no information: send zeros, not stale memory.
            for i, length in enumerate(q.lengths):
                if length < q.input_ids.shape[1]:
                    for name, tensor in out.items():
                        if name == "hidden_states":
                            tensor[:, i, length:] = 0
                        else:
                            tensor[i, length:] = 0
        return outputs

    def _forward_chunk(self, requests: list[TeacherRequest], outputs: list[dict[str, torch.Tensor]],
                       rows: list[Row], chunk_len: int) -> None:
        device = self.device
        n = len(rows)
        ids = torch.zeros(n, chunk_len, dtype=torch.long, device=device)
        mask = torch.zeros(n, chunk_len, dtype=torch.long, device=device)
        positions = torch.arange(chunk_len, device=device).repeat(n, 1)
        packed = False
        for j, row in enumerate(rows):
            q, length = requests[row.request], row.length
            ids[j, :length] = q.input_ids[row.row, :length]
            mask[j, :length] = 1
            if q.position_ids is not None:
                packed = True
                pos = q.position_ids[row.row, :length]
                positions[j, :length] = pos
                # padding continues the last document (never a new one): causal, so unseen
                tail = torch.arange(chunk_len - length, device=device)
                positions[j, length:] = pos[-1] + 1 + tail
        specs = [requests[row.request].spec for row in rows]
        wanted = sorted({layer for s in specs for layer in s.hidden_layers})
        need_logits = any(s.logits != "none" for s in specs)
        # Packed rows: no 2D mask, so transformers derives the per-document mask from positions.
        states = self._run(ids, None if packed else mask, positions if packed else None, wanted,
                           need_logits)
        final = self.model.get_decoder().norm(states[LAST]) if need_logits else None
        head = self.model.get_output_embeddings()
        for j, row in enumerate(rows):
            spec, out = requests[row.request].spec, outputs[row.request]
            i, length = row.row, row.length
            for slot, layer in enumerate(spec.hidden_layers):
                out["hidden_states"][slot, i, :length] = states[layer][j, :length]
            if spec.logits == "none":
                continue
            for s in range(0, length, LOGITS_SLICE_TOKENS):
                e = min(length, s + LOGITS_SLICE_TOKENS)
                logits = head(final[j, s:e])
                if spec.logits in ("bf16", "fp32"):
                    out["logits"][i, s:e] = logits
                else:
                    logprobs = torch.log_softmax(logits.float() / spec.temperature, dim=-1)
                    k = out["topk_logprobs"].shape[-1]
                    values, indices = logprobs.topk(k, dim=-1)
                    out["topk_logprobs"][i, s:e] = values
                    out["topk_indices"][i, s:e] = indices.to(torch.int32)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
             wanted: list[int], need_logits: bool) -> dict[int, torch.Tensor]:
        """Run the decoder, capturing states ``wanted`` (and ``LAST`` when logits are needed)."""
        states: dict[int, torch.Tensor] = {}
        num_layers = len(self.layers)
        deepest = num_layers if need_logits else (max(wanted) if wanted else 0)
        hooks = []

        def take_input(index: int):
            def hook(module, args, kwargs):
                states[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                if index == deepest:
                    raise _StopForward
            return hook

        def take_last(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            states[num_layers] = out
            states[LAST] = out

        for index in wanted:
            if index < num_layers:
                hooks.append(self.layers[index].register_forward_pre_hook(
                    take_input(index), with_kwargs=True))
        if deepest < num_layers and deepest not in wanted:
            hooks.append(self.layers[deepest].register_forward_pre_hook(
                take_input(deepest), with_kwargs=True))
        hooks.append(self.layers[-1].register_forward_hook(take_last))
        try:
            self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        return states
