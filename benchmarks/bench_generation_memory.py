#!/usr/bin/env python
"""Memory per generated token: Llama teacher (HF DynamicCache) vs an all-RWKV student.

Both models have random weights (nothing is downloaded). For each context length the model
prefills the context (in chunks, no grad), then greedily generates ``--new-tokens`` more tokens
one at a time with its cache. Reported per model and context:

* cache bytes after the prefill and growth per generated token (sum of the cache tensors);
* CUDA allocated-memory growth per generated token and the peak above the pre-decode level;
* decode latency per token.

    python -m benchmarks.bench_generation_memory          # GPU: Llama-3.1-8B shapes, 4k-32k
    python -m benchmarks.bench_generation_memory --smoke  # tiny shapes; runs on CPU too

If the full model does not fit, it retries with fewer layers and scales the per-layer figures
back to the full depth (the table says so). The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from shared.student import HybridRWKVCache, convert_teacher

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def cache_nbytes(cache) -> int:  # noqa: ANN001
    if isinstance(cache, HybridRWKVCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, cache, context: int, new_tokens: int, prefill_chunk: int,  # noqa: ANN001
            device: str, vocab: int, profile: bool = False) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    logits = None
    for start in range(0, context, prefill_chunk):
        logits = model(ids[:, start:start + prefill_chunk], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)
    del logits
    gc.collect()
    sync(device)
    cache_before = cache_nbytes(cache)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        alloc_before = torch.cuda.memory_allocated()
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - start)
    if profile:  # where a decode step's time goes: GPU kernels, or the host launching them
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                    + [torch.profiler.ProfilerActivity.CUDA] * (device == "cuda")
                                    ) as prof:
            for _ in range(3):
                logits = model(token, past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits
                token = logits[:, -1:].argmax(-1)
            sync(device)
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events) / 3
        launches = sum(e.count for e in events if e.key == "cudaLaunchKernel") / 3
        print(f"decode profile: GPU busy {gpu_us / 1e3:.2f} ms per token, {launches:.0f} kernel "
              "launches per token; top ops by host time:", flush=True)
        print(events.table(sort_by="cpu_time_total", row_limit=12), flush=True)
    del logits
    sync(device)
    row = {"cache_prefill": cache_before,
           "cache_growth": (cache_nbytes(cache) - cache_before) / new_tokens,
           "decode_ms": statistics.median(times) * 1e3, "alloc_growth": float("nan"),
           "peak_above": float("nan")}
    if device == "cuda":
        row["alloc_growth"] = (torch.cuda.memory_allocated() - alloc_before) / new_tokens
        row["peak_above"] = torch.cuda.max_memory_allocated() - alloc_before
    return row


def run(args: argparse.Namespace, layers: int) -> list[tuple[str, int, dict]]:
    base = SMOKE if args.smoke else LLAMA31_8B
    config = LlamaConfig(**base, num_hidden_layers=layers)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(args.device):
        teacher = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    spec = dict(layers="all", mixer=args.mixer, mode="block", ffn=args.ffn)
    student = convert_teacher(teacher, spec).eval()
    rows = []
    try:
        for context in args.contexts:
            for name in ("teacher", "student"):
                model = teacher if name == "teacher" else student
                cache = (DynamicCache(config=teacher.config) if name == "teacher"
                         else HybridRWKVCache(student.config))
                row = measure(model, cache, context, args.new_tokens, args.prefill_chunk,
                              args.device, config.vocab_size,
                              profile=args.profile_decode and context == args.contexts[0])
                del cache
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                print(f"{name} ctx={context} layers={layers} attention="
                      f"{teacher.config._attn_implementation}: {row}", flush=True)
                rows.append((name, context, row))
    finally:
        del teacher, student
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model and contexts (runs on CPU too)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32,
                        help="decoder layers to build (full 8B: 32)")
    parser.add_argument("--mixer", default="rwkv7", choices=["rwkv6", "rwkv7"])
    parser.add_argument("--ffn", default="mlp", choices=["mlp", "rwkv_cmix"])
    parser.add_argument("--profile-decode", action="store_true",
                        help="profile 3 decode tokens of each model at the first context")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.contexts, args.new_tokens, args.prefill_chunk, args.layers = [64, 128, 256], 8, 96, 2
    full, layers = args.layers, args.layers
    while True:
        try:
            rows = run(args, layers)
            break
        except torch.cuda.OutOfMemoryError:
            if layers <= 2:
                raise
        # outside the except block, so the traceback no longer pins the models' memory
        layers //= 2
        gc.collect()
        torch.cuda.empty_cache()
        print(f"out of memory: retrying with {layers} layers and scaling per-layer figures",
              flush=True)
    scale = full / layers
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shapes = "smoke shapes" if args.smoke else "Llama-3.1-8B shapes"
    print(f"\n### Generation memory ({device}; {shapes}, "
          f"batch 1, {'fp32' if args.device == 'cpu' else 'bf16'}; {full} layers"
          + (f", measured with {layers} and scaled x{scale:g}" if scale != 1 else "")
          + f"; student: all layers {args.mixer} block, ffn={args.ffn}; {args.new_tokens} new "
          "tokens)\n")
    print("| model | context | cache after prefill (MiB) | cache growth / token (KiB) | "
          "allocated growth / token (KiB) | decode peak above start (MiB) | decode ms / token |")
    print("|---|---|---|---|---|---|---|")
    for name, context, r in rows:
        mib, kib = scale / 2**20, scale / 2**10
        print(f"| {name} | {context} | {r['cache_prefill'] * mib:.1f} | "
              f"{r['cache_growth'] * kib:.1f} | {r['alloc_growth'] * kib:.1f} | "
              f"{r['peak_above'] * mib:.1f} | {r['decode_ms']:.2f} |")


if __name__ == "__main__":
    main()
