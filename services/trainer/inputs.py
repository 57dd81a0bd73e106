"""Bad input, found before anything is built: each check names the problem and the fix.

The trainer runs :func:`check_inputs` first, so a wrong path, a dataset made for another
model or a DeepSpeed JSON that disagrees with the config is a one-line error within seconds,
not a stack trace after the model loaded. What only the teacher knows (its vocabulary and
tokenizer as served, its group size) the link checks when the trainer joins, right after.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Config
from shared.fingerprint import tokenizer_fingerprint

log = logging.getLogger("trainer")

# DeepSpeed keys whose value the trainer config owns: (JSON path, config key, value).
OWNED = (
    (("train_micro_batch_size_per_gpu",), "data.micro_batch_size"),
    (("gradient_accumulation_steps",), "train.grad_accum"),
    (("gradient_clipping",), "train.grad_clip"),
    (("optimizer", "params", "lr"), "train.lr_init"),
    (("optimizer", "params", "weight_decay"), "train.weight_decay"),
)


def tokenizer_dir(cfg: Config) -> Path:
    """The student's tokenizer: the one of student.init_from, else the teacher's."""
    return Path(cfg.student.init_from or cfg.teacher.model_path)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model directory, a student export's too, without running its code.

    shared.student is imported first: an export's config.json names ``model_type: rwkv_hybrid``,
    which AutoConfig knows only once that package has registered it; before, AutoTokenizer fell
    back to a bare config and every stage that loads an export logged transformers' "You are
    using a model of type `rwkv_hybrid` to instantiate a model of type ``" (2026-12-02)."""
    from transformers import AutoTokenizer

    import shared.student  # noqa: F401 - registers rwkv_hybrid with AutoConfig

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def model_config(path: str, key: str, why: str) -> dict[str, Any]:
    """config.json of the model directory ``path`` (config key ``key``), or a clear error."""
    p = Path(path)
    if not path or not p.exists():
        raise FileNotFoundError(f"{key}={path!r} does not exist: {why}; point it at a local "
                                "Hugging Face model directory (config.json, weights, tokenizer)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key}={path!r} is not a model directory (no config.json): "
                                f"{why}; point it at the directory that holds config.json")
    return json.loads((p / "config.json").read_text())


@dataclass
class Inputs:
    """What the checks learned: the student's tokenizer fingerprint and vocabulary size."""

    fingerprint: str
    vocab_size: int


def check_inputs(cfg: Config) -> Inputs:
    """Every input the trainer can check alone, before anything is built."""
    from shared.data_card import check_tokenizer_fingerprint

    if cfg.train.lr_schedule == "time" and not cfg.train.time_limit_seconds:
        raise ValueError("train.lr_schedule: time decays the learning rate over "
                         "train.time_limit_seconds, which is 0 (no limit): set "
                         "train.time_limit_seconds, or train.lr_schedule: steps")
    uses_teacher = cfg.train.stage != "sft"
    teacher = None
    if cfg.student.init_from:
        student = model_config(cfg.student.init_from, "student.init_from",
                               "the student is loaded from it")
        if uses_teacher and cfg.teacher.model_path:
            teacher = model_config(cfg.teacher.model_path, "teacher.model_path",
                                   "the teacher's limits are read from it")
    else:
        teacher = student = model_config(cfg.teacher.model_path, "teacher.model_path",
                                         "the student is converted from the teacher's model")
    fingerprint = tokenizer_fingerprint(tokenizer_dir(cfg))
    check_mix(cfg)
    for data_dir in (cfg.data.train_dir, *cfg.data.mix_dirs):
        card = check_tokenizer_fingerprint(data_dir, fingerprint, "the student")
        samples = card["splits"].get("train", {}).get("samples", 0)
        if not samples:
            raise ValueError(f"dataset {data_dir} holds no training samples (splits: "
                             f"{ {k: v.get('samples') for k, v in card['splits'].items()} }): "
                             "the data command found nothing to keep; check its inputs "
                             f"({card.get('command')}) and its 'samples out' line")
        if int(card.get("max_len") or 0) > cfg.data.max_len:
            log.warning("dataset %s holds rows of up to %s tokens: they are cut to "
                        "data.max_len=%d", data_dir, card["max_len"], cfg.data.max_len)
        if teacher is not None and uses_teacher:
            check_teacher_limits(cfg, card, teacher, student, data_dir)
    check_deepspeed_json(cfg)
    return Inputs(fingerprint, int(student["vocab_size"]))


