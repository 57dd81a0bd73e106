"""The one typed config schema of the stack, its YAML loader and its CLI overrides.

A config file (configs/*.yaml) has one section per dataclass below; every key is documented
next to its field. Unknown keys and ill-typed values are errors that name the key. Any key
can be overridden on a service's command line as ``--section.key value`` (lists as
``--student.layers 0,2,4`` or YAML ``[0, 2, 4]``), so one file serves many runs.
"""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class Bound:
    """The range of a numeric key, declared with its type: ``Annotated[float, Bound(...)]``
    (the aliases below). ``apply`` checks it for every source (YAML, command line)."""

    low: float
    high: float | None = None
    exclusive: bool = False   # low itself is not allowed

    def __str__(self) -> str:
        if self.high is not None:
            return f"in {self.low:g}..{self.high:g}"
        return f"{'>' if self.exclusive else '>='} {self.low:g}"

    def check(self, value: float, key: str) -> None:
        below = value <= self.low if self.exclusive else value < self.low
        if math.isnan(value) or below or (self.high is not None and value > self.high):
            raise ConfigError(f"{key}: {value!r} must be {self}")


Positive = Annotated[float, Bound(0, exclusive=True)]
NonNegative = Annotated[float, Bound(0)]
Count = Annotated[int, Bound(1)]           # sizes, steps, intervals used as divisors
Index = Annotated[int, Bound(0)]           # indices, offsets, seeds, "0 = never" counts
Port = Annotated[int, Bound(0, 65535)]     # 0 = disabled where the doc says so


@dataclass
class TeacherConfig:
    model_path: str = ""
    """Local Hugging Face causal-LM directory (config.json, weights, tokenizer)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Teacher weights dtype; auto = bfloat16 on GPU, float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the teacher runs; auto = cuda when available."""
    device_id: Index = 0
    """GPU index the teacher uses. Every process sees all GPUs (NCCL needs that for P2P)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained (sdpa, flash_attention_2, eager)."""
    compile: Literal["off", "auto", "default", "max-autotune-no-cudagraphs"] = "off"
    """torch.compile each decoder layer's forward (shared/compiling.py): fewer, fused kernels
    per forward; auto = default on a GPU, off on CPU. default: 2.27x the eager forward of the
    135M shape at 8 x 1024 on an H200 (541k tokens/s, BENCHMARKS.md 2026-12-02 fifth session),
    ~20 s more start-up."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint. Off: a checkpoint can't run code here."""
    max_tokens_per_request: Count = 65536
    """Largest batch×length one trainer may send; larger requests are refused trainer-side."""
    max_batch_tokens: Count = 16384
    """Rows×length per forward chunk: bounds teacher memory when the group batch is large."""
    gather_window_seconds: NonNegative = 1.0
    """After the first request of a round, how long to wait for the rest of the group."""
    profile_batches: str = ""
    """Batched forwards to profile with torch.profiler, e.g. "10-12" (empty = none)."""
    profile_dir: str = "runs/profiles"
    """Where the teacher writes its profile (chrome trace + top-kernels table)."""
    metrics_port: Port = 9400
    """Base port of the metrics + /healthz server; the teacher of group G uses base + G."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics server binds to; 0.0.0.0 exposes it beyond this host."""


@dataclass
class LinkConfig:
    rendezvous_dir: str = "runs/rendezvous"
    """Directory on a volume shared by teachers and trainers (one sub-directory per group)."""
    trainers_per_group: Count = 1
    """Trainer ranks served by one teacher: global rank r belongs to group r // this."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Transport; auto = NCCL when the teacher and trainers use CUDA, Gloo otherwise."""
    timeout_seconds: Positive = 120.0
    """Bound on every wait for a peer: join, a request's answer, a silent peer's heartbeat."""
    control_host: str = "127.0.0.1"
    """Address the teacher's control channel listens on and publishes to its trainers (one
    TCP port per teacher); set the node's address when trainers run on other nodes."""
    reconnect_seconds: NonNegative = 900.0
    """How long a trainer that lost its teacher waits for the teacher's next generation (a
    restarted or recovered teacher) before it gives up with an error."""
    heartbeat_seconds: Positive = 2.0
    """How often each side touches its heartbeat file in the rendezvous directory."""
    mode: Literal["service", "in_process"] = "service"
    """service: a teacher process per group; in_process: the teacher model in the trainer."""
    logits: Literal["bf16", "topk", "fp32", "none"] = "bf16"
    """Teacher logits returned: full bf16, top-k log-probs, full fp32 (old protocol), none."""
    top_k: Count = 128
    """k for logits = topk."""
    prefetch: bool = True
    """Ask for step k+1 before training on step k, so teacher and student overlap."""


