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

import torch

from shared.config import TeacherConfig
from shared.fingerprint import tokenizer_fingerprint
from shared.link.protocol import RequestSpec, response_layout

log = logging.getLogger(__name__)

LOGITS_SLICE_TOKENS = 2048  # log-softmax/top-k in fp32 over this many tokens at a time


class _StopForward(Exception):
    """Raised from a hook once every wanted hidden state of a chunk is captured."""


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
    def load(cls, cfg: TeacherConfig) -> "TeacherModel":
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
        return cls(model, path, cfg.max_batch_tokens)

    @torch.inference_mode()
    def forward(self, batches: list[tuple[RequestSpec, torch.Tensor, torch.Tensor, torch.Tensor | None]]
                ) -> list[dict[str, torch.Tensor]]:
        """Answer several requests with one batched forward:
        ``[(spec, ids[B,T], lengths[B], position_ids[B,T] or None)]``.

        Position ids that restart inside a row mark packed documents; each attends only to
        itself (transformers builds the block-diagonal causal mask from the position ids)."""
        fp = self.fingerprint
        outputs: list[dict[str, torch.Tensor]] = []
        rows: list[tuple[int, int, int]] = []  # (request, row, length)
        for r, (spec, ids, lengths, _) in enumerate(batches):
            b, t = ids.shape
            outputs.append({name: torch.empty(shape, dtype=dtype, device=self.device)
                            for name, shape, dtype in
                            response_layout(spec, b, t, fp.vocab_size, fp.hidden_size)})
            rows += [(r, i, int(lengths[i])) for i in range(b)]
        # Longest rows first: each chunk is padded only to its own longest row.
        rows.sort(key=lambda x: -x[2])
        start = 0
        while start < len(rows):
            chunk_len = rows[start][2]
            n = max(1, min(len(rows) - start, self.max_batch_tokens // chunk_len))
            self._forward_chunk(batches, outputs, rows[start:start + n], chunk_len)
            start += n
        for (spec, ids, lengths, _), out in zip(batches, outputs):
            # Positions past a row's length carry no information: send zeros, not stale memory.
            t = ids.shape[1]
            pad = torch.arange(t, device=self.device)[None, :] >= lengths.to(self.device)[:, None]
            if pad.any():
                for name, tensor in out.items():
                    if name == "hidden_states":
                        tensor.masked_fill_(pad[None, :, :, None], 0)
                    else:
                        tensor.masked_fill_(pad[:, :, None], 0)
        return outputs

    def _forward_chunk(self, batches, outputs, rows, chunk_len: int) -> None:
        device = self.device
        n = len(rows)
        ids = torch.zeros(n, chunk_len, dtype=torch.long, device=device)
        mask = torch.zeros(n, chunk_len, dtype=torch.long, device=device)
        positions = torch.arange(chunk_len, device=device).repeat(n, 1)
        packed = False
        for j, (r, i, length) in enumerate(rows):
            ids[j, :length] = batches[r][1][i, :length].to(device)
            mask[j, :length] = 1
            if batches[r][3] is not None:
                packed = True
                pos = batches[r][3][i, :length].to(device)
                positions[j, :length] = pos
                # padding continues the last document (never a new one): causal, so unseen
                positions[j, length:] = pos[-1] + 1 + torch.arange(chunk_len - length, device=device)
        specs = [batches[r][0] for r, _, _ in rows]
        wanted = sorted({layer for s in specs for layer in s.hidden_layers})
        need_logits = any(s.logits != "none" for s in specs)
        # Packed rows: no 2D mask, so transformers derives the per-document mask from positions.
        states = self._run(ids, None if packed else mask, positions if packed else None, wanted,
                           need_logits)
        if need_logits:
            final = self.model.get_decoder().norm(states.pop("last"))
        for j, (r, i, length) in enumerate(rows):
            spec, out = batches[r][0], outputs[r]
            for slot, layer in enumerate(spec.hidden_layers):
                out["hidden_states"][slot, i, :length] = states[layer][j, :length]
            if spec.logits == "none":
                continue
            for s in range(0, length, LOGITS_SLICE_TOKENS):
                e = min(length, s + LOGITS_SLICE_TOKENS)
                logits = self.model.get_output_embeddings()(final[j, s:e])
                if spec.logits in ("bf16", "fp32"):
                    out["logits"][i, s:e] = logits
                else:
                    logprobs = torch.log_softmax(logits.float() / spec.temperature, dim=-1)
                    k = out["topk_logprobs"].shape[-1]
                    values, indices = logprobs.topk(k, dim=-1)
                    out["topk_logprobs"][i, s:e] = values
                    out["topk_indices"][i, s:e] = indices.to(torch.int32)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
             wanted: list[int], need_logits: bool) -> dict:
        """Run the decoder, capturing states ``wanted`` (and 'last' when logits are needed)."""
        states: dict = {}
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
            states["last"] = out

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