def check_mix(cfg: Config) -> None:
    """data.mix_weights: one positive share per dataset (train_dir, then data.mix_dirs)."""
    weights, datasets = cfg.data.mix_weights, 1 + len(cfg.data.mix_dirs)
    if weights and len(weights) != datasets:
        raise ValueError(f"data.mix_weights has {len(weights)} entries for {datasets} datasets "
                         "(data.train_dir, then each of data.mix_dirs): give one per dataset, "
                         "or none for equal shares")
    if any(w <= 0 for w in weights):
        raise ValueError(f"data.mix_weights {weights}: every share must be positive (leave a "
                         "dataset out of data.mix_dirs instead of weighting it 0)")


def check_teacher_limits(cfg: Config, card: dict, teacher: dict, student: dict,
                         data_dir: str) -> None:
    """The data and the student must fit the teacher: positions, request size, vocabulary."""
    longest = min(int(card.get("max_len") or 0), cfg.data.max_len)  # longer rows are cut
    positions = int(teacher.get("max_position_embeddings") or 0)
    if positions and longest > positions:
        raise ValueError(f"dataset {data_dir} holds sequences of up to {longest} "
                         f"tokens, longer than the teacher's limit of {positions} positions "
                         f"(max_position_embeddings of {cfg.teacher.model_path}): prepare the "
                         f"data again with --max_len {positions} or less")
    tokens = cfg.data.micro_batch_size * longest
    if tokens > cfg.teacher.max_tokens_per_request:
        raise ValueError(f"a micro batch of {cfg.data.micro_batch_size} × {longest} tokens = "
                         f"{tokens} exceeds teacher.max_tokens_per_request="
                         f"{cfg.teacher.max_tokens_per_request}: lower data.micro_batch_size, "
                         "prepare shorter sequences, or raise the teacher's limit")
    if student.get("vocab_size") != teacher.get("vocab_size"):
        raise ValueError(f"the student ({cfg.student.init_from}) has a vocabulary of "
                         f"{student.get('vocab_size')} entries, the teacher "
                         f"({cfg.teacher.model_path}) {teacher.get('vocab_size')}: distillation "
                         "compares them token by token; use a student.init_from exported from "
                         "this teacher, or the teacher it was made from")


def _get(doc: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def check_deepspeed_json(cfg: Config) -> dict:
    """The DeepSpeed JSON, refused where it contradicts the trainer config (which owns batch
    sizes, clipping, the optimizer's learning rate and weight decay, and the schedule)."""
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config={path} does not exist (see "
                                "configs/deepspeed/)")
    try:
        ds = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"train.deepspeed_config={path} is not valid JSON: {err}") from None
    problems = []
    for json_path, key in OWNED:
        have = _get(ds, json_path)
        section, name = key.split(".")
        want = getattr(getattr(cfg, section), name)
        if have is not None and have != want:
            problems.append(f"{'.'.join(json_path)}={have!r} but {key}={want!r}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    total = cfg.data.micro_batch_size * cfg.train.grad_accum * world
    if ds.get("train_batch_size") not in (None, total):
        problems.append(f"train_batch_size={ds['train_batch_size']!r} but data.micro_batch_size"
                        f" × train.grad_accum × {world} ranks = {total}")
    if "scheduler" in ds:
        problems.append("a scheduler, but the trainer sets the learning rate of every step "
                        "(train.lr_init, lr_final, warmup_steps)")
    if _get(ds, ("fp16", "enabled")):
        problems.append("fp16.enabled, but the trainer runs bf16 on GPUs and fp32 on CPUs")
    if problems:
        raise ValueError(f"train.deepspeed_config={path} contradicts the trainer config: "
                         + "; ".join(problems) + ". The trainer config owns these: remove "
                         "them from the JSON (set the trainer's keys instead)")
    return ds