@dataclass
class StudentConfig:
    init_from: str = ""
    """Exported student to start from (a previous stage); empty: convert the teacher."""
    layers: list[int] | Literal["all"] = "all"
    """Decoder layers that become RWKV: a list of indices or 'all'."""
    mixer: Literal["rwkv6", "rwkv7"] = "rwkv6"
    """RWKV time-mixing formulas: rwkv6 (x060, the reference) or rwkv7 (x070)."""
    mode: Literal["block", "attention_only"] = "block"
    """block: the whole layer becomes an RWKV block; attention_only: swap self_attn only."""
    ffn: Literal["mlp", "rwkv_cmix"] = "mlp"
    """Block mode's FFN: keep the Llama MLP, or an RWKV channel-mix from up/down_proj."""
    grad_checkpointing: bool = False
    """Recompute converted layers in the backward pass (saves activation memory)."""
    kernel: Literal["auto", "fla", "chunk"] = "auto"
    """WKV path: auto = flash-linear-attention's Triton kernels on CUDA, PyTorch chunked else."""
    rwkv7_variant: Literal["x070", "rad"] = "x070"
    """RWKV-7 time mix: x070 (RWKV-LM's) or rad (RADLADS' RAD-RWKV7: no token shift, no bonus
    term, the teacher's RoPE on receptance and key; v_first, LoRA gate and GroupNorm kept)."""
    untie_embeddings: bool = False
    """A teacher with tied input/output embeddings gives the student an lm_head of its own, a
    copy that trains apart from the input embedding (RADLADS); off: the tie is kept."""
    packed_layout: Literal["auto", "per_document", "segments"] = "auto"
    """How RWKV layers run packed rows (shared/student/packing.py): per_document = rows re-laid
    out as batches of whole documents; segments = one pass, token shifts reset and a varlen WKV
    (fla's cu_seqlens); auto = segments where the WKV runs on fla (7x per_document on an H200),
    per_document elsewhere (faster on the chunked CPU path)."""


@dataclass
class DataConfig:
    train_dir: str = ""
    """Dataset prepared by `python -m services.data` (train split)."""
    mix_dirs: list[str] = field(default_factory=list)
    """More prepared datasets (the same tokenizer) mixed into train_dir's micro batches, e.g.
    plain text and chat-formatted rows (`--data.mix_dirs a,b`): each micro batch comes whole
    from one dataset, drawn by data.mix_weights (seeded: the same on every rank, resumed
    exactly); each dataset keeps its own epochs."""
    mix_weights: list[float] = field(default_factory=list)
    """Share of the micro batches per dataset, train_dir first, then data.mix_dirs in order
    (positive numbers, normalised; `--data.mix_weights 3,1`); empty = equal shares."""
    val_dir: str = ""
    """Held-out dataset directory (its validation split, else its train split); empty = the
    validation split inside train_dir."""
    micro_batch_size: Count = 2
    """Sequences per rank per micro step."""
    max_len: Count = 2048
    """Longest sequence fed to the model: longer rows of a dataset are cut to it (logged)."""
    seed: Index = 1234
    """Seed of the sampler's shuffling (and of the run)."""


