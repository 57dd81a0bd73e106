"""One group of bench_steps.py's arms, run in a process of its own (``python step_arms.py SPEC``).

It imports the trainer from whatever tree ``PYTHONPATH`` names, so bench_steps.py measures an
older checkout (``--baseline-tree``) with the same code. Only the APIs that tree has are used:
``services.trainer.components`` (init_distributed, build_student, select_trainable, init_engine,
teacher_source), ``services.trainer.objective``, ``services.trainer.loop`` (Prefetcher,
TrainingRun, train_step) and ``shared.tiny``. Prints one ``RESULT {json}`` line per arm.

Arms of a spec:
  trainer  ``loop.train_step`` on a DeepSpeed engine, the in-process teacher answering (ZeRO
           and bf16 as the trainer configures them);
  plain    the same student and DistillObjective (hence the same loss kernel) in a plain
           PyTorch loop: fp32 weights, bf16 autocast on a GPU, fused AdamW, foreach clipping
           (run before the trainer arm, which then wraps the same student);
  teacher  the in-process teacher's forward alone (the request and its answer).
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab; embeddings tied
    "135m": (576, 30, 9, 3, 1536, 49152),    # SmolLM2-135M
    "1b": (2048, 16, 32, 8, 8192, 128256),   # Llama-3.2-1B
    "tiny": (64, 4, 4, 2, 128, 512),         # CPU runs of the script
}


def ensure_teacher(model_dir: Path, shape: str, device: str) -> Path:
    """A random Llama checkpoint of ``shape`` with a small trained tokenizer (the teacher's
    fingerprint needs one; ids are random, so its size does not matter)."""
    if (model_dir / "config.json").is_file():
        return model_dir
    from shared.tiny import tiny_teacher, train_tokenizer

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    train_tokenizer(tmp, vocab_size=512, max_bytes=200_000)
    model = tiny_teacher("llama", layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                         vocab=vocab, dtype="bfloat16" if device == "cuda" else "float32",
                         device=device, intermediate_size=inter, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    model.save_pretrained(str(tmp))
    del model
    tmp.rename(model_dir)
    return model_dir


def packed_positions(micro_batch: int, seq_len: int, docs_per_row: int,
                     g: torch.Generator, vary_count: bool = False) -> torch.Tensor:
    """``position_ids`` of rows packed with ``docs_per_row`` documents of random lengths each
    (restarting at every document, as the data command's ``--pack`` rows do); ``vary_count``:
    each row 1 to 2 * docs_per_row - 1 documents instead (the same mean)."""
    rows = []
    for _ in range(micro_batch):
        docs = int(torch.randint(1, 2 * docs_per_row, (), generator=g)) if vary_count \
            else docs_per_row
        cuts = torch.randperm(seq_len - 1, generator=g)[:docs - 1] + 1
        bounds = [0, *sorted(cuts.tolist()), seq_len]
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        rows.append(torch.cat([torch.arange(end - begin) for begin, end in pairs]))
    return torch.stack(rows)


class RandomBatches:
    """The data loader's interface (``forever``, ``state_dict``) over random full-length rows,
    each one document or ``docs_per_row`` packed ones."""

    def __init__(self, micro_batch: int, seq_len: int, vocab: int, seed: int = 0,
                 docs_per_row: int = 1, vary_packing: bool = False) -> None:
        from shared.labels import IGNORE

        g = torch.Generator().manual_seed(seed)
        # vary_packing: every batch its own document lengths and counts, as real packed data
        # has (each step a new number of documents per micro batch: what a compiled varlen
        # path meets)
        self.vary = (micro_batch, seq_len, docs_per_row, g, True) \
            if vary_packing and docs_per_row > 1 else None
        ids = torch.randint(3, vocab, (micro_batch, seq_len), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((micro_batch, 1), IGNORE)], dim=1)
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "labels": labels, "lengths": torch.full((micro_batch,), seq_len)}
        if docs_per_row > 1:
            self.batch["position_ids"] = packed_positions(micro_batch, seq_len, docs_per_row, g)
        self.data = type("Data", (), {"root": "random"})()

    def forever(self):
        while True:
            if self.vary is not None:
                self.batch["position_ids"] = packed_positions(*self.vary)
            yield dict(self.batch)

    def state_dict(self) -> dict:
        return {}


def batches_for(spec: dict, micro_batch: int, vocab: int) -> RandomBatches:
    return RandomBatches(micro_batch, spec["seq"], vocab, docs_per_row=spec.get("docs_per_row", 1),
                         vary_packing=spec.get("vary_packing", False))


def make_config(spec: dict, model_dir: Path, out: Path):
    from shared.config import apply, load_config, parse_overrides

    _, layers, *_ = SHAPES[spec["shape"]]
    cfg = load_config(None, [])
    tokens = max(spec["micro_batches"]) * spec["seq"]
    sections = {
        "teacher": {"model_path": str(model_dir), "max_batch_tokens": tokens,
                    "max_tokens_per_request": tokens},
        "link": {"mode": "in_process", "logits": "bf16"},
        "student": {"layers": list(range(1, layers, 2)) if spec["layers"] == "hybrid" else "all",
                    "mixer": "rwkv7", "mode": "block"},
        "data": {"micro_batch_size": spec["micro_batches"][0], "max_len": spec["seq"]},
        "train": {"stage": spec["stage"], "device": spec["device"], "output_dir": str(out),
                  "metrics_port": 0, "peer_timeout_seconds": 0.0, "grad_accum": 1},
    }
    apply(cfg, sections, "bench_steps")
    if spec.get("overrides"):
        apply(cfg, parse_overrides(spec["overrides"]), "command line")
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals in microseconds, in seconds."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def profile(fn, device: torch.device) -> dict:
    """One step under torch.profiler (a traced warm-up step before it is discarded): the self
    CPU time of every op, the summed time and count of the device's kernels, aten ops, and the
    time the device was busy: the union of the kernels' intervals (kernels of several streams
    overlap; summing them overstated it) over the profiled step's wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # acc_events: without it the profiler clears its events at the end of the (one) cycle, so
    # events() came back empty and 2026-12-02's GPU tables had zeros in every profile column
    with torch.profiler.profile(activities=acts, acc_events=True,
                                schedule=schedule(wait=0, warmup=1, active=1)) as prof:
        for _ in range(2):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - t0
            prof.step()
    events = prof.events()
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not annotation(e)]
    aten = collections.Counter(e.name for e in cpu if e.name.startswith("aten::"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"profiled_wall_s": wall, "ops_table": prof.key_averages().table(sort_by=sort,
                                                                            row_limit=40),
            "host_self_cpu_s": sum(e.self_cpu_time_total for e in cpu) / 1e6,
            "kernel_s": sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
            "busy_s": busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels]),
            "kernels": len(kernels), "aten_ops": sum(aten.values()),
            "top_aten": dict(aten.most_common(15)),
            "top_kernels": top_kernels((e.name, e.time_range.elapsed_us()) for e in kernels),
            "kernel_kinds": kernel_kinds((e.name, e.time_range.elapsed_us()) for e in kernels),
            "idle": idle(cpu, kernels) if kernels else None}


