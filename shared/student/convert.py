"""Build a hybrid RWKV student from a Llama-family teacher, and save / load it.

The student is created on the meta device and materialised once on the teacher's device and
dtype, so converting an 8B teacher needs memory for one extra model, not two random inits.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from shared.config import StudentConfig
from shared.student.base_model import base_classes
from shared.student.configuration import RWKVHybridConfig, validate_hybrid_settings
from shared.student.layers import RWKV_MODULES
from shared.student.modeling import RWKVDecoderLayer, RWKVHybridForCausalLM, RWKVHybridModel
from shared.student.remote_code import collect_remote_code

# Project modules outside shared.student that an export's code may carry: configuration.py reads
# the student's options from their one definition, shared.config.StudentConfig (stdlib + PyYAML).
_VENDORED = ("shared.config",)


def student_options(options: StudentConfig | Mapping[str, Any] | None) -> StudentConfig:
    """The conversion's options as ``shared.config.StudentConfig`` (the one definition of them):
    given as one, as a mapping of its keys, or ``None`` for the defaults."""
    if options is None:
        return StudentConfig()
    if isinstance(options, StudentConfig):
        return options
    if isinstance(options, Mapping):
        names = [f.name for f in dataclasses.fields(StudentConfig)]
        unknown = set(options) - set(names)
        if unknown:
            raise ValueError(f"unknown student option(s) {sorted(unknown)}; the keys of "
                             f"shared.config.StudentConfig are {names}")
        return StudentConfig(**options)
    raise TypeError(f"student options must be a shared.config.StudentConfig or a mapping of its "
                    f"keys, got {type(options).__name__}")


def _decoder_layers(teacher: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(teacher).__name__} is not a Llama-family causal LM (no "
                         "model.layers); pass e.g. a LlamaForCausalLM / Qwen2ForCausalLM / "
                         "Qwen3ForCausalLM / MistralForCausalLM")
    return layers


def _kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _check_teacher(teacher: PreTrainedModel, spec: StudentConfig, tokenizer: Any) -> None:
    cfg = teacher.config
    heads, kv_heads, hidden = cfg.num_attention_heads, _kv_heads(cfg), cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    expected = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
                "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}
    for idx, layer in enumerate(_decoder_layers(teacher)):
        attn = getattr(layer, "self_attn", None)
        for name, shape in expected.items():
            weight = getattr(getattr(attn, name, None), "weight", None)
            if weight is None or tuple(weight.shape) != shape:
                got = None if weight is None else tuple(weight.shape)
                raise ValueError(f"teacher layer {idx} self_attn.{name}.weight has shape {got}, "
                                 f"expected {shape} from its config (heads={heads}, "
                                 f"kv_heads={kv_heads}, head_dim={head_dim}); fix the config or "
                                 "the checkpoint so they agree")
        needed = ["mlp", "input_layernorm", "post_attention_layernorm"]
        if spec.ffn == "rwkv_cmix":
            needed += ["mlp.up_proj", "mlp.down_proj"]
        missing = [n for n in needed if not _has(layer, n)]
        if missing:
            raise ValueError(f"teacher layer {idx} lacks {missing}: not a Llama-family decoder "
                             "layer")
    vocab = teacher.get_input_embeddings().weight.shape[0]
    if vocab != cfg.vocab_size:
        raise ValueError(f"teacher embedding has {vocab} rows but "
                         f"config.vocab_size={cfg.vocab_size}; fix the config (or call "
                         "resize_token_embeddings) first")
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's embedding "
                         f"only {vocab} rows; use the teacher's own tokenizer or resize the "
                         "teacher's embeddings first")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _student_config(teacher: PreTrainedModel, spec: StudentConfig) -> RWKVHybridConfig:
    attn, mlp = _decoder_layers(teacher)[0].self_attn, _decoder_layers(teacher)[0].mlp
    up = getattr(mlp, "up_proj", None)
    untie = {"tie_word_embeddings": False} if spec.untie_embeddings else {}
    return RWKVHybridConfig.from_base_config(
        teacher.config, spec,
        rwkv_qkv_bias=attn.q_proj.bias is not None, rwkv_o_bias=attn.o_proj.bias is not None,
        rwkv_mlp_bias=up is not None and up.bias is not None, **untie)


def _rename(name: str, mode: str, ffn: str) -> str | None:
    """Teacher name (relative to a converted layer) -> student name; None: not copied as-is."""
    if name.startswith("self_attn."):
        return None  # replaced by the RWKV time-mix (q/k/v/o copied separately)
    if mode == "attention_only":
        return name
    head, _, rest = name.partition(".")
    if head == "mlp":
        return f"ffn.{rest}" if ffn == "mlp" else None  # cmix takes up/down_proj separately
    head = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}.get(head, head)
    return f"{head}.{rest}" if rest else head


def _repeat_kv(t: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """GQA: query head h reads key/value head h // (heads // kv_heads), as transformers'
    repeat_kv."""
    per_head = t.reshape(kv_heads, -1, *t.shape[1:])
    return per_head.repeat_interleave(heads // kv_heads, dim=0).reshape(-1, *t.shape[1:])


@torch.no_grad()
def _copy_mixer(layer: RWKVDecoderLayer, teacher_layer: nn.Module, heads: int,
                kv_heads: int) -> None:
    attn, mixer = teacher_layer.self_attn, layer.mixer
    for src, dst, repeat in (("q_proj", "receptance", False), ("k_proj", "key", True),
                             ("v_proj", "value", True), ("o_proj", "output", False)):
        s, d = getattr(attn, src), getattr(mixer, dst)
        for p in ("weight", "bias"):
            t = getattr(s, p)
            if t is not None:
                getattr(d, p).copy_(_repeat_kv(t, kv_heads, heads) if repeat else t)
    if isinstance(layer.ffn_module, RWKV_MODULES):
        for src, dst in (("up_proj", "key"), ("down_proj", "value")):
            s, d = getattr(teacher_layer.mlp, src), getattr(layer.ffn_module, dst)
            for p in ("weight", "bias"):
                if getattr(s, p) is not None:
                    getattr(d, p).copy_(getattr(s, p))


def convert_teacher(teacher: PreTrainedModel, spec: StudentConfig | Mapping[str, Any] | None = None,
                    *, tokenizer: Any = None) -> RWKVHybridForCausalLM:
    """Convert ``teacher`` into a hybrid student (the teacher is left untouched).

    ``spec``: ``shared.config.StudentConfig`` or a dict of its keys (``init_from`` must be empty:
    an export is loaded with ``load_student``). Raises ``ValueError`` on an unknown
    mixer/mode/ffn, a layer index out of range, a tokenizer larger than the embedding, or weights
    whose shapes disagree with the teacher's config.
    """
    spec = student_options(spec)
    if spec.init_from:
        raise ValueError(f"init_from={spec.init_from!r} names an exported student: load it with "
                         "load_student; convert_teacher builds a student from the teacher")
    num_layers = teacher.config.num_hidden_layers
    layers = list(range(num_layers)) if spec.layers == "all" else spec.layers
    if isinstance(layers, str) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"layers must be 'all' or a list of ints, got {spec.layers!r}")
    validate_hybrid_settings(spec.mixer, spec.mode, spec.ffn, list(layers), num_layers)
    if not layers:
        raise ValueError("no layer to convert: give at least one layer index (or 'all')")
    base_classes(teacher.config.model_type)  # clear error for unsupported architectures
    _check_teacher(teacher, spec, tokenizer)
    config = _student_config(teacher, dataclasses.replace(spec, layers=sorted(set(layers))))

    ref = teacher.get_input_embeddings().weight
    default_dtype = torch.get_default_dtype()
    try:  # build on meta in the teacher's dtype, then allocate once on the teacher's device
        torch.set_default_dtype(ref.dtype)
        with torch.device("meta"):
            student = RWKVHybridForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    student.to_empty(device=ref.device)

    filled: set[str] = set()
    teacher_state = dict(teacher.state_dict(keep_vars=True))
    student_params = dict(student.named_parameters())
    converted = set(config.rwkv_layers)
    with torch.no_grad():
        for name, tensor in teacher_state.items():
            target = name
            parts = name.split(".")
            if name.startswith("model.layers.") and int(parts[2]) in converted:
                rel = _rename(".".join(parts[3:]), config.rwkv_mode, config.rwkv_ffn)
                if rel is None:
                    continue
                target = ".".join(parts[:3] + [rel])
            if target in student_params:
                student_params[target].copy_(tensor)
                filled.add(target)
        teacher_buffers = dict(teacher.named_buffers())
        for name, buf in student.named_buffers():  # non-persistent buffers (rotary inv_freq...)
            if name not in teacher_buffers:
                raise RuntimeError(f"student buffer {name} has no counterpart in the teacher (bug)")
            buf.copy_(teacher_buffers[name])
        kv_heads = _kv_heads(teacher.config)
        for idx in config.rwkv_layers:
            layer = student.model.layers[idx]
            for mname, module in layer.named_modules():
                if isinstance(module, RWKV_MODULES):  # RWKV-LM init for this layer index
                    module.reset_parameters()
                    filled.update(f"model.layers.{idx}.{mname}.{p}"
                                  for p, _ in module.named_parameters())
            _copy_mixer(layer, _decoder_layers(teacher)[idx], config.num_attention_heads, kv_heads)
    if config.tie_word_embeddings:
        student.tie_weights()
        filled.add("lm_head.weight")
    elif "lm_head.weight" not in filled:  # untie_embeddings: the head starts as the embedding
        with torch.no_grad():
            student.lm_head.weight.copy_(teacher.get_input_embeddings().weight)
        filled.add("lm_head.weight")
    missing = sorted(set(student_params) - filled)
    if missing:
        raise RuntimeError(f"conversion left parameters uninitialised (bug): {missing[:8]}")
    if getattr(teacher, "generation_config", None) is not None:
        generation = teacher.generation_config
        student.generation_config = type(generation).from_dict(generation.to_dict())
    return student.train(teacher.training)


def save_student(model: RWKVHybridForCausalLM, tokenizer: Any, output_dir: str | Path) -> Path:
    """Write config.json, safetensors weights, generation config, (if given) the tokenizer, and
    the student's modeling code with an ``auto_map`` in config.json, so that
    ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the export in a
    process that has never imported this project (``shared.student.remote_code``). The code is
    collected before anything is written: an export whose code could not load is refused."""
    code = collect_remote_code(
        {"AutoConfig": RWKVHybridConfig, "AutoModel": RWKVHybridModel,
         "AutoModelForCausalLM": RWKVHybridForCausalLM},
        package=__package__, model_type=RWKVHybridConfig.model_type, vendored=_VENDORED)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    code.write(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = code.auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_student(path: str | Path, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None) -> RWKVHybridForCausalLM:
    """Load a student saved by ``save_student`` (as ``AutoModelForCausalLM.from_pretrained``)."""
    model = RWKVHybridForCausalLM.from_pretrained(str(path),
                                                  dtype=dtype if dtype is not None else "auto")
    if device is not None:
        model = model.to(device)
    return model
