"""Generation cache for the hybrid student: a KV cache for attention layers, an RNN state for RWKV
layers.

Built on transformers v5's layer-based ``Cache``: attention layers get the stock ``DynamicLayer``
(or ``DynamicSlidingWindowLayer`` where the base config says so), RWKV layers get
``RWKVStateLayer``, whose size does not grow with the context:

* ``att_shift`` ``[B, C]``: the last token's time-mix input (token shift);
* ``wkv`` ``[B, H, K, V]`` float32: the WKV state;
* ``ffn_shift`` ``[B, C]``: the last token's channel-mix input (only with an RWKV channel-mix FFN).

``RWKVStateLayer`` counts the tokens it has seen, so ``get_seq_length()`` (which generate and the
mask helpers call) also works for a student whose layers are all RWKV.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

_STATE_FIELDS = ("att_shift", "wkv", "ffn_shift")


class RWKVStateLayer(CacheLayerMixin):
    """Recurrent state of one RWKV layer: O(1) memory per generated token."""

    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back (no assisted decoding)
    supports_early_init = False
    is_sliding = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.att_shift: torch.Tensor | None = None
        self.wkv: torch.Tensor | None = None
        self.ffn_shift: torch.Tensor | None = None
        self.num_tokens = 0
        self.device: torch.device | None = None

    def __repr__(self) -> str:
        return f"RWKVStateLayer(tokens={self.num_tokens})"

    def lazy_initialization(self, *args: object, **kwargs: object) -> None:
        """Nothing to pre-allocate: the state tensors are set by ``update_state``."""

    def update(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("RWKV layers keep a recurrent state, not keys/values; use "
                                  "update_state()")

    def update_state(self, att_shift: torch.Tensor, wkv: torch.Tensor,
                     ffn_shift: torch.Tensor | None, num_tokens: int) -> None:
        """Store the state after a forward over ``num_tokens`` more tokens."""
        self.att_shift, self.wkv, self.ffn_shift = att_shift, wkv, ffn_shift
        self.num_tokens += num_tokens
        self.device = wkv.device
        self.is_initialized = True

    def _tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name in _STATE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def _map(self, fn) -> None:  # noqa: ANN001 - internal helper
        for name, value in list(self._tensors()):
            setattr(self, name, fn(value))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._tensors())

    def reset(self) -> None:
        self.att_shift = self.wkv = self.ffn_shift = None
        self.num_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("an RWKV state cannot be cropped (it is not a per-token "
                                      "cache)")

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class HybridRWKVCache(Cache):
    """One cache layer per decoder layer: ``RWKVStateLayer`` for converted layers, KV layers
    otherwise."""

    def __init__(self, config: PreTrainedConfig) -> None:
        from transformers.cache_utils import get_layer_types_and_kwargs

        rwkv = set(getattr(config, "rwkv_layers", None) or [])
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers: list[CacheLayerMixin] = []
        for idx, kind in enumerate(layer_types[: config.num_hidden_layers]):
            if idx in rwkv:
                layers.append(RWKVStateLayer())
            elif kind in ("sliding_attention", "chunked_attention"):
                window = layer_kwargs["sliding_window"]
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    def rwkv_state_nbytes(self) -> int:
        """Bytes held by the RWKV states (constant in the context length)."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, RWKVStateLayer))

    def kv_nbytes(self) -> int:
        """Bytes held by the attention layers' keys and values (grows with the context)."""
        total = 0
        for layer in self.layers:
            if not isinstance(layer, RWKVStateLayer) and getattr(layer, "is_initialized", False):
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
                             if t is not None)
        return total

    def nbytes(self) -> int:
        return self.rwkv_state_nbytes() + self.kv_nbytes()
