"""Hybrid RWKV student built from a Llama-family teacher (issue 3).

Importing this package registers ``model_type="rwkv_hybrid"`` with ``AutoConfig``, ``AutoModel``
and ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved
student without ``trust_remote_code``. See docs/student.md.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from shared.student.cache import HybridRWKVCache, RWKVStateLayer
from shared.student.configuration import FFNS, MIXERS, MODES, RWKVHybridConfig
from shared.student.convert import convert_teacher, load_student, save_student
from shared.student.modeling import RWKVDecoderLayer, RWKVHybridForCausalLM, RWKVHybridModel

AutoConfig.register(RWKVHybridConfig.model_type, RWKVHybridConfig, exist_ok=True)
AutoModel.register(RWKVHybridConfig, RWKVHybridModel, exist_ok=True)
AutoModelForCausalLM.register(RWKVHybridConfig, RWKVHybridForCausalLM, exist_ok=True)

__all__ = [
    "FFNS",
    "MIXERS",
    "MODES",
    "HybridRWKVCache",
    "RWKVDecoderLayer",
    "RWKVHybridConfig",
    "RWKVHybridForCausalLM",
    "RWKVHybridModel",
    "RWKVStateLayer",
    "convert_teacher",
    "load_student",
    "save_student",
]
