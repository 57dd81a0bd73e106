"""The teacher architecture the student's kept layers come from.

The student is built from the classes of the teacher's own transformers architecture (its
decoder layer, MLP, RMSNorm, rotary embedding), found by ``model_type``, so a Llama, Qwen or
Mistral teacher gives a student whose kept layers are exactly the teacher's.
"""
from __future__ import annotations

import importlib

from torch import nn
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

SUPPORTED_BASES = ("llama", "qwen2", "qwen3", "mistral")


def base_classes(model_type: str) -> dict[str, type[nn.Module]]:
    """The decoder layer, MLP, RMSNorm and rotary embedding classes of a transformers
    architecture."""
    model_name = MODEL_MAPPING_NAMES.get(model_type)
    hint = (f"base model type {model_type!r} is not supported: the student needs a Llama-family "
            "architecture (decoder layers with self_attn.q/k/v/o_proj, an mlp and RMSNorms; "
            f"tested: {', '.join(SUPPORTED_BASES)})")
    if not isinstance(model_name, str) or not model_name.endswith("Model"):
        raise ValueError(hint)
    module_name = model_type_to_module_name(model_type)
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    prefix = model_name[: -len("Model")]
    suffixes = {"decoder": "DecoderLayer", "mlp": "MLP", "norm": "RMSNorm",
                "rotary": "RotaryEmbedding"}
    classes = {key: getattr(module, prefix + suffix, None) for key, suffix in suffixes.items()}
    if any(cls is None for cls in classes.values()):
        raise ValueError(hint)
    return classes
