"""Hugging Face config of the hybrid RWKV student.

The config is *flat*: it carries every field of the base (teacher) config — so the kept Llama /
Qwen / Mistral layers are built from it unchanged — plus the hybrid settings below. ``model_type``
is ``rwkv_hybrid``; ``base_model_type`` remembers which transformers architecture the kept layers
come from.
"""
from __future__ import annotations

from typing import Any, get_args, get_type_hints

from transformers import PreTrainedConfig

from shared.config import StudentConfig

# The student's options are defined once, in the config schema (shared.config.StudentConfig):
# the allowed values and the defaults here are read from it.
_OPTIONS = StudentConfig()
_OPTION_TYPES = get_type_hints(StudentConfig)
MIXERS: tuple[str, ...] = get_args(_OPTION_TYPES["mixer"])
MODES: tuple[str, ...] = get_args(_OPTION_TYPES["mode"])
FFNS: tuple[str, ...] = get_args(_OPTION_TYPES["ffn"])
RWKV7_VARIANTS: tuple[str, ...] = get_args(_OPTION_TYPES["rwkv7_variant"])
# PreTrainedConfig bookkeeping that must not be copied from the teacher's config
_NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


class RWKVHybridConfig(PreTrainedConfig):
    r"""Hybrid settings (all base-model fields are accepted as extra keyword arguments).

    ``rwkv_layers``, ``rwkv_mixer``, ``rwkv_mode``, ``rwkv_ffn``, ``rwkv_gradient_checkpointing``
    and ``rwkv_kernel`` are the saved form of ``shared.config.StudentConfig``'s ``layers``,
    ``mixer``, ``mode``, ``ffn``, ``grad_checkpointing`` and ``kernel`` (documented there).

    Args:
        base_model_type: ``model_type`` of the teacher (``llama``, ``qwen2``, ``qwen3``,
            ``mistral``).
        rwkv_layers: indices of the decoder layers replaced by RWKV (sorted, unique).
        rwkv_mixer: ``rwkv6`` (RWKV-LM x060 formulas) or ``rwkv7`` (x070 formulas).
        rwkv_mode: ``block`` (the whole layer is an RWKV block: ln1/att/ln2/ffn) or
            ``attention_only`` (only ``self_attn`` is replaced; norms and MLP stay).
        rwkv_ffn: block mode's FFN: ``mlp`` (the teacher's MLP, kept) or ``rwkv_cmix`` (an RWKV
            channel-mix initialised from ``mlp.up_proj``/``mlp.down_proj``).
        rwkv_head_size: RWKV head size (= the teacher's ``head_dim``); heads =
            ``num_attention_heads``.
        rwkv_gradient_checkpointing: recompute converted layers in backward (non-reentrant).
        rwkv_chunk_size: chunk length of the pure-PyTorch chunked path.
        rwkv_kernel: ``auto`` | ``fla`` | ``chunk`` | ``recurrent`` (see ``shared.student.ops``);
            a config saved with the former name ``rwkv_backend`` loads into it.
        rwkv7_variant: ``x070`` or ``rad`` (RAD-RWKV7; ``shared.config.StudentConfig``).
        rwkv_qkv_bias, rwkv_o_bias, rwkv_mlp_bias: whether the teacher's q/k/v, o and MLP
            projections have biases (then the RWKV receptance/key/value, output and channel-mix
            key/value get one too, copied from the teacher).
    """

    model_type = "rwkv_hybrid"

    base_model_type: str = "llama"
    rwkv_layers: list[int] | None = None
    rwkv_mixer: str = _OPTIONS.mixer
    rwkv_mode: str = _OPTIONS.mode
    rwkv_ffn: str = _OPTIONS.ffn
    rwkv_head_size: int | None = None
    rwkv_gradient_checkpointing: bool = _OPTIONS.grad_checkpointing
    rwkv_chunk_size: int = 16
    rwkv_kernel: str = _OPTIONS.kernel
    rwkv7_variant: str = _OPTIONS.rwkv7_variant
    rwkv_qkv_bias: bool = False
    rwkv_o_bias: bool = False
    rwkv_mlp_bias: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if "rwkv_backend" in kwargs:  # the field's former name, in configs saved before
            self.rwkv_kernel = kwargs.pop("rwkv_backend")
        super().__post_init__(**kwargs)
        self.rwkv_layers = sorted(set(int(i) for i in (self.rwkv_layers or [])))
        validate_hybrid_settings(self.rwkv_mixer, self.rwkv_mode, self.rwkv_ffn,
                                 self.rwkv_layers, getattr(self, "num_hidden_layers", None))
        if self.rwkv7_variant not in RWKV7_VARIANTS:
            raise ValueError(f"unknown rwkv7_variant {self.rwkv7_variant!r}: choose one of "
                             f"{RWKV7_VARIANTS}")
        if self.rwkv7_variant != "x070" and self.rwkv_mixer != "rwkv7":
            raise ValueError(f"rwkv7_variant {self.rwkv7_variant!r} is a variant of the rwkv7 "
                             f"mixer, but the mixer is {self.rwkv_mixer!r}: set mixer: rwkv7")
        if self.rwkv_head_size is None and getattr(self, "head_dim", None) is not None:
            self.rwkv_head_size = self.head_dim

    @classmethod
    def from_base_config(cls, base: PreTrainedConfig, options: StudentConfig | None = None,
                         **extra: Any) -> RWKVHybridConfig:
        """Flat hybrid config from a teacher config and the student's options."""
        options = options or StudentConfig()
        fields = {k: v for k, v in base.to_dict().items() if k not in _NOT_COPIED}
        layers = options.layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers must be a list of layer indices or 'all', got {layers!r}")
            layers = range(base.num_hidden_layers)
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
        fields.update(head_dim=head_dim, base_model_type=base.model_type, rwkv_layers=list(layers),
                      rwkv_mixer=options.mixer, rwkv_mode=options.mode, rwkv_ffn=options.ffn,
                      rwkv_head_size=head_dim,
                      rwkv_gradient_checkpointing=bool(options.grad_checkpointing),
                      rwkv_kernel=options.kernel, rwkv7_variant=options.rwkv7_variant, **extra)
        config = cls(**fields)
        config._attn_implementation = base._attn_implementation
        return config


def validate_hybrid_settings(mixer: str, mode: str, ffn: str, layers: list[int],
                             num_layers: int | None) -> None:
    """Raise ValueError naming the bad setting and the allowed values."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}: choose one of {MIXERS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {MODES}")
    if ffn not in FFNS:
        raise ValueError(f"unknown ffn {ffn!r}: choose one of {FFNS}")
    if mode == "attention_only" and ffn != "mlp":
        raise ValueError("ffn='rwkv_cmix' needs mode='block' (attention_only keeps the "
                         "teacher's MLP)")
    if num_layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layer index {bad} out of range: the teacher has {num_layers} "
                             f"decoder layers (valid indices 0..{num_layers - 1})")