def idle(cpu: list, kernels: list) -> dict:
    """The profiled step's idle GPU time by the host op it fell in (benchmarks/gpu_idle.py),
    within the profiler's step range (else the kernels' own span)."""
    from benchmarks.gpu_idle import host_ops, idle_by_host_op

    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    steps = [e for e in cpu if e.name.startswith("ProfilerStep")]
    start, end = ((steps[-1].time_range.start, steps[-1].time_range.end) if steps else
                  (min(s for s, _ in spans), max(e for _, e in spans)))
    try:
        return idle_by_host_op(spans, host_ops(cpu), start, end)
    except Exception as err:  # noqa: BLE001 - a diagnostic must not lose the arm's figures
        return {"error": repr(err)}


def annotation(event) -> bool:
    """A range on the device's timeline that is no kernel: the profiler's own ``ProfilerStep#N``
    (and any ``record_function``) spans the whole step there. Counted as a kernel, it made every
    profile of 2026-12-02 read "GPU busy 99-100 %" and added the step's wall to "kernel s"."""
    return bool(getattr(event, "is_user_annotation", False)) or \
        event.name.startswith("ProfilerStep")


def top_kernels(timed: Iterable[tuple[str, float]], n: int = 30) -> dict[str, list]:
    """The ``n`` kernels of most summed time: name (cut at 100 characters) -> [launches, ms].
    In the result JSON itself, because the logs' op tables did not come back from the device on
    2026-12-02 (their archive was over the transfer limit) and the busy GPU's time went unread."""
    total: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, us in timed:
        entry = total[name[:100]]
        entry[0] += 1
        entry[1] += us / 1e3
    top = sorted(total.items(), key=lambda kv: -kv[1][1])[:n]
    return {name: [count, round(ms, 3)] for name, (count, ms) in top}


