"""Load the teacher and the exported students, after checking that they can be compared.

Every check reads only config.json and the tokenizer files, so a wrong directory fails in
seconds, before any weights are read. The teacher loads with ``trust_remote_code`` off; the
students load through ``shared.student`` (imported here, it registers ``rwkv_hybrid`` with
``AutoModelForCausalLM``), so an export's own remote code is never run either.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.evaluate.heldout import EvaluateError

STUDENT_MODEL_TYPE = "rwkv_hybrid"


@dataclass
class Model:
    """A loaded model under the name it has in the report."""

    name: str
    path: str
    role: str                     # teacher | student
    module: torch.nn.Module

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluateError(f"--device {device} but no CUDA device is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _config(path: Path, flag: str) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise EvaluateError(f"{flag} {path}: not a Hugging Face model directory (no config.json)")
    return json.loads(file.read_text())


def _fingerprint(path: Path) -> str | None:
    from shared.fingerprint import tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(path)
    except FileNotFoundError:
        return None  # no tokenizer saved beside the weights: the vocabulary size still checks


def check_teacher(path: str | Path) -> dict[str, Any]:
    """The teacher's config; a clear error when the directory is no model or has no tokenizer."""
    root = Path(path)
    config = _config(root, "--teacher")
    if _fingerprint(root) is None:
        raise EvaluateError(f"--teacher {root}: no tokenizer files beside the model; every set is "
                            "tokenised with the teacher's tokenizer, save it there")
    return config


def check_student(path: str | Path, teacher_dir: str | Path,
                  teacher_config: dict[str, Any]) -> dict[str, Any]:
    """The student's config, after checking that it is an export sharing the teacher's vocab."""
    root = Path(path)
    config = _config(root, "--student")
    if config.get("model_type") != STUDENT_MODEL_TYPE:
        raise EvaluateError(f"--student {root}: not an exported student (config.json has "
                            f"model_type {config.get('model_type')!r}, an export has "
                            f"{STUDENT_MODEL_TYPE!r}); pass a directory written by save_student "
                            "or the trainer's export, or the model as --teacher")
    vocab, teacher_vocab = config.get("vocab_size"), teacher_config.get("vocab_size")
    if vocab != teacher_vocab:
        raise EvaluateError(f"vocabulary mismatch: student {root} has vocab_size {vocab}, teacher "
                            f"{teacher_dir} has {teacher_vocab}; every model must share the "
                            "teacher's tokenizer")
    mine, theirs = _fingerprint(root), _fingerprint(Path(teacher_dir))
    if mine is not None and mine != theirs:
        raise EvaluateError(f"tokenizer mismatch: student {root} (fingerprint {mine}) and teacher "
                            f"{teacher_dir} (fingerprint {theirs}) encode text differently; "
                            "every model must share the teacher's tokenizer")
    return config


def load_tokenizer(path: str | Path, teacher_config: dict[str, Any]) -> Any:
    """The teacher's tokenizer (everyone's), checked against the teacher's vocabulary size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    rows = teacher_config.get("vocab_size")
    if rows is not None and len(tokenizer) > rows:
        raise EvaluateError(f"--teacher {path}: its tokenizer has {len(tokenizer)} tokens but the "
                            f"model only {rows} (vocab_size); the tokenizer is not the model's")
    return tokenizer


def load_teacher(path: str | Path, device: torch.device, dtype: torch.dtype,
                 name: str = "teacher") -> Model:
    """The teacher model (``trust_remote_code`` off)."""
    from transformers import AutoModelForCausalLM

    import shared.student  # noqa: F401 - a student export may be the reference model too

    module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                  trust_remote_code=False).to(device).eval()
    return Model(name, str(path), "teacher", module)


def load_student(path: str | Path, device: torch.device, dtype: torch.dtype,
                 name: str) -> Model:
    """An exported student, as ``AutoModelForCausalLM.from_pretrained`` loads it."""
    from transformers import AutoModelForCausalLM

    import shared.student  # noqa: F401 - registers rwkv_hybrid with the Auto classes

    module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                  trust_remote_code=False).to(device).eval()
    return Model(name, str(path), "student", module)


def unique_names(names: list[str]) -> list[str]:
    """Report names, made unique by a ``-2``, ``-3`` suffix where two models share one."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out
