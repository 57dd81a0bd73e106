"""Tiny random teachers for tests and ``--smoke`` runs (built from config classes: no hub access)."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel


def tiny_teacher(kind: str = "llama", layers: int = 3, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 vocab: int = 101, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A random ``{Llama,Qwen2,Qwen3,Mistral}ForCausalLM`` in eval mode.

    ``llama`` and ``mistral`` have GQA and no biases; ``qwen2`` has q/k/v biases; ``qwen3`` has a
    head_dim that makes ``heads * head_dim != hidden`` (24 * 4 = 96 vs 64) plus q/k norms.
    """
    import transformers as tr

    common = dict(hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if kind == "llama":
        config, cls = tr.LlamaConfig(**common), tr.LlamaForCausalLM
    elif kind == "mistral":
        config, cls = tr.MistralConfig(**common, sliding_window=None), tr.MistralForCausalLM
    elif kind == "qwen2":
        config, cls = tr.Qwen2Config(**common), tr.Qwen2ForCausalLM
    elif kind == "qwen3":
        config, cls = tr.Qwen3Config(**common, head_dim=24), tr.Qwen3ForCausalLM
    else:
        raise ValueError(f"unknown tiny teacher kind {kind!r}")
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    # transformers zero-inits biases; give them values so that copying them is actually checked
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    return model