# first match wins: what each kind of kernel is, by its name (cuBLAS, fla, cuDNN, inductor, ...)
KERNEL_KINDS = (
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("fla rwkv7", ("chunk_", "dplr", "fused_recurrent", "wy_", "wu_", "prepare_", "l2norm")),
    ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa")),
    ("our kd loss", ("kd_ce",)),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("inductor fused", ("triton_",)),
    ("copy / fill", ("copy", "memcpy", "memset", "cat", "fill")),
    ("elementwise / reduce", ("elementwise", "vectorized", "unrolled", "reduce", "softmax")),
)


def kernel_kinds(timed: Iterable[tuple[str, float]]) -> dict[str, list]:
    """Kernel time by kind (KERNEL_KINDS, else "other"): kind -> [launches, ms], most first;
    where a step's GPU time goes at a glance (issue 19: which part to make faster)."""
    def kind(name: str) -> str:
        low = name.lower()
        return next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "other")

    return top_kernels(((kind(name), us) for name, us in timed), n=len(KERNEL_KINDS) + 1)


def summary(arm: str, spec: dict, micro_batch: int, times: list[float], prof: dict | None,
            extra: dict) -> dict:
    p50 = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    tokens = micro_batch * spec["seq"]
    result = {"arm": arm, "shape": spec["shape"], "layers": spec["layers"],
              "stage": spec["stage"], "micro_batch": micro_batch, "seq": spec["seq"],
              "tree": spec["tree"], "step_s": p50, "p90_over_p50": p90 / p50,
              "tokens_per_s": tokens / p50, "steps": len(times), "model_dir": spec["model_dir"],
              "device_name": torch.cuda.get_device_name() if spec["device"] == "cuda" else "cpu",
              **extra}
    if prof is not None:
        table = prof.pop("ops_table")
        name = "-".join([spec["tree"], spec["shape"], spec["layers"], spec["stage"], arm,
                         str(micro_batch)])
        (Path(spec["log_dir"]) / f"{name}.ops.txt").write_text(table)
        result.update(prof)
        cuda = spec["device"] == "cuda"
        # over the unprofiled median step: the profiler's own host work stretched the profiled
        # step (0.42 s against 0.27 s at the 135M shape, 2026-12-02), not the kernels in it
        result["gpu_busy"] = min(1.0, prof["busy_s"] / p50) if cuda else None
    return result


