"""The config schema: typed keys, clear errors naming the key, CLI overrides, documented keys."""
from pathlib import Path

import pytest

from shared.config import ConfigError, documented_keys, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed():
    cfg = load_config(None, ["--student.layers", "0,2", "--train.lr_init=3e-4",
                             "--link.prefetch", "false", "--student.layers", "1,3"])
    assert cfg.student.layers == [1, 3] and cfg.train.lr_init == 3e-4 and cfg.link.prefetch is False


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
