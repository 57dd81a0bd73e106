#!/usr/bin/env python
"""The student alone: kd training steps against teacher logits made once (no teacher traffic),
step time, tokens/s and MFU, with gradient checkpointing off, on the converted layers (ours,
``student.grad_checkpointing``) and on every layer (transformers' gradient_checkpointing_enable).

    python -m benchmarks.bench_student --config configs/bench_8b_layers.yaml --model DIR \\
        --data bench/data2048 [--steps 12] [--modes none converted all] [--trace DIR]

FLOPs per trained token (stated so the figure can be checked):
    6 · N_matmul  +  6 · n_attention_layers · T · d_model
N_matmul counts every 2-D weight the step multiplies by (decoder projections and LoRAs, the LM
head), not the input embedding (a lookup). The second term is causal attention in the kept
Llama layers (QKᵀ and AV over T/2 keys on average, forward + backward = 3×). The WKV recurrence
(O(T·d·head_size) per layer) and the elementwise work are left out. MFU is that rate over the
bf16 dense peak of the card's datasheet (989 TFLOP/s for the H100/H200 SXM); the table also
gives it against a bf16 matmul (8192³) measured in the same run.
TFLOP/s and MFU come from the median optimizer step (a stalled step moves only the "all steps"
column). Runs in one process on one GPU (``--train.device_offset`` picks it). Prints a table
last and a ``RESULT {json}`` line per mode (bench_trainer.py reads those).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
WARMUP = 3


def matmul_ceiling(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    return 20 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3)


def flops_per_token(student, seq_len: int) -> tuple[float, int]:
    embed = student.get_input_embeddings().weight
    n_matmul = sum(p.numel() for p in student.parameters() if p.dim() == 2 and p is not embed)
    cfg = student.config
    attention_layers = cfg.num_hidden_layers - len(cfg.rwkv_layers)
    return 6 * n_matmul + 6 * attention_layers * seq_len * cfg.hidden_size, n_matmul


def set_checkpointing(student, mode: str) -> None:
    student.config.rwkv_gradient_checkpointing = mode == "converted"
    if mode == "all":
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif student.is_gradient_checkpointing:
        student.gradient_checkpointing_disable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", required=True, help="teacher checkpoint the student converts")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=12,
                        help="optimizer steps per mode (3 warm-up)")
    parser.add_argument("--modes", nargs="+", default=["none", "converted", "all"],
                        choices=["none", "converted", "all"])
    parser.add_argument("--trace", default=None, help="profile two steps of the first mode here")
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                        help="torch AdamW's fused kernel (our default on a GPU) or its foreach "
                        "form (DeepSpeed's default with torch_adam; the baseline)")
    args, rest = parser.parse_known_args()

    from services.trainer.components import (
        build_student,
        deepspeed_config,
        init_distributed,
        init_engine,
        select_trainable,
    )
    from services.trainer.objective import DistillObjective, teacher_request
    from shared.config import load_config
    from shared.data_loader import TrainBatches

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # one process, no launcher
    out = tempfile.mkdtemp(prefix="bench-student-")
    cfg = load_config(args.config, ["--teacher.model_path", args.model, "--data.train_dir",
                                    args.data, "--train.output_dir", out, *rest])
    place = init_distributed(cfg)
    if args.optimizer == "foreach":  # the same settings, the optimizer in its foreach form
        ds = deepspeed_config(cfg, place.device, 1)
        ds["optimizer"]["params"].pop("fused", None)
        ds["optimizer"]["params"]["foreach"] = True
        cfg.train.deepspeed_config = str(Path(out) / "foreach.json")
        Path(cfg.train.deepspeed_config).write_text(json.dumps(
            {k: ds[k] for k in ("zero_optimization", "optimizer") if k in ds}))
    accum = cfg.train.grad_accum
    student = build_student(cfg, place.device)
    select_trainable(student, cfg)
    request = teacher_request(cfg.train, cfg.link, student.converted_layers,
                              student.config.num_hidden_layers)
    engine = init_engine(DistillObjective(student, cfg.train, request), cfg, place)
    batches = TrainBatches(cfg.data.train_dir, cfg.data.micro_batch_size, 1, 0,
                           seed=cfg.data.seed, remainder="wrap").forever()
    vocab = student.config.vocab_size
    logits: dict[tuple[int, int], torch.Tensor] = {}  # the teacher's answer, made once per shape
    cuda = place.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ceiling = matmul_ceiling(place.device)
    peak = (next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), 989e12)
            if cuda else float("nan"))
    results = []
    for index, mode in enumerate(args.modes):
        set_checkpointing(engine.module.student, mode)
        if cuda:
            torch.cuda.reset_peak_memory_stats(place.device)
        times, tokens, lengths = [], [], []  # per micro step
        for step in range(args.steps * accum):
            profile = args.trace and index == 0 and step in (WARMUP * accum, WARMUP * accum + 1)
            if profile and step == WARMUP * accum:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + [torch.profiler.ProfilerActivity.CUDA] * cuda)
                prof.__enter__()
            batch = next(batches)
            b = {k: v.to(place.device, non_blocking=True) for k, v in batch.items()}
            shape = tuple(b["input_ids"].shape)
            if shape not in logits:
                logits[shape] = torch.randn(*shape, vocab, device=place.device,
                                            dtype=torch.bfloat16) * 2
            sync()
            t0 = time.perf_counter()
            loss, _ = engine(b["input_ids"], b["attention_mask"], b["labels"],
                             {"logits": logits[shape]}, b.get("position_ids"))
            engine.backward(loss)
            engine.step()
            float(loss.detach())  # the training loop reads the loss every step too
            sync()
            if step >= WARMUP * accum:
                times.append(time.perf_counter() - t0)
                tokens.append(int(batch["lengths"].sum()))
                lengths.append(shape[1])
            if profile and step == WARMUP * accum + 1:
                prof.__exit__(None, None, None)
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(Path(args.trace) / "student_steps.json"))
                table = prof.key_averages().table(
                    sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20)
                (Path(args.trace) / "student_kernels.txt").write_text(table)
                print(table, flush=True)
        per_token, n_matmul = flops_per_token(engine.module.student, statistics.median(lengths))
        # an optimizer step = grad_accum micro steps (DeepSpeed steps the optimizer on the last)
        step_s = statistics.median(sum(times[i:i + accum]) for i in range(0, len(times), accum))
        tok_s = sum(tokens) / sum(times)  # over every measured step: a stalled one shows here
        # the figures: from the median optimizer step (as bench_trainer.py), robust to a stall
        median_tok_s = statistics.median(tokens) * accum / step_s
        result = {"mode": mode, "optimizer": args.optimizer, "grad_accum": accum,
                  "loss_kernel": cfg.train.loss_kernel,
                  "step_s": step_s, "tokens_per_s": tok_s, "median_tokens_per_s": median_tok_s,
                  "tokens_per_step": statistics.median(tokens) * accum, "n_matmul": n_matmul,
                  "flops_per_token": per_token, "tflops": median_tok_s * per_token / 1e12,
                  "mfu": median_tok_s * per_token / peak,
                  "mfu_vs_matmul": median_tok_s * per_token / ceiling,
                  "matmul_tflops": ceiling / 1e12,
                  "peak_memory_gib": torch.cuda.max_memory_allocated(place.device) / 2 ** 30
                  if cuda else float("nan")}
        results.append(result)
        print("RESULT " + json.dumps(result), flush=True)
    print(f"\nN_matmul = {results[0]['n_matmul'] / 1e9:.2f} B; FLOPs per token = "
          f"{results[0]['flops_per_token'] / 1e9:.2f} G; bf16 matmul 8192³ here: "
          f"{results[0]['matmul_tflops']:.0f} TFLOP/s; peak {peak / 1e12:.0f}\n")
    print("| grad checkpointing | optimizer | grad accum | loss kernel | step s (median) | "
          "tokens/s (median step) | tokens/s (all steps) | TFLOP/s | MFU (peak) | vs matmul | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['optimizer']} | {r['grad_accum']} | {r['loss_kernel']} | "
              f"{r['step_s']:.3f} | {r['median_tokens_per_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['tflops']:.0f} | "
              f"{r['mfu']:.3f} | {r['mfu_vs_matmul']:.3f} | {r['peak_memory_gib']:.1f} |")


if __name__ == "__main__":
    main()