def model_facts(student) -> dict:
    """The student's config, from which the parent counts the FLOPs (with our tree's
    shared/flops.py, also for a baseline tree's arms)."""
    return {"student_config": json.loads(student.config.to_json_string())}


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def run_spec(spec: dict) -> list[dict]:
    from services.trainer import loop
    from services.trainer.components import (
        build_student,
        init_distributed,
        init_engine,
        select_trainable,
        teacher_source,
    )
    from services.trainer.objective import DistillObjective, teacher_request
    from shared.fingerprint import tokenizer_fingerprint

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    model_dir = ensure_teacher(Path(spec["model_dir"]), spec["shape"], spec["device"])
    out = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    cfg = make_config(spec, model_dir, out)
    place = init_distributed(cfg)
    device = place.device
    vocab = SHAPES[spec["shape"]][5]
    teacher = teacher_source(cfg, place, tokenizer_fingerprint(model_dir), vocab)
    student = build_student(cfg, device)
    select_trainable(student, cfg)
    request = teacher_request(cfg.train, cfg.link, student.converted_layers,
                              student.config.num_hidden_layers)
    objective = DistillObjective(student, cfg.train, request)
    facts = model_facts(student)
    results = []
    arms = spec["arms"]
    if "teacher" in arms:
        for mb in spec["micro_batches"]:
            b = batches_for(spec, mb, vocab).batch
            def forward(b=b) -> None:
                teacher.request(b["input_ids"], b["lengths"], request,
                                b.get("position_ids")).result()
            torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
            times = timed(forward, device, spec["steps"], spec["warmup"])
            prof = profile(forward, device) if spec["profile"] else None
            results.append(summary("teacher", spec, mb, times, prof,
                                   {"peak_gib": peak_gib(device)}))
            print("RESULT " + json.dumps(results[-1]), flush=True)
    if "plain" in arms:
        results += plain_arm(spec, cfg, objective, teacher, request, device, vocab, facts)
    if "trainer" in arms:
        engine = init_engine(objective, cfg, place)
        for mb in spec["micro_batches"]:
            batches = batches_for(spec, mb, vocab)
            prefetcher = loop.Prefetcher(batches, teacher, request, cfg.link.prefetch, vocab)
            run = loop.TrainingRun(cfg, place, engine, None, prefetcher, teacher,
                                   loop.StatLoggers(), loop.StopFlag(), out)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = timed(lambda run=run: loop.train_step(run), device, spec["steps"],
                          spec["warmup"])
            prof = profile(lambda run=run: loop.train_step(run), device) if spec["profile"] \
                else None
            results.append(summary("trainer", spec, mb, times, prof,
                                   {**facts, "peak_gib": peak_gib(device)}))
            print("RESULT " + json.dumps(results[-1]), flush=True)
    return results


def plain_arm(spec: dict, cfg, objective, teacher, request, device, vocab: int,
              facts: dict) -> list[dict]:
    """The issue's baseline loop: no DeepSpeed, fp32 master weights, bf16 autocast."""
    from shared.student.param_groups import param_groups

    objective.to(device).train()
    cuda = device.type == "cuda"
    groups = param_groups(objective, cfg.train.weight_decay, cfg.train.time_decay_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr_init, betas=(0.9, 0.99), eps=1e-8,
                                  fused=True)
    params = [p for g in groups for p in g["params"]]
    results = []
    for mb in spec["micro_batches"]:
        cpu_batch = batches_for(spec, mb, vocab).batch
        b = {k: v.to(device) for k, v in cpu_batch.items()}

        def step(cpu_batch=cpu_batch, b=b) -> None:
            answer = teacher.request(cpu_batch["input_ids"], cpu_batch["lengths"],
                                     request, cpu_batch.get("position_ids")).result()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = objective(b["input_ids"], b["attention_mask"], b["labels"], answer,
                                    b.get("position_ids"))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(step, device, spec["steps"], spec["warmup"])
        prof = profile(step, device) if spec["profile"] else None
        results.append(summary("plain", spec, mb, times, prof,
                               {**facts, "peak_gib": peak_gib(device)}))
        print("RESULT " + json.dumps(results[-1]), flush=True)
    optimizer.state.clear()   # before the trainer arm builds its own in this process
    objective.zero_grad(set_to_none=True)
    return results


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    run_spec(spec)
    # DeepSpeed's and the process group's teardown can hang on exit: the results are out.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
