"""Tiny random teachers, built from transformers' config classes (nothing comes from a hub).

``tiny_teacher`` builds one in memory (Llama, Qwen2, Qwen3 or Mistral: the student's tests cover
each family's quirks). ``make_tiny_llama`` writes a Llama checkpoint directory (config +
safetensors + a trained tokenizer) that our loading code reads exactly as it reads
Llama-3.1-8B-Instruct: tests, benchmarks and the demo use it. The tokenizer is a byte-level BPE
trained with ``tokenizers`` on text that ships with every Debian system, with Llama-3-style
special tokens and a chat template, so chat rendering and label masking are exercised for real.

    python -m shared.tiny --output /tmp/tiny-llama [--hidden-size 64 --layers 4 --vocab-size 512]
"""
from __future__ import annotations

import argparse
import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]

# Llama-3 Instruct's template, shortened to what our tiny tokenizer needs: each turn is
# header + content + <|eot_id|>, and the generation prompt opens an assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Distillation trains a small student model "
    "to imitate a large teacher model. 蒸馏把大模型的知识传给小模型。"
)


def system_text_files() -> list[str]:
    """Plain-text files that every Debian system ships (licences and package copyrights)."""
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    files += sorted(glob.glob("/usr/share/doc/*/copyright"))
    return [f for f in files if Path(f).is_file()]


def _iter_text(files: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        seen += len(text)
        yield text
        if seen >= max_bytes:
            return
    yield _FALLBACK_TEXT


def train_tokenizer(output_dir: str | Path, vocab_size: int = 512,
                    text_files: Iterable[str] | None = None, max_bytes: int = 4_000_000) -> None:
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = list(text_files) if text_files is not None else system_text_files()
    tokenizer.train_from_iterator(_iter_text(files, max_bytes), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(output_dir))


def tiny_teacher(kind: str = "llama", layers: int = 3, hidden: int = 64, heads: int = 4,
                 kv_heads: int = 2, vocab: int = 101, seed: int = 0,
                 dtype: torch.dtype | str = "float32", device: str = "cpu",
                 **config: Any) -> PreTrainedModel:
    """A random ``{Llama,Qwen2,Qwen3,Mistral}ForCausalLM`` in eval mode; ``config`` overrides
    the config's fields (defaults: intermediate 1.5 x hidden, 512 positions, pad/bos/eos 0/1/2).

    ``llama`` and ``mistral`` have GQA and no biases; ``qwen2`` has q/k/v biases; ``qwen3`` has a
    head_dim that makes ``heads * head_dim != hidden`` (24 * 4 = 96 vs 64) plus q/k norms.
    """
    import torch
    import transformers as tr

    fields = dict(hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    fields.update(config)
    if kind == "llama":
        cfg, cls = tr.LlamaConfig(**fields), tr.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = tr.MistralConfig(**fields, sliding_window=None), tr.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = tr.Qwen2Config(**fields), tr.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = tr.Qwen3Config(**fields, head_dim=24), tr.Qwen3ForCausalLM
    else:
        raise ValueError(f"unknown tiny teacher kind {kind!r}: llama, mistral, qwen2 or qwen3")
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg).to(getattr(torch, dtype) if isinstance(dtype, str) else dtype).eval()
    # transformers zero-inits biases; give them values so that copying them is actually checked
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    return model


def make_tiny_llama(output_dir: str | Path, hidden_size: int = 64, layers: int = 4,
                    heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None,
                    vocab_size: int = 512, max_position_embeddings: int = 4096,
                    seed: int = 0, model_vocab_size: int | None = None,
                    dtype: str = "float32", device: str = "cpu",
                    tokenizer_from: str | Path | None = None) -> Path:
    """Write a random-weight Llama checkpoint with its tokenizer to ``output_dir``.

    ``model_vocab_size`` pads the embedding beyond the tokenizer (as Llama-3's 128,256 rows do),
    so benchmarks can move real-sized logits with a tiny tokenizer.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        # Reuse a tokenizer (and so its fingerprint) made elsewhere, e.g. for prepared data.
        from transformers import AutoTokenizer as _Tok

        _Tok.from_pretrained(str(tokenizer_from)).save_pretrained(str(out))
    else:
        train_tokenizer(out, vocab_size=vocab_size)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    real_vocab = max(vocab.values()) + 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = tiny_teacher("llama", layers=layers, hidden=hidden_size, heads=heads, kv_heads=kv_heads,
                         vocab=max(real_vocab, len(tok), model_vocab_size or 0), seed=seed,
                         dtype=dtype, device=device,
                         intermediate_size=intermediate_size or hidden_size * 3,
                         max_position_embeddings=max_position_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--model-vocab-size", type=int, default=None,
                        help="embedding rows (default: the tokenizer's size)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is faster)")
    parser.add_argument("--tokenizer", default=None,
                        help="copy this tokenizer instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny_llama(args.output, hidden_size=args.hidden_size, layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads,
                          intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                          seed=args.seed, model_vocab_size=args.model_vocab_size,
                          dtype=args.dtype, device=args.device, tokenizer_from=args.tokenizer)
    print(f"tiny Llama written to {out}")


if __name__ == "__main__":
    main()
