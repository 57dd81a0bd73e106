"""The hybrid student: a Llama-family decoder stack where chosen layers are RWKV layers.

Non-converted layers are the teacher architecture's own decoder layers (``LlamaDecoderLayer``,
``Qwen2DecoderLayer``...), built from the flat ``RWKVHybridConfig``; parameter names match the
teacher's (``model.layers.{i}.self_attn.q_proj.weight``...). Converted layers are
``RWKVDecoderLayer``s:

* ``block`` mode: ``ln1`` -> ``att`` (RWKV time-mix) -> ``ln2`` -> ``ffn`` (the teacher's MLP or an
  RWKV channel-mix), pre-norm residual; ``ln1``/``ln2`` start as copies of the teacher's norms;
* ``attention_only`` mode: the teacher's names and pieces, with ``self_attn`` = RWKV time-mix.

Hidden states (``output_hidden_states=True``): ``L + 1`` tensors; index ``i < L`` is the input of
decoder layer ``i`` (0 = embeddings) and index ``L`` is the last layer's output *before* the
final norm (transformers' own models put the normed output there instead).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from shared.student.base_model import base_classes
from shared.student.cache import HybridRWKVCache
from shared.student.configuration import RWKVHybridConfig
from shared.student.distillation import DistillationHelpers
from shared.student.layers import (
    RWKV_MODULES,
    RWKV6ChannelMix,
    RWKV6TimeMix,
    RWKV7ChannelMix,
    RWKV7TimeMix,
)
from shared.student.ops import resolve_kernel
from shared.student.packing import (
    DocumentBatch,
    HostPositions,
    PackedSegments,
    packed_documents,
)

_NOT_FOR_BASE_LAYERS = ("return_dict", "output_attentions", "output_hidden_states")


class RWKVDecoderLayer(GradientCheckpointingLayer):
    """A converted decoder layer; submodule names depend on the mode (see the module docstring)."""

    NAMES = {"block": ("ln1", "att", "ln2", "ffn"),
             "attention_only": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")}

    def __init__(self, config: RWKVHybridConfig, layer_idx: int,
                 classes: Mapping[str, type[nn.Module]]) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.names = self.NAMES[config.rwkv_mode]
        c, num_layers = config.hidden_size, config.num_hidden_layers
        mixer_kwargs: dict[str, Any] = dict(
            hidden_size=c, num_heads=config.num_attention_heads, head_size=config.rwkv_head_size,
            layer_idx=layer_idx, num_layers=num_layers, qkv_bias=config.rwkv_qkv_bias,
            o_bias=config.rwkv_o_bias, kernel=config.rwkv_kernel,
            chunk_size=config.rwkv_chunk_size)
        if config.rwkv_mixer == "rwkv7":
            is_first = layer_idx == min(config.rwkv_layers)
            mixer: nn.Module = RWKV7TimeMix(is_first=is_first, variant=config.rwkv7_variant,
                                            **mixer_kwargs)
        else:
            mixer = RWKV6TimeMix(**mixer_kwargs)
        if config.rwkv_ffn == "mlp":
            ffn = classes["mlp"](config)
        else:
            cmix = RWKV7ChannelMix if config.rwkv_mixer == "rwkv7" else RWKV6ChannelMix
            ffn = cmix(c, config.intermediate_size, layer_idx, num_layers,
                       bias=config.rwkv_mlp_bias)
        norms = [classes["norm"](c, eps=config.rms_norm_eps) for _ in range(2)]
        for name, module in zip(self.names, (norms[0], mixer, norms[1], ffn), strict=True):
            self.add_module(name, module)

    def rope_kwargs(self, rope: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        """The rotary embeddings for a mixer that takes them (RAD-RWKV7)."""
        return {"rope": rope} if getattr(self.mixer, "variant", None) == "rad" else {}

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.names[1])

    @property
    def ffn_module(self) -> nn.Module:
        return getattr(self, self.names[3])

    def forward(self, hidden_states: torch.Tensor, v_first: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False, segments: PackedSegments | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        norm1, mixer, norm2, ffn = (getattr(self, name) for name in self.names)
        state = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        keep = None if token_mask is None else token_mask.unsqueeze(-1).to(hidden_states.dtype)
        x = norm1(hidden_states)
        if keep is not None:  # zero the mixer input at padding so left padding leaves no trace
            x = x * keep
        out, att_shift, wkv, v_first = mixer(x, getattr(state, "att_shift", None),
                                             getattr(state, "wkv", None), token_mask, v_first,
                                             segments, **self.rope_kwargs(position_embeddings))
        hidden_states = hidden_states + out
        x = norm2(hidden_states)
        ffn_shift = None
        if isinstance(ffn, (RWKV6ChannelMix, RWKV7ChannelMix)):
            if keep is not None:
                x = x * keep
            out, ffn_shift = ffn(x, getattr(state, "ffn_shift", None), segments)
        else:
            out = ffn(x)
        if state is not None:
            state.update_state(att_shift, wkv, ffn_shift, hidden_states.shape[1])
        return hidden_states + out, v_first


class RWKVHybridPreTrainedModel(PreTrainedModel):
    config: RWKVHybridConfig
    config_class = RWKVHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKVDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True  # RNN state: no assisted decoding / cache cropping

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RWKV_MODULES):
            module.reset_parameters()  # the RWKV-LM initialisation for this layer index
        else:
            super()._init_weights(module)


class RWKVHybridModel(RWKVHybridPreTrainedModel):
    """Embeddings, decoder layers (teacher layers and RWKV layers), final norm."""

    packed_layout = "auto"
    """How RWKV layers run packed rows: ``per_document``, ``segments``
    (``shared.student.packing``) or ``auto``; the same numbers either way."""

    def __init__(self, config: RWKVHybridConfig) -> None:
        super().__init__(config)
        classes = base_classes(config.base_model_type)
        converted = set(config.rwkv_layers)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList([RWKVDecoderLayer(config, i, classes) if i in converted
                                     else classes["decoder"](config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = classes["norm"](config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = classes["rotary"](config=config)
        self.layer_types = get_layer_types_and_kwargs(config)[0]
        self.gradient_checkpointing = False
        self._no_split_modules = ["RWKVDecoderLayer", classes["decoder"].__name__]
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def run_rwkv_layer(self, layer: RWKVDecoderLayer, hidden: torch.Tensor,
                       v_first: torch.Tensor | None, token_mask: torch.Tensor | None,
                       cache: Cache | None, use_cache: bool,
                       documents: DocumentBatch | PackedSegments | None = None,
                       rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one converted layer, recomputing it in backward if the config asks for it; packed
        rows (``documents``) run every document from a zero RNN state; ``rope``: the rotary
        embeddings of the positions (RAD-RWKV7 only)."""
        if isinstance(documents, DocumentBatch):
            return self.run_rwkv_layer_per_document(layer, hidden, v_first, documents, rope)
        if (self.config.rwkv_gradient_checkpointing and self.training and torch.is_grad_enabled()
                and not layer.gradient_checkpointing):
            # non-reentrant: works with DeepSpeed ZeRO-3's parameter hooks; no cache writes on
            # replay
            return checkpoint(layer, hidden, v_first, token_mask, None, False, documents, rope,
                              use_reentrant=False)
        return layer(hidden, v_first, token_mask=token_mask, past_key_values=cache,
                     use_cache=use_cache, segments=documents, position_embeddings=rope)

    def packed_documents(self, position_ids: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, hidden: torch.Tensor,
                         host: HostPositions | None = None,
                         ) -> DocumentBatch | PackedSegments | None:
        """The batch's packed documents in the layout ``packed_layout`` names, or None.

        ``auto``: ``segments`` where the WKV runs on fla, whose varlen kernels take the packed
        rows in one pass (7x ``per_document`` for the all-RWKV-7 SmolLM2 student on an H200,
        BENCHMARKS.md 2026-12-02); ``per_document`` on the other paths, where it batches
        documents of like length and ``segments`` would loop over them one by one."""
        layout = self.packed_layout
        if layout == "auto":
            layout = "segments" if self._wkv_path(hidden) == "fla" else "per_document"
        return packed_documents(position_ids, attention_mask, hidden.shape[0], layout, host)

    def _wkv_path(self, hidden: torch.Tensor) -> str:
        """The WKV path the RWKV layers take for this batch: what ``student.kernel`` resolves to
        for their inputs' device and dtype (the model's, or autocast's where it is on)."""
        probe = hidden[:1, :2].to(self.embed_tokens.weight.dtype)
        if torch.is_autocast_enabled(hidden.device.type):
            probe = probe.to(torch.get_autocast_dtype(hidden.device.type))
        return resolve_kernel(self.config.rwkv_kernel, probe)

    def run_rwkv_layer_per_document(self, layer: RWKVDecoderLayer, hidden: torch.Tensor,
                                    v_first: torch.Tensor | None, documents: DocumentBatch,
                                    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one converted layer on packed rows re-laid out as batches of whole documents."""
        outs, firsts = [], []
        ropes = (zip(*(documents.split(z.expand(hidden.shape[0], -1, -1)) for z in rope),
                     strict=True) if rope is not None else [None] * len(documents.shapes))
        for h, vf, r in zip(documents.split(hidden), documents.split(v_first), ropes,
                            strict=True):
            out, vf = self.run_rwkv_layer(layer, h, vf, None, None, False, None, r)
            outs.append(out)
            firsts.append(vf)
        return documents.merge(outs), None if firsts[0] is None else documents.merge(firsts)

    def _checked_cache(self, cache: Cache | None, use_cache: bool) -> Cache | None:
        if cache is None:
            return HybridRWKVCache(self.config) if use_cache else None
        if isinstance(cache, HybridRWKVCache):
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return HybridRWKVCache(self.config)  # e.g. an empty DynamicCache: swap in ours
        raise ValueError("the RWKV student needs a shared.student.cache.HybridRWKVCache, got "
                         f"{type(cache).__name__}")

    def _attention_masks(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                         cache: Cache | None, position_ids: torch.Tensor) -> dict[str, Any]:
        masks: dict[str, Any] = {}
        for idx, layer in enumerate(self.layers):
            kind = self.layer_types[idx]
            if isinstance(layer, RWKVDecoderLayer) or kind in masks:
                continue
            make = (create_sliding_window_causal_mask if kind == "sliding_attention"
                    else create_causal_mask)
            masks[kind] = make(config=self.config, inputs_embeds=embeds,
                               attention_mask=attention_mask, past_key_values=cache,
                               position_ids=position_ids, layer_idx=idx)
        return masks

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the RWKV student takes a 2D [batch, seq] padding mask "
                             "(1 = token, 0 = padding)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:  # like transformers, but no cache by default while training
            use_cache = self.config.use_cache and not self.training
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        cache = self._checked_cache(past_key_values, use_cache)
        seq_len = inputs_embeds.shape[1]
        # Packed documents only come with the caller's position_ids; detecting them costs a
        # device sync, so derived positions skip it, and so does a caller that passes the
        # batch's host copies (host_positions: shared.student.packing.packed_documents).
        host = kwargs.pop("host_positions", None)
        documents = self.packed_documents(position_ids, attention_mask, inputs_embeds, host)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + seq_len,
                                        device=inputs_embeds.device).unsqueeze(0)
        if documents is not None and cache is not None:
            raise ValueError("position_ids restart inside a row (packed documents), which a cache "
                             "cannot hold: run packed batches with use_cache=False")
        token_mask = None if attention_mask is None else attention_mask[:, -seq_len:]
        # Packed rows: without a 2D mask transformers builds the block-diagonal causal mask from
        # position_ids; the right padding then only ever follows the real tokens (causal).
        masks = self._attention_masks(inputs_embeds,
                                      None if documents is not None else attention_mask, cache,
                                      position_ids)
        rad = self.config.rwkv7_variant == "rad"  # its RWKV layers take RoPE too
        rope = (self.rotary_emb(inputs_embeds, position_ids=position_ids) if masks or rad
                else None)
        base_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_BASE_LAYERS}

        hidden, v_first, states = inputs_embeds, None, []
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                states.append(hidden)
            if isinstance(layer, RWKVDecoderLayer):
                hidden, v_first = self.run_rwkv_layer(layer, hidden, v_first, token_mask, cache,
                                                      use_cache, documents, rope)
            else:
                hidden = layer(hidden, attention_mask=masks[self.layer_types[idx]],
                               position_embeddings=rope, position_ids=position_ids,
                               past_key_values=cache, use_cache=use_cache, **base_kwargs)
        if output_hidden_states:
            states.append(hidden)  # before the final norm (see the module docstring)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden), past_key_values=cache,
            hidden_states=tuple(states) if output_hidden_states else None)


class RWKVHybridForCausalLM(DistillationHelpers, RWKVHybridPreTrainedModel, GenerationMixin):
    """Causal LM head on ``RWKVHybridModel``; the class the trainer and ``generate()`` use."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RWKVHybridConfig) -> None:
        super().__init__(config)
        self.model = RWKVHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels")
                     if k in kwargs}
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **extra)
        result = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states)
        return result.to_tuple() if return_dict is False else result
