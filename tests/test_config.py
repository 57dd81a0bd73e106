"""The config schema: typed keys, clear errors naming the key, CLI overrides, documented keys."""
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config
from shared.config_table import documented_keys

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed():
    cfg = load_config(None, ["--student.layers", "0,2", "--train.lr_init=3e-4",
                             "--link.prefetch", "false", "--student.layers", "1,3"])
    assert cfg.student.layers == [1, 3] and cfg.train.lr_init == 3e-4 and cfg.link.prefetch is False


def test_lists_of_paths_and_numbers_from_the_command_line():
    cfg = load_config(None, ["--data.mix_dirs", "runs/chat, runs/wrap",
                             "--data.mix_weights", "3,1.5"])
    assert cfg.data.mix_dirs == ["runs/chat", "runs/wrap"] and cfg.data.mix_weights == [3.0, 1.5]
    assert load_config(None, ["--data.mix_weights", "2"]).data.mix_weights == [2.0]
    with pytest.raises(ConfigError, match="data.mix_weights: expected a list of numbers"):
        load_config(None, ["--data.mix_weights", "3,x"])


def test_a_bare_off_is_the_word_where_the_choices_are_words(tmp_path):
    # YAML 1.1 reads off as false: `--train.compile off` was refused with "False is not one of"
    assert load_config(None, ["--train.compile", "off"]).train.compile == "off"
    (tmp_path / "c.yaml").write_text("teacher:\n  compile: off\n")
    assert load_config(tmp_path / "c.yaml", []).teacher.compile == "off"
    with pytest.raises(ConfigError, match="train.compile: True is not one of"):
        load_config(None, ["--train.compile", "yes"])   # no "on" among its choices


def test_a_one_item_list_may_be_a_number():
    assert load_config(None, ["--student.layers", "5"]).student.layers == [5]
    with pytest.raises(ConfigError, match="student.layers"):
        load_config(None, ["--student.layers", "true"])


@pytest.mark.parametrize("args,needle", [
    (["--train.lr_iit", "1"], "unknown key 'train.lr_iit'"),
    (["--train.steps", "x"], "train.steps: expected an integer"),
    (["--student.mixer", "rwkv5"], "student.mixer: 'rwkv5' is not one of"),
    (["--nosuch.key", "1"], "unknown key 'nosuch.key'"),
    (["stray"], "unexpected argument"),
])
def test_bad_keys_name_the_key(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, args)


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1]\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_every_key_is_documented_in_the_schema_and_the_readme():
    readme = (ROOT / "README.md").read_text()
    for key, _, _, doc in documented_keys():
        assert doc, f"{key} has no documentation string in shared/config.py"
        assert f"`{key}`" in readme, f"{key} missing from README's config table"


@pytest.mark.parametrize("device,offload,fused", [("cuda", False, True), ("cpu", False, None),
                                                  ("cuda", True, None)])
def test_deepspeed_optimizer_is_fused_on_a_gpu(tmp_path, device, offload, fused):
    import json

    import torch

    from services.trainer.components import deepspeed_config

    ds = {"zero_optimization": {"stage": 1}}
    if offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_config(None, ["--train.deepspeed_config", str(tmp_path / "ds.json")])
    params = deepspeed_config(cfg, torch.device(device), 1)["optimizer"]["params"]
    assert params.get("fused") is fused and params["torch_adam"] is not offload


@pytest.mark.parametrize("json_name,device,autocast,bf16,clip", [
    ("zero0", "cuda", True, False, 0.0), ("zero0", "cpu", False, False, 0.0),
    ("zero1", "cuda", None, True, 0.5), ("zero1", "cpu", None, False, 0.5)])
def test_the_engines_precision_and_who_clips(json_name, device, autocast, bf16, clip):
    """zero0.json: fp32 weights under bf16 autocast on a GPU, fp32 on a CPU, and train_step
    clips (DeepSpeed's own clipping off); ZeRO-1: bf16 weights on a GPU, DeepSpeed clips."""
    import torch

    from services.trainer.components import deepspeed_config, loop_clips

    cfg = load_config(None, ["--train.deepspeed_config", f"configs/deepspeed/{json_name}.json",
                             "--train.grad_clip", "0.5"])
    ds = deepspeed_config(cfg, torch.device(device), 1)
    assert ds.get("torch_autocast", {}).get("enabled") is autocast
    assert ds["bf16"]["enabled"] is bf16 and ds["gradient_clipping"] == clip
    assert loop_clips(ds) is (json_name == "zero0")


@pytest.mark.parametrize("key,value,bound", [
    ("train.lr_init", "-1.0", "> 0"), ("train.lr_init", "0.0", "> 0"),
    ("train.lr_final", "-0.001", ">= 0"), ("train.steps", "0", ">= 1"),
    ("train.grad_accum", "0", ">= 1"), ("data.micro_batch_size", "0", ">= 1"),
    ("data.max_len", "-3", ">= 1"), ("train.warmup_steps", "-1", ">= 0"),
    ("train.temperature", "0.0", "> 0"), ("train.kl_weight", "-0.5", ">= 0"),
    ("link.timeout_seconds", "0.0", "> 0"), ("link.heartbeat_seconds", "-2.0", "> 0"),
    ("train.metrics_port", "65536", "in 0..65535"), ("teacher.metrics_port", "-1", "in 0..65535"),
    ("link.top_k", "0", ">= 1"), ("train.checkpoint_every", "0", ">= 1"),
    ("train.log_every", "0", ">= 1"), ("train.lr_init", ".nan", "> 0"),
])
def test_out_of_range_values_name_the_key_and_the_bound(key, value, bound):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"--{key}", value])
    shown = repr(__import__("yaml").safe_load(value))
    assert str(err.value) == f"command line: {key}: {shown} must be {bound}"


def test_bounds_hold_for_yaml_files_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_init: -1.0\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: train.lr_init: -1.0 must be > 0$"):
        load_config(bad)


def test_values_on_a_bound_pass():
    cfg = load_config(None, ["--train.lr_final", "0", "--train.warmup_steps", "0",
                             "--train.steps", "1", "--train.metrics_port", "0",
                             "--link.reconnect_seconds", "0", "--teacher.metrics_port", "65535"])
    assert (cfg.train.lr_final, cfg.train.steps, cfg.train.metrics_port) == (0.0, 1, 0)


def test_every_numeric_key_has_a_bound_shown_in_the_table():
    from shared.config_table import markdown_table

    for key, kind, default, _ in documented_keys():
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert kind.split()[0] in ("int", "float") and len(kind.split()) > 1, (key, kind)
    assert "| `train.lr_init` | float > 0 | `0.0001` |" in markdown_table()


def test_the_cross_key_checks_of_the_inputs_stay(tmp_path):
    # the DeepSpeed JSON against the config: a check across keys and files, in inputs.py
    import json

    from services.trainer.inputs import check_deepspeed_json

    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    cfg = load_config(None, ["--train.deepspeed_config", str(tmp_path / "ds.json"),
                             "--data.micro_batch_size", "2"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 but "
                                         "data.micro_batch_size=2"):
        check_deepspeed_json(cfg)
