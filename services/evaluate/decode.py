"""Decode speed and memory of each model at given prompt lengths (``--decode-contexts``).

One row of ``context`` seeded random token ids is prefilled (only the last position's logits
are made), then ``new_tokens`` greedy steps run one token at a time through the model's cache:
the teacher's KV cache grows with the context, the student's RWKV state does not (its kept
attention layers still hold a KV cache). Decode tokens/s counts the steps only, prefill is
timed apart. On a GPU, peak memory is ``torch.cuda.max_memory_allocated`` during prefill +
decode minus what was allocated before (all loaded models' weights): the cache and the
activations this model needs at that length. On the CPU no peak is reported (the process's
peak RSS cannot be reset between models, so it would not say which model used it).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from services.evaluate.models import Model

WARMUP_CONTEXT = 16  # a short prefill + steps first, so one-off kernel setup is not timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _prefill_and_decode(module: torch.nn.Module, ids: torch.Tensor,
                        new_tokens: int) -> tuple[float, float]:
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    out = module(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        out = module(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefilled - start, time.perf_counter() - prefilled


def decode_speed(model: Model, context: int, new_tokens: int, vocab_size: int,
                 seed: int = 0) -> dict[str, Any]:
    """Prefill ``context`` tokens, decode ``new_tokens``; times, tokens/s, peak memory."""
    module = model.module
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, context), generator=generator).to(device)
    _prefill_and_decode(module, ids[:, :WARMUP_CONTEXT], 2)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        resting = torch.cuda.memory_allocated(device)
    prefill_s, decode_s = _prefill_and_decode(module, ids, new_tokens)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - resting) / 2**20
    weights = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    return {"model": model.name, "context": context, "new_tokens": new_tokens,
            "weights_mib": weights,
            "prefill_s": prefill_s, "prefill_tokens_per_s": context / prefill_s,
            "decode_s": decode_s, "decode_tokens_per_s": new_tokens / decode_s,
            "peak_memory_mib": peak}


def decode_table(models: Sequence[Model], contexts: Sequence[int],
                 new_tokens: int, vocab_size: int) -> list[dict[str, Any]]:
    """Every model at every context, with its decode tokens/s as a ratio to the teacher's."""
    from tqdm.auto import tqdm

    rows = []
    jobs = [(c, m) for c in contexts for m in models]
    for context, model in tqdm(jobs, desc="decode", unit=" runs", dynamic_ncols=True):
        rows.append(decode_speed(model, context, new_tokens, vocab_size))
    for row in rows:
        base = next(r for r in rows if r["context"] == row["context"]
                    and r["model"] == models[0].name)
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows
