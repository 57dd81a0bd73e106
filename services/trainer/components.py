"""Config → components: devices, the student, the teacher source, DeepSpeed, the data.

Each builder does one thing; the training loop (loop.py) only wires their results.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from services.trainer.inputs import check_deepspeed_json
from shared.config import Config
from shared.host_memory import fix_mmap_threshold

log = logging.getLogger("trainer")


@dataclass
class Place:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: int
    index_in_group: int


def init_distributed(cfg: Config) -> Place:
    """Join the trainers' default process group (the one DeepSpeed uses) and pick a device."""
    import deepspeed

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use "
                           "--train.device cpu or check CUDA_VISIBLE_DEVICES")
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        gpu = cfg.train.device_offset + local
        if gpu >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} + train.device_offset "
                               f"{cfg.train.device_offset} = GPU {gpu}, but only "
                               f"{torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # less memory, much slower: freed activations go back to the kernel (host_memory.py)
        if cfg.train.cpu_malloc == "fixed" and fix_mmap_threshold():
            log.info("train.cpu_malloc=fixed: glibc's mmap threshold fixed at 128 KiB")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        # DeepSpeed would bind the group to GPU LOCAL_RANK; with train.device_offset the
        # rank's GPU is offset + LOCAL_RANK, so we create the group bound to it ourselves.
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = restart_store(world)
        if store is not None:
            kwargs["store"] = store
        # While one group's trainers rejoin a restarted teacher (up to link.reconnect_seconds),
        # the other ranks wait in the step's all-reduce: that wait must not time out first.
        timeout = timedelta(seconds=max(1800.0, cfg.link.reconnect_seconds + 600.0))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    # DeepSpeed's communication backend probes every op for compatibility (compiler runs) and
    # JIT-builds its shared-memory all-reduce, used only by its inference all-reduce: never by
    # training. Skipped: the build costs half a minute on a fresh CPU machine, and its lock
    # file, left by a rank killed while holding it, would hang every later start in silence.
    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    n = cfg.link.trainers_per_group
    if cfg.link.mode == "service" and cfg.train.stage != "sft" and world % n:
        raise RuntimeError(f"{world} trainer ranks do not split into groups of "
                           f"link.trainers_per_group={n}")
    return Place(rank, world, local, device, rank // n, rank % n)


def restart_store(world: int) -> dist.Store | None:
    """The process group's store under torchrun: the agent's, keyed by restart attempt.

    torchrun keeps one TCP store for all its restarts (``--max-restarts``), and a process
    group's keys (Gloo's peer addresses, NCCL's unique id) carry no attempt in their names:
    the ranks of a restart would read the addresses of the ranks that died and fail to
    connect. A prefix per attempt gives every restart a clean key space."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # not torchrun's agent store: a new store per start anyway
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"llama2rwkv/attempt-{attempt}", store)


def build_student(cfg: Config, device: torch.device):
    """The student of ``cfg.student``: a previous stage's export (``init_from``) loaded, or the
    teacher's weights converted (``shared.student.convert_teacher``)."""
    from transformers import AutoModelForCausalLM

    from shared.compiling import compile_decoder_layers, resolve_compile_mode
    from shared.student import convert_teacher, load_student
    from shared.student.ops import fla_available

    if cfg.student.init_from:
        student = load_student(cfg.student.init_from, dtype=torch.float32)
        log.info("student loaded from %s", cfg.student.init_from)
    else:
        path = Path(cfg.teacher.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"teacher.model_path={cfg.teacher.model_path!r} holds no "
                                    "config.json: the student is converted from it")
        teacher = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, trust_remote_code=cfg.teacher.trust_remote_code)
        student = convert_teacher(teacher, cfg.student)
        del teacher
        log.info("student converted from %s: layers %s -> %s (%s)", path,
                 student.converted_layers, cfg.student.mixer, cfg.student.mode)
    student.set_rwkv_kernel(cfg.student.kernel)
    student.model.packed_layout = cfg.student.packed_layout
    # Only the converted layers are recomputed (the documented behaviour): HF's
    # gradient_checkpointing_enable() would also recompute every kept attention layer.
    student.config.rwkv_gradient_checkpointing = cfg.student.grad_checkpointing
    mode = resolve_compile_mode(cfg.train.compile, device)
    if mode != "off":
        fla_available()  # loaded before tracing: compiled layers read it as a constant
        compiled = compile_decoder_layers(student.model.layers, mode, device)
        log.info("student: %d decoder layers compiled (train.compile %s: %s)", compiled,
                 cfg.train.compile, mode)
    return student


def select_trainable(student, cfg: Config) -> list[str]:
    """Freeze everything but what the stage trains; return the trainable names."""
    from shared.student.param_groups import trainable_names

    names = trainable_names(student, cfg.train.stage, cfg.train.trainable)
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    if not names:
        raise RuntimeError("no parameter to train: student.layers converts no layer")
    return sorted(names)


def deepspeed_config(cfg: Config, device: torch.device, world_size: int) -> dict:
    """The JSON file's ZeRO settings, completed with the values our config owns."""
    ds = check_deepspeed_json(cfg)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    autocast = bool(ds.get("torch_autocast", {}).get("enabled"))
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    ds.setdefault("optimizer", {"type": "AdamW", "params": {
        "lr": cfg.train.lr_init, "betas": [0.9, 0.99], "eps": 1e-8,
        "weight_decay": cfg.train.weight_decay,
        # torch's AdamW needs no JIT-compiled op; CPU offload uses DeepSpeedCPUAdam. On a GPU
        # its fused kernel: the foreach form spent 58 ms of a 0.30 s student step at the 8B
        # layer shapes (BENCHMARKS.md, student MFU).
        "torch_adam": not offload, **({"fused": True} if device.type == "cuda" and not offload
                                       else {})}})
    if autocast:
        # fp32 weights, bf16 autocast on GPUs (fp32 on CPUs, as everywhere else)
        ds["torch_autocast"] = {**ds["torch_autocast"], "enabled": device.type == "cuda"}
    # bf16 weights on GPUs unless the JSON autocasts; the JSON's other bf16 options stay
    # (zero1/zero2.json turn check_grad_overflow off: train.deepspeed_config's doc says why).
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": device.type == "cuda" and not autocast}
    if loop_clips(ds):
        ds["gradient_clipping"] = 0.0   # train_step clips (clipped_parameters says why)
    return ds


def loop_clips(ds: dict) -> bool:
    """Whether train_step clips the gradients itself: on a stage-0 engine without bf16 (fp32
    weights: configs/deepspeed/zero0.json) DeepSpeed clips with a Python loop of per-tensor
    norms and multiplies, and returns no norm; torch's foreach clipping is a handful of kernels
    and gives the norm the trainer reports."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return stage == 0 and not ds.get("bf16", {}).get("enabled")


def clipped_parameters(engine) -> list[torch.nn.Parameter] | None:
    """The parameters train_step clips (``loop_clips``), or None where DeepSpeed does."""
    if not loop_clips(engine.config):   # the completed JSON deepspeed_config gave it
        return None
    return [p for p in engine.module.parameters() if p.requires_grad]


def init_engine(objective: torch.nn.Module, cfg: Config, place: Place):
    import deepspeed

    from shared.student.param_groups import param_groups

    ds = deepspeed_config(cfg, place.device, place.world_size)
    # DeepSpeed puts the model on GPU LOCAL_RANK unless told otherwise; with
    # train.device_offset the rank's GPU is offset + LOCAL_RANK.
    args = SimpleNamespace(device_rank=place.device.index) if place.device.type == "cuda" else None
    groups = param_groups(objective, cfg.train.weight_decay, cfg.train.time_decay_lr_scale)
    engine, _, _, _ = deepspeed.initialize(args=args, model=objective, model_parameters=groups,
                                           config=copy.deepcopy(ds))
    if loop_clips(ds) and place.world_size == 1:
        # stage 0 averages gradients over one rank by flattening them, an all-reduce and a
        # copy back per tensor: host work and kernels for an identity
        engine.enable_backward_allreduce = False
    return engine


def teacher_source(cfg: Config, place: Place, fingerprint: str, vocab_size: int,
                   on_reconnect: Callable[[float], None] | None = None):
    """The link client of this rank's group, or an in-process teacher. ``on_reconnect(seconds)``
    runs after the link rejoined a restarted teacher (metrics)."""
    from shared.link import InProcessTeacher, TeacherClient, TeacherModel

    if cfg.train.stage == "sft":
        return None
    if cfg.link.mode == "in_process":
        tcfg = copy.deepcopy(cfg.teacher)
        tcfg.device = place.device.type
        tcfg.device_id = place.device.index or 0
        teacher = TeacherModel.load(tcfg)
        if teacher.fingerprint.tokenizer != fingerprint:
            raise RuntimeError("the in-process teacher's tokenizer differs from the student's")
        return InProcessTeacher(teacher, cfg.teacher.max_tokens_per_request)
    client = TeacherClient(cfg.link, place.group, place.index_in_group, place.device,
                           fingerprint, vocab_size, on_reconnect=on_reconnect)
    client.connect()
    return client


def in_process_teacher_flops(teacher, request) -> Callable[[float], float] | None:
    """Per-token forward FLOPs of a teacher that runs on this rank's device, as a function of
    the attention span (shared/flops.py); None for a teacher service: its FLOPs are done on
    another device."""
    from shared.flops import teacher_step_flops
    from shared.link import InProcessTeacher

    if not isinstance(teacher, InProcessTeacher) or request is None:
        return None
    terms = teacher_step_flops(teacher.teacher.model)
    logits = request.logits != "none"
    deepest = max(request.hidden_layers, default=0)  # the teacher stops after this state
    return lambda span: terms.per_token(span, deepest, logits)
