"""What distillation asks of the student beyond a causal LM: the converted layers, the
teacher-forced per-layer pass of the align stage, the parameter groups each stage trains, and
the WKV path switch. A mixin of ``RWKVHybridForCausalLM`` (``self.model`` is its
``RWKVHybridModel``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from shared.student.configuration import RWKVHybridConfig
from shared.student.layers import RWKV6TimeMix, RWKV7TimeMix
from shared.student.ops import KERNELS
from shared.student.packing import HostPositions


class DistillationHelpers:
    config: RWKVHybridConfig
    model: torch.nn.Module

    @property
    def converted_layers(self) -> list[int]:
        """Sorted indices of the RWKV (converted) decoder layers."""
        return list(self.config.rwkv_layers)

    def align_forward(self, layer_inputs: Mapping[int, torch.Tensor],
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      host_positions: HostPositions | None = None) -> dict[int, torch.Tensor]:
        """Teacher-forced per-layer pass: each converted layer ``i`` present in ``layer_inputs``
        runs alone on ``layer_inputs[i]`` (the teacher's state entering layer ``i``); returns
        ``{i: output}`` to compare with the teacher's hidden state ``i + 1``.

        Keys that are not converted layers are ignored. With ``rwkv7`` the layers' value residual
        needs ``v_first``; it comes from running the first converted layer on its own teacher input,
        so ``layer_inputs`` must contain the first converted layer (gradients flow through it, as in
        the full model). ``position_ids`` that restart inside a row mark packed documents, each run
        from a zero state (see ``shared.student.packing``); ``host_positions``, the batch's
        host copies of ``position_ids`` and ``attention_mask``, find them without a device sync.
        """
        num_layers = self.config.num_hidden_layers
        bad = [i for i in layer_inputs if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"layer_inputs has layer indices {bad} outside 0..{num_layers - 1}")
        todo = [i for i in self.converted_layers if i in layer_inputs]
        if not todo:
            raise ValueError("layer_inputs has none of the converted layers "
                             f"{self.converted_layers}")
        first = self.converted_layers[0]
        if self.config.rwkv_mixer == "rwkv7" and first not in layer_inputs:
            raise ValueError(f"rwkv7 needs the input of the first converted layer ({first}) "
                             "for v_first")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a 2D [batch, seq] padding mask")
        dtype = self.model.embed_tokens.weight.dtype
        outputs: dict[int, torch.Tensor] = {}
        v_first = None
        documents = self.model.packed_documents(position_ids, attention_mask,
                                                layer_inputs[todo[0]], host_positions)
        for idx in todo:
            hidden = layer_inputs[idx]
            if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
                raise ValueError(f"layer_inputs[{idx}] must be [batch, seq, "
                                 f"{self.config.hidden_size}], got {tuple(hidden.shape)}")
            layer = self.model.layers[idx]
            hidden = hidden.to(dtype)
            mask = None if attention_mask is None else attention_mask[:, -hidden.shape[1]:]
            out, vf = self.model.run_rwkv_layer(layer, hidden, v_first, mask, None, False,
                                                documents, self._align_rope(hidden, position_ids))
            if idx == first:
                v_first = vf
            outputs[idx] = out
        return outputs

    def _align_rope(self, hidden: torch.Tensor, position_ids: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.rwkv7_variant != "rad":
            return None
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return self.model.rotary_emb(hidden, position_ids=position_ids)

    def mixer_parameter_names(self) -> list[str]:
        """Parameters that train in the align stage: the converted layers' RWKV time-mix, plus the
        RWKV channel-mix when it replaced the MLP (``rwkv_ffn='rwkv_cmix'``)."""
        names = []
        for idx in self.converted_layers:
            layer = self.model.layers[idx]
            parts = {layer.names[1]}
            if self.config.rwkv_ffn == "rwkv_cmix":
                parts.add(layer.names[3])
            names += [f"model.layers.{idx}.{n}" for n, _ in layer.named_parameters()
                      if n.split(".")[0] in parts]
        return names

    def converted_layer_parameter_names(self) -> list[str]:
        """Every parameter inside the converted layers (norms and a kept MLP included)."""
        return [f"model.layers.{i}.{n}" for i in self.converted_layers
                for n, _ in self.model.layers[i].named_parameters()]

    def set_rwkv_kernel(self, kernel: str, chunk_size: int | None = None) -> None:
        """Switch the WKV path of every RWKV layer (``student.kernel``: ``auto``, ``fla``,
        ``chunk``; ``recurrent`` too)."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown RWKV kernel {kernel!r}; choose one of {KERNELS}")
        self.config.rwkv_kernel = kernel
        if chunk_size is not None:
            self.config.rwkv_chunk_size = chunk_size
        for module in self.modules():
            if isinstance(module, (RWKV6TimeMix, RWKV7TimeMix)):
                module.kernel = kernel
                module.chunk_size = self.config.rwkv_chunk_size