@dataclass
class TrainConfig:
    stage: Literal["align", "kd", "sft"] = "kd"
    """align: hidden-state alignment; kd: KL + CE against teacher logits; sft: CE only."""
    align_mode: Literal["teacher_forced", "free"] = "teacher_forced"
    """align: each layer fed the teacher's input (MOHAWK), or a full forward (reference)."""
    trainable: Literal["mixers", "rwkv_layers", "all"] = "all"
    """kd/sft: which parameters train. align always trains the mixers only."""
    kl_weight: NonNegative = 1.0
    """Weight of KL(teacher || student) in kd."""
    ce_weight: NonNegative = 0.0
    """Weight of cross-entropy on the labels in kd."""
    skip_eos_targets: bool = False
    """kd/sft: leave out of the loss (KL and CE alike) every position whose target is a text
    dataset's end-of-document token (its card's ``eos_token_id``: ``services.data --eos``, the
    tokenizer's EOS by default); chat datasets' turn ends still train. For CE beside a chat
    teacher whose EOS ends its turns (SmolLM2's im_end): CE on short documents taught
    the hybrid to end answers at once, 2 of 5 empty (docs/quality.md, eleventh session)."""
    temperature: Positive = 1.0
    """Softmax temperature of the KL (the loss is multiplied by T² as usual)."""
    loss_kernel: Literal["auto", "triton", "torch"] = "auto"
    """KL + CE over the full vocabulary (kd, sft): auto = one Triton kernel for logits on a GPU
    (shared/kd_ce_triton.py), the chunked PyTorch path elsewhere; torch forces that path (the
    kernel's reference)."""
    compile: Literal["off", "auto", "default", "max-autotune-no-cudagraphs"] = "off"
    """torch.compile each of the student's decoder layers (shared/compiling.py), forward and
    backward: the RWKV-7 elementwise chains become a few fused kernels; auto = default on a
    GPU, off on CPU (the smollm2 recipes). kd on an H200 at the 135M shape: 1.29x (hybrid) and
    1.12x (all-RWKV-7) the eager step, ~30 s more start-up (BENCHMARKS.md 2026-12-02); every
    quality run since 2026-12-02's fifth trained compiled (align and kd) and the compiled
    layers equal eager ones on the GPU (tests/test_student_gpu.py). No CUDA graphs
    (reduce-overhead): shared/compiling.py says why."""
    steps: Count = 100
    """Optimizer steps to train."""
    time_limit_seconds: NonNegative = 0.0
    """End the stage after the first step that finishes past this many seconds of training
    (as if it were the last: checkpoint, export, summary); the ranks agree on it. The learning
    rate follows the schedule of train.steps unless train.lr_schedule is time. 0 = no limit."""
    lr_schedule: Literal["steps", "time"] = "steps"
    """What the cosine decay runs over: steps = train.steps; time = train.time_limit_seconds
    too, whichever is further along (the ranks' mean share of the time spent), so a stage that
    its time limit ends has decayed to lr_final instead of stopping mid-schedule. Needs
    time_limit_seconds > 0; a resumed run goes on from the share spent before."""
    grad_accum: Count = 1
    """Micro batches per optimizer step."""
    lr_init: Positive = 1e-4
    """Peak learning rate (reached after warm-up)."""
    lr_final: NonNegative = 1e-5
    """Learning rate at the last step (cosine decay)."""
    warmup_steps: Index = 10
    """Linear warm-up steps."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay (not applied to biases, norms, decay and bonus parameters)."""
    time_decay_lr_scale: NonNegative = 1.0
    """Learning-rate multiplier for time-decay parameters (the reference uses 2x)."""
    grad_clip: NonNegative = 1.0
    """Gradient clipping norm."""
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    """DeepSpeed JSON (ZeRO stage, offload); batch sizes and the optimizer (torch AdamW, fused
    on a GPU) are filled in here unless the JSON names its own optimizer. zero0.json, the
    one-GPU engine (the smollm2 recipes): stage 0, fp32 weights under bf16 autocast, clipping
    in the trainer's step; 1.14x (hybrid) and 1.29x (all-RWKV-7) ZeRO-1's compiled step at the
    135M shape, the same at 1B (BENCHMARKS.md 2026-12-02 fifth session). zero1/zero2.json set
    bf16.check_grad_overflow false: its isfinite per parameter tensor and step was host time
    (issue 19); a step with non-finite gradients is then applied, not skipped (the trainer
    stops on a non-finite norm)."""
    output_dir: str = "runs/train"
    """Checkpoints, logs and the exported student go here."""
    checkpoint_every: Count = 50
    """Checkpoint every N steps (and always at the end)."""
    save_at_end: bool = True
    """Checkpoint and export the student after the last step (benchmarks turn it off)."""
    keep_checkpoints: Count = 2
    """Most recent checkpoints kept."""
    val_every: Index = 50
    """Validate every N steps and after the last (0 = never)."""
    val_batches: Count = 8
    """Batches per validation."""
    log_every: Count = 1
    """Progress line every N steps on rank 0."""
    profile_steps: str = ""
    """Optimizer steps to profile with torch.profiler, e.g. "6-7" (empty = none); the trace and
    a top-kernels table go to output_dir."""
    slow_step_seconds: NonNegative = 0.0
    """After the first step, a step that runs longer than this logs every thread's Python stack
    (shared/profiling.py): what a stall waits on (a compile, the data, a lock); 0 = off."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the trainer ranks run; auto = cuda when available. The teacher has its own
    (teacher.device); link.mode=in_process puts the teacher on the trainer's device."""
    device_offset: Index = 0
    """GPU index of local rank 0; rank r uses GPU offset + LOCAL_RANK."""
    cpu_malloc: Literal["adaptive", "fixed"] = "adaptive"
    """CPU training: glibc's mmap threshold adaptive (its default) or fixed at 128 KiB
    (shared/host_memory.py): peak memory 0.82x at 1 x 128 and 0.71x at 2 x 256 tokens for the
    30-layer all-RWKV-7 align step, at 0.39x its speed (docs/student.md, CPU memory)."""
    peer_timeout_seconds: NonNegative = 300.0
    """A trainer rank whose heartbeat is silent this long counts as lost, and its peers exit
    (status 75) instead of waiting in a collective for the process group's 30 minutes; a rank
    that fails with an error tells them at once (services/trainer/peers.py). Generous
    because a rank's heartbeat thread can starve while the main thread holds the GIL (a long
    checkpoint write); 0 turns the watch off."""
    metrics_port: Port = 9500
    """Base port of the metrics server; global rank r uses base + r (0 disables)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics server binds to."""
    metrics_linger_seconds: NonNegative = 0.0
    """After the last step, keep serving metrics this long so Prometheus scrapes the final
    values (the last validation): one scrape interval plus its timeout; 0 = exit at once."""
    export_dir: str = ""
    """Where the final student is exported in HF format; empty = output_dir/student."""


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to ``hint`` (and within its bounds) or raise ConfigError
    naming ``key``."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *marks = get_args(hint)
        value = _check_type(value, base, key)
        for mark in marks:
            if isinstance(mark, Bound):
                mark.check(value, key)
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of {hint} ({'; '.join(errors)})")
    if origin is Literal:
        # YAML 1.1 reads a bare off / on (a file's `compile: off`, `--train.compile off`) as
        # a bool: the word was meant where the choices are words
        if isinstance(value, bool) and (word := "on" if value else "off") in get_args(hint):
            value = word
        if value not in get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, str) and item in (int, float):
            try:
                value = [item(v) for v in value.split(",") if v.strip()]
            except ValueError:
                kind = "integers" if item is int else "numbers"
                raise ConfigError(f"{key}: expected a list of {kind}, got {value!r}") from None
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if item in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--student.layers 3`: YAML reads a one-item list as a number
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def apply(config: Config, updates: dict[str, Any], source: str) -> Config:
    """Apply ``{"section": {"key": value}}`` or ``{"section.key": value}`` to ``config``."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    flat: dict[str, Any] = {}
    for name, value in updates.items():
        if "." in name:
            flat[name] = value
        elif name in sections and isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        elif name in sections:
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys")
        else:
            raise ConfigError(f"{source}: unknown section '{name}' "
                              f"(known: {', '.join(sections)})")
    for dotted, value in flat.items():
        section_name, _, key = dotted.partition(".")
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown key '{dotted}' "
                              f"(sections: {', '.join(sections)})")
        section = getattr(config, section_name)
        hints = get_type_hints(type(section), include_extras=True)
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{dotted}' (keys of '{section_name}': "
                              f"{', '.join(hints)})")
        setattr(section, key, _check_type(value, hints[key], f"{source}: {dotted}"))
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply ``--section.key value`` overrides."""
    config = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        apply(config, data, str(p))
    if overrides:
        apply(config, parse_overrides(overrides), "command line")
    return config


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Parse ``--section.key value`` / ``--section.key=value`` pairs."""
    result: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: unexpected argument {arg!r}; config keys are "
                              "given as --section.key value")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} needs a value")
            i += 1
            value = args[i]
        parsed = yaml.safe_load(value) if value not in ("",) else ""
        result[name.replace("-", "_")] = value if isinstance(parsed, dict) else parsed
        i += 1
    return result
