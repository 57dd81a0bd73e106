"""The tokenizer fingerprint: one hash that says two tokenizers encode text identically.

The teacher publishes it in its rendezvous manifest, the data commands write it into each
dataset card, and the trainer compares the two before it sends a single token id: a
vocabulary mismatch between teacher, student and data is the most common silent failure in
distillation (the KL is computed over the wrong token ids and nothing crashes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Files that decide how text maps to ids. Model weights and generation settings are not part
# of the fingerprint: a fine-tuned model with the same tokenizer is still compatible.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """Return a short sha256 over the tokenizer files in ``tokenizer_dir``.

    ``tokenizer_config.json`` contributes only the keys that change encoding (special tokens,
    chat template); its volatile keys (paths, class names) would make equal tokenizers differ.
    """
    root = Path(tokenizer_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {root} does not exist: pass the directory that holds "
            "tokenizer.json (usually the model directory)"
        )
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = root / name
        if path.is_file():
            found = True
            digest.update(name.encode())
            digest.update(path.read_bytes())
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        relevant = {
            key: config.get(key)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template",
                        "add_bos_token", "add_eos_token")
        }
        digest.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    if not found:
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {root}: pass the directory "
            "that holds the tokenizer"
        )
    return digest.hexdigest()[:16]
