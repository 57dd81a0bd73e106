"""Import a GGUF checkpoint as a plain Hugging Face directory the teacher service can load.

    python -m services.teacher.gguf --gguf FILE.gguf --output DIR [--dtype bfloat16]
                                    [--no-check] [--force]

transformers' own GGUF loader dequantises the weights (it needs the ``gguf`` and ``accelerate``
packages: ``pip install 'llama2rwkv[gguf]'``); the result is saved as safetensors in ``--dtype``
with the GGUF's tokenizer, chat template and special tokens, and no ``quantization_config``, so a
plain ``from_pretrained(DIR)`` reads it with weights-only loads. The directory is written beside
DIR and renamed into place only once complete and checked.

The check (``--no-check`` skips it): DIR reloaded with plain ``from_pretrained`` must give the
logits of transformers' GGUF-loaded model cast to ``--dtype`` on a few fixed token sequences, both
run on CPU in ``--dtype``. The weights are the same numbers, so the forwards agree to the last
bit on one machine; the tolerance |diff| <= 2^-6 + 2^-7 |ref| (one bf16 rounding step, 2^-7 is
bf16's epsilon) only absorbs a different kernel choice, while a lost config field (rope base,
norm epsilon, tied head) moves logits by whole units. The gap to the float32 dequantised model
is reported beside it (that is what casting to bf16 costs, not an error).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'llama2rwkv[gguf]' (or: pip install gguf==0.19.0 accelerate==1.15.0)"
DTYPES = ("bfloat16", "float16", "float32")
# The check's tolerance, per saved dtype: (absolute, relative to the reference logit).
TOLERANCE = {"bfloat16": (2.0**-6, 2.0**-7), "float16": (2.0**-9, 2.0**-10),
             "float32": (1e-5, 1e-5)}
# GGUF metadata key -> special token name (ids, as llama.cpp's converters write them).
SPECIAL_TOKEN_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token",
                      "tokenizer.ggml.eos_token_id": "eos_token",
                      "tokenizer.ggml.padding_token_id": "pad_token",
                      "tokenizer.ggml.unknown_token_id": "unk_token"}


class GGUFImportError(Exception):
    """A GGUF import that cannot proceed; the message is one line naming the problem and fix."""


@dataclass
class ImportResult:
    output: Path
    architecture: str
    seconds: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float | None = None       # saved vs GGUF model in the saved dtype (the check)
    max_abs_diff_fp32: float | None = None  # saved vs the float32 dequantised model (reported)
    top1_agreement_fp32: float | None = None


def check_file(path: Path) -> None:
    """Missing file or not a GGUF: fail before anything heavy is imported."""
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file (pass --gguf the path of a .gguf file)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (starts with {magic!r}, a GGUF starts "
                              f"with {GGUF_MAGIC!r}); pass a llama.cpp .gguf checkpoint")


def check_dependencies() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFImportError(f"reading GGUF needs the package(s) {', '.join(missing)}: "
                              f"{INSTALL_HINT}")


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's metadata keys (arrays as their lengths), read without touching the tensors."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _names = read_gguf_metadata(str(path))
    except Exception as err:  # a truncated or corrupt file: the reader's own error, in one line
        raise GGUFImportError(f"{path}: unreadable GGUF ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return metadata


def check_architecture(path: Path, metadata: dict[str, Any]) -> str:
    import transformers
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    loadable = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # sections, not archs
    arch = str(metadata.get("general.architecture", ""))
    # transformers renames a few llama.cpp spellings before its own check (qwen2moe, gpt-oss).
    spellings = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe").replace("-", "_")}
    if not (spellings & loadable or is_gguf_arch_supported(arch)):
        raise GGUFImportError(
            f"{path}: transformers {transformers.__version__} cannot load GGUF architecture "
            f"{arch!r} (it loads: {', '.join(sorted(loadable))}); convert "
            f"the original checkpoint instead")
    return arch


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """transformers' GGUF-loaded model (dequantised, float32, CPU) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(**where, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GGUFImportError(f"{path}: transformers cannot load it as a causal LM ({first})"
                              ) from err
    return model.eval(), tokenizer


def fix_special_tokens(tokenizer: PreTrainedTokenizerBase, metadata: dict[str, Any]) -> dict:
    """Set bos/eos/pad/unk to the GGUF's ids; returns {name: id}.

    Why: transformers 5.17's GGUF tokenizer converter takes eos from the bos id (SmolLM2 comes
    out with eos = <|im_start|> instead of <|im_end|>) and drops pad."""
    ids = {}
    for key, name in SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(key)
        if token_id is None or not 0 <= int(token_id) < len(tokenizer):
            continue
        ids[name] = int(token_id)
        setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(int(token_id)))
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return ids


def plain_copy(model: PreTrainedModel, dtype: torch.dtype, token_ids: dict) -> PreTrainedModel:
    """The same weights in a freshly built model whose config carries no quantization_config,
    so nothing of the GGUF quantizer reaches save_pretrained or the saved config.json."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for name, token_id in token_ids.items():
        if name != "unk_token":
            setattr(config, f"{name}_id", token_id)
    config.name_or_path = ""
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in (fresh._tied_weights_keys or ())]:
        raise GGUFImportError(f"the GGUF model's weights do not fit a plain {type(fresh).__name__}"
                              f" (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh.tie_weights()
    fresh.generation_config = GenerationConfig(
        **{f"{name}_id": i for name, i in token_ids.items() if name != "unk_token"})
    return fresh.eval()


def fixed_sequences(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[list[int]]:
    """A tokenised sentence and two seeded random id sequences (the check's inputs)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    text = tokenizer("The capital of France is Paris. 1 + 2 = 3.")["input_ids"][:32]
    randoms = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in (7, 19)]
    return [seq for seq in [text, *randoms] if seq]


