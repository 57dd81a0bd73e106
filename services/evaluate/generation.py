"""Greedy generations of every model for the same prompts, side by side.

A prompt goes through the tokenizer's chat template as one user turn (with the generation
prompt) when the tokenizer has a template, else it is tokenised as it is. Each model decodes
one prompt at a time (no padding, so nothing depends on how a model handles left padding) with
its cache: the teacher's KV cache, the student's RWKV state cache (``use_cache=True``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.evaluate.heldout import EvaluateError, render_chat
from services.evaluate.models import Model
from shared.repetition import distinct_ngrams, loops


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (``.txt`` and anything else), or ``.jsonl`` records with ``"prompt"``."""
    file = Path(path)
    if not file.is_file():
        raise EvaluateError(f"--prompts {file}: no such file")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix.lower() != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EvaluateError(f"--prompts {file}:{number}: not JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise EvaluateError(f"--prompts {file}:{number}: a record needs a 'prompt' string")
        prompts.append(record["prompt"])
    return prompts


def prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = render_chat([{"role": "user", "content": prompt}], tokenizer, "--prompts",
                           add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def end_ids(module: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a generation: the model's generation config's, else the tokenizer's."""
    eos = getattr(module.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]


@torch.inference_mode()
def first_token(model: Model, ids: list[int], tokenizer: Any, top: int = 3) -> dict[str, Any]:
    """The model's distribution over the reply's first token: the probability that it ends the
    turn at once (``p_end``: an all-RWKV student's answers were empty, docs/quality.md) and the
    ``top`` most likely tokens with their probabilities."""
    module = model.module
    device = next(module.parameters()).device
    logits = module(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
    probs = logits[0, -1].float().softmax(-1)
    ends = [i for i in end_ids(module, tokenizer) if i < probs.numel()]
    best = probs.topk(top)
    return {"p_end": float(probs[ends].sum()) if ends else 0.0,
            "top": [[tokenizer.decode([i]), float(p)]
                    for p, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]}


@torch.inference_mode()
def greedy(model: Model, ids: list[int], tokenizer: Any,
           max_new_tokens: int) -> tuple[str, list[int]]:
    """The model's greedy continuation of ``ids``: its text, decoded without special tokens, and
    its token ids up to the end of the turn."""
    from transformers import GenerationConfig

    module = model.module
    device = next(module.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    eos = end_ids(module, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                              eos_token_id=eos, pad_token_id=pad)
    out = module.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                          generation_config=config)
    new = out[0, len(ids):].tolist()
    turn = next((new[:i] for i, tok in enumerate(new) if tok in eos), new)
    return tokenizer.decode(new, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False), turn


def answer_facts(text: str, ids: list[int]) -> dict[str, Any]:
    """What an answer is made of: its tokens, whether it is empty or loops
    (shared/repetition.py, the rule the data job drops teacher replies by), its distinct 4-grams."""
    return {"tokens": len(ids), "empty": not text.strip(), "loops": loops(ids),
            "distinct_4grams": distinct_ngrams(ids)}


def answer_summary(generations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model over all prompts: answers, how many are empty or loop, their mean distinct
    4-gram share and length; so "coherent, no collapse" is a count, not a reading."""
    names = list(generations[0]["answers"]) if generations else []
    rows = []
    for name in names:
        facts = [g["answers"][name] for g in generations]
        rows.append({"model": name, "answers": len(facts),
                     "empty": sum(f["empty"] for f in facts),
                     "loops": sum(f["loops"] for f in facts),
                     "distinct_4grams": sum(f["distinct_4grams"] for f in facts) / len(facts),
                     "tokens": sum(f["tokens"] for f in facts) / len(facts)})
    return rows


def side_by_side(models: Sequence[Model], tokenizer: Any, prompts: Sequence[str],
                 max_new_tokens: int) -> list[dict[str, Any]]:
    """``[{"prompt": p, "outputs": {model name: text}, "answers": {model name:
    answer_facts(...)}, "first_token": {model name: first_token(...)}}]`` for every prompt."""
    from tqdm.auto import tqdm

    rows = []
    for prompt in tqdm(prompts, desc="generate", unit=" prompts", dynamic_ncols=True):
        ids = prompt_ids(prompt, tokenizer)
        answers = {m.name: greedy(m, ids, tokenizer, max_new_tokens) for m in models}
        rows.append({"prompt": prompt, "prompt_tokens": len(ids),
                     "outputs": {name: text for name, (text, _) in answers.items()},
                     "answers": {name: answer_facts(text, turn)
                                 for name, (text, turn) in answers.items()},
                     "first_token": {m.name: first_token(m, ids, tokenizer) for m in models}})
    return rows