def logits_of(model: PreTrainedModel, sequences: list[list[int]]) -> list[torch.Tensor]:
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([seq])).logits[0].float() for seq in sequences]


def verify(saved_dir: Path, reference: list[torch.Tensor], sequences: list[list[int]],
           dtype_name: str) -> float:
    """Reload saved_dir with plain from_pretrained; the worst |diff| against reference."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(saved_dir), trust_remote_code=False)
    got_dtype = str(next(reloaded.parameters()).dtype).removeprefix("torch.")
    if got_dtype != dtype_name:
        raise GGUFImportError(f"check failed: {saved_dir} reloads as {got_dtype}, not "
                              f"{dtype_name}")
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise GGUFImportError(f"check failed: {saved_dir}/config.json keeps a quantization_config")
    atol, rtol = TOLERANCE[dtype_name]
    worst = 0.0
    pairs = zip(logits_of(reloaded, sequences), reference, strict=True)
    for index, (got, want) in enumerate(pairs):
        diff = (got - want).abs()
        worst = max(worst, diff.max().item())
        bad = diff > atol + rtol * want.abs()
        if bad.any():
            pos, tok = (int(i) for i in bad.nonzero()[0])
            raise GGUFImportError(
                f"check failed: sequence {index} position {pos} token {tok}: the saved model's "
                f"logit {got[pos, tok].item():.4f} vs the GGUF model's {want[pos, tok].item():.4f}"
                f" (max |diff| {diff.max().item():.4g} > {atol:g} + {rtol:g}|ref|); {saved_dir} "
                f"is not a faithful copy, report it")
    return worst


def readable(directory: Path) -> None:
    """safetensors writes its file 0600; a teacher container running as another user must read
    it, so every file gets the umask's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def import_gguf(gguf_path: str | Path, output: str | Path, dtype: str = "bfloat16",
                check: bool = True, force: bool = False,
                marker: tuple[str, str] | None = None) -> ImportResult:
    """GGUF -> plain HF directory at output (see the module docstring). ``marker`` (file name,
    text) is written last into the directory, so its presence says the import completed."""
    gguf_path, output = Path(gguf_path).expanduser().resolve(), Path(output).expanduser()
    if dtype not in DTYPES:
        raise GGUFImportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_file(gguf_path)
    if output.exists() and not output.is_dir():
        raise GGUFImportError(f"{output} is a file, not a directory: choose another --output")
    if output.exists() and any(output.iterdir()) and not force:
        raise GGUFImportError(f"{output} exists and is not empty: pass --force to replace it, "
                              f"or choose another --output")
    check_dependencies()
    timer = time.perf_counter()
    import torch

    metadata = read_metadata(gguf_path)
    result = ImportResult(output, check_architecture(gguf_path, metadata))
    model, tokenizer = load_gguf(gguf_path)
    token_ids = fix_special_tokens(tokenizer, metadata)
    sequences = fixed_sequences(tokenizer, model.config.vocab_size)
    reference_fp32 = logits_of(model, sequences) if check else []
    plain = plain_copy(model, getattr(torch, dtype), token_ids)
    del model
    result.seconds["load"] = time.perf_counter() - timer

    timer = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        plain.save_pretrained(str(staging), safe_serialization=True)
        # Byte-level BPE: transformers' WordPiece-style space clean-up would only be ignored
        # with a warning on every load.
        tokenizer.clean_up_tokenization_spaces = False
        tokenizer.save_pretrained(str(staging))
        readable(staging)
        result.seconds["save"] = time.perf_counter() - timer
        if check:
            timer = time.perf_counter()
            reference = logits_of(plain, sequences)
            result.max_abs_diff = verify(staging, reference, sequences, dtype)
            pairs = list(zip(reference, reference_fp32, strict=True))
            result.max_abs_diff_fp32 = max((a - b).abs().max().item() for a, b in pairs)
            result.top1_agreement_fp32 = min((a.argmax(-1) == b.argmax(-1)).float().mean().item()
                                             for a, b in pairs)
            result.seconds["check"] = time.perf_counter() - timer
        if marker is not None:
            (staging / marker[0]).write_text(marker[1])
            readable(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def quiet_progress_bars() -> None:
    """No carriage-return progress bars in a log file (a terminal still gets them). Before
    transformers is imported: its GGUF loader uses plain tqdm, which reads TQDM_DISABLE then."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    quiet_progress_bars()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    parser.add_argument("--output", required=True, help="the HF directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip reloading the saved directory and comparing logits")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        result = import_gguf(args.gguf, args.output, args.dtype, args.check, args.force)
    except GGUFImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(result)
    return 0


def report(result: ImportResult) -> None:
    times = ", ".join(f"{phase} {sec:.1f} s" for phase, sec in result.seconds.items())
    print(f"imported {result.architecture} into {result.output} ({times})")
    if result.max_abs_diff is not None:
        print(f"check passed: reloaded vs GGUF model in the saved dtype, max |logit diff| "
              f"{result.max_abs_diff:.3g}; vs the float32 dequantised model max |diff| "
              f"{result.max_abs_diff_fp32:.3g}, top-1 agreement {result.top1_agreement_fp32:.1%}")


if __name__ == "__main__":
    sys.exit(main())
