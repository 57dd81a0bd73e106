"""Self-contained exports: save_student writes the modeling code and an auto_map, so an export
loads with trust_remote_code=True in a process that cannot import this project; and
shared.student.remote_code refuses, at export time, code that such a process could not load."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.student import RWKVHybridForCausalLM, convert_teacher, load_student, save_student
from shared.student.remote_code import RemoteCodeError, collect_remote_code
from shared.tiny import tiny_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

CHILD = Path(__file__).with_name("remote_code_child.py")
# The installed packages' directories of this interpreter (a venv's, and the system's where the
# venv includes them): the isolated child gets these and nothing else.
SITE_PACKAGES = os.pathsep.join(p for p in sys.path if Path(p).is_dir()
                                and {"site-packages", "dist-packages"} & set(Path(p).parts))


def _export(root: Path, kind: str, spec: dict) -> dict:
    """A converted tiny student saved by save_student, its inputs on disk, and what the
    in-project model gives for them (logits, greedy generation with the RNN-state cache)."""
    torch.manual_seed(0)
    student = convert_teacher(tiny_teacher(kind), spec).eval()
    export = save_student(student, None, root / "export")
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation has it
    ids[0, :2] = 0
    torch.save({"ids": ids, "mask": mask}, root / "inputs.pt")
    with torch.no_grad():
        expected = {"logits": student(ids, attention_mask=mask).logits,
                    "generated": student.generate(ids, attention_mask=mask, max_new_tokens=6,
                                                  min_new_tokens=6, do_sample=False)}
    return {"export": str(export), "inputs": str(root / "inputs.pt"),
            "output": str(root / "got.pt"), "expected": expected}


def _run_child(mode: str, tmp_path: Path, jobs: list[dict]) -> list[dict]:
    """Run remote_code_child.py on the exports; returns what it found for each."""
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps([{k: job[k] for k in ("export", "inputs", "output")}
                                     for job in jobs]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if mode == "fresh":  # isolated: no PYTHON* variables, no cwd or script dir, no .pth files
        script = Path(shutil.copy(CHILD, tmp_path / CHILD.name))
        cmd, cwd = [sys.executable, "-I", "-S", str(script)], tmp_path
    else:
        cmd, cwd = [sys.executable, str(CHILD)], Path(__file__).parents[1]
    proc = subprocess.run(cmd + [mode, SITE_PACKAGES, str(jobs_file)], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(job["output"], weights_only=True) for job in jobs]


SPECS = [("llama", dict(layers=[0, 2], mixer="rwkv6", mode="block", ffn="rwkv_cmix")),
         ("qwen2", dict(layers=[0, 2], mixer="rwkv6", mode="attention_only")),
         ("llama", dict(layers=[0, 2], mixer="rwkv7", mode="attention_only")),
         ("qwen2", dict(layers=[0, 2], mixer="rwkv7", mode="block", ffn="rwkv_cmix"))]


def test_export_loads_where_the_project_cannot_be_imported(tmp_path) -> None:
    """rwkv6 and rwkv7, block and attention_only: one fresh interpreter loads all four."""
    jobs = [_export(tmp_path / str(i), kind, spec) for i, (kind, spec) in enumerate(SPECS)]
    for job in jobs:
        assert json.loads((Path(job["export"]) / "config.json").read_text())["auto_map"] == {
            "AutoConfig": "configuration_rwkv_hybrid.RWKVHybridConfig",
            "AutoModel": "modeling_rwkv_hybrid.RWKVHybridModel",
            "AutoModelForCausalLM": "modeling_rwkv_hybrid.RWKVHybridForCausalLM"}
    for (kind, spec), job, got in zip(SPECS, jobs, _run_child("fresh", tmp_path, jobs),
                                      strict=True):
        case = f"{kind} {spec}"
        assert got["project_modules"] == [], case
        assert "trust_remote_code=True" in got["refused"], case  # not without the user's consent
        assert got["class_module"].startswith("transformers_modules."), case
        assert got["config_module"].startswith("transformers_modules."), case
        # the RNN state for the RWKV layers 0 and 2, a KV cache for the attention layer 1
        assert got["cache"] == ["HybridRWKVCache", "RWKVStateLayer", "DynamicLayer",
                                "RWKVStateLayer"], case
        assert torch.equal(got["logits"], job["expected"]["logits"]), case
        assert torch.equal(got["generated"], job["expected"]["generated"]), case


def test_export_beside_the_project_uses_the_project_classes(tmp_path) -> None:
    """In a process that imported shared.student, trust_remote_code=True still gives the
    project's classes, and the export's own classes load next to them without displacing them."""
    job = _export(tmp_path, "llama", dict(layers=[1], mixer="rwkv7"))
    for loaded in (load_student(job["export"]), AutoModelForCausalLM.from_pretrained(job["export"]),
                   AutoModelForCausalLM.from_pretrained(job["export"], trust_remote_code=True)):
        assert type(loaded) is RWKVHybridForCausalLM
    [got] = _run_child("beside", tmp_path, [job])
    assert got["class_module"] == got["after_module"] == "shared.student.modeling"
    assert got["config_module"] == "shared.student.configuration"
    assert got["remote_module"].startswith("transformers_modules.")
    assert torch.equal(got["logits"], job["expected"]["logits"])
    assert torch.equal(got["remote_logits"], job["expected"]["logits"])
    assert torch.equal(got["generated"], job["expected"]["generated"])


def test_exported_code_is_the_packages_own_with_fla_optional(tmp_path) -> None:
    student = convert_teacher(tiny_teacher("llama"), dict(layers=[0])).eval()
    export = save_student(student, None, tmp_path)
    code = sorted(p.name for p in export.glob("*.py"))
    origins = {p.name: p.read_text().splitlines()[0] for p in export.glob("*.py")}
    assert {"configuration_rwkv_hybrid.py", "modeling_rwkv_hybrid.py", "rwkv_hybrid_layers.py",
            "rwkv_hybrid_cache.py", "rwkv_hybrid_ops.py", "rwkv_hybrid_ops_common.py"} <= set(code)
    assert "shared/student/modeling.py" in origins["modeling_rwkv_hybrid.py"]
    assert "shared/student/ops/__init__.py" in origins["rwkv_hybrid_ops.py"]
    # only what the model classes import: not the converter, the trainer's helpers or __init__
    assert not {"rwkv_hybrid_convert.py", "rwkv_hybrid_param_groups.py", "rwkv_hybrid.py",
                "rwkv_hybrid_remote_code.py"} & set(code)
    for path in export.glob("*.py"):
        absolute = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                    for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Import) or isinstance(n, ast.ImportFrom) and not n.level]
        assert not [m for m in absolute if m.split(".")[0] == "shared"], path.name
    # what transformers' import check demands: no project package, and fla stays optional
    from shared.student import RWKVHybridConfig, RWKVHybridModel
    plan = collect_remote_code({"AutoConfig": RWKVHybridConfig, "AutoModel": RWKVHybridModel},
                               "shared.student", "rwkv_hybrid", vendored=("shared.config",))
    assert {"torch", "transformers"} <= set(plan.requirements)
    assert not {"fla", "shared", "services"} & set(plan.requirements)


# ---- refusals, on a small package of our own --------------------------------------------------

def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _import_fresh(monkeypatch, root: Path, top: str):
    monkeypatch.syspath_prepend(str(root))  # (it also invalidates the import caches)
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, name)
    import importlib

    config = importlib.import_module(f"{top}.model.configuration").Cfg
    model = importlib.import_module(f"{top}.model.modeling").Net
    return {"AutoConfig": config, "AutoModel": model}


BASE = {
    "__init__.py": "",
    "other.py": "VALUE = 1\n",
    "model/__init__.py": "",
    "model/configuration.py": "class Cfg:\n    pass\n",
    "model/util/__init__.py": "from .maths import double\n",
    "model/util/maths.py": "def double(x):\n    return 2 * x\n",
}


def test_flattening_rewrites_relative_and_absolute_imports(tmp_path, monkeypatch) -> None:
    _package(tmp_path / "proj_ok", BASE | {"model/modeling.py": """\
        from proj_ok.model.configuration import Cfg
        from .util import double
        from .util.maths import (
            double as twice,
        )
        try:
            import not_installed_optional_package
        except ImportError:
            pass


        class Net:
            config_class = Cfg

            def forward(self, x):
                from proj_ok.model.util import maths
                return maths.double(double(twice(x)))
        """})
    classes = _import_fresh(monkeypatch, tmp_path, "proj_ok")
    with pytest.raises(RemoteCodeError, match=r"`from proj_ok.model.util import maths` imports "
                                              r"a module"):
        collect_remote_code(classes, "proj_ok.model", "net")

    (tmp_path / "proj_ok/model/modeling.py").write_text(
        (tmp_path / "proj_ok/model/modeling.py").read_text().replace(
            "from proj_ok.model.util import maths\n        return maths.double",
            "from proj_ok.model.util.maths import double as again\n        return again"))
    classes = _import_fresh(monkeypatch, tmp_path, "proj_ok")
    code = collect_remote_code(classes, "proj_ok.model", "net")
    assert set(code.sources) == {"configuration_net.py", "modeling_net.py", "net_util.py",
                                 "net_util_maths.py"}
    modeling = code.sources["modeling_net.py"]
    assert "from .configuration_net import Cfg" in modeling
    assert "from .net_util import double" in modeling
    assert "from .net_util_maths import (" in modeling
    assert "from .net_util_maths import double as again" in modeling
    assert "from .net_util_maths import double" in code.sources["net_util.py"]
    assert code.requirements == ()  # the optional import sits in a try block
    assert code.auto_map == {"AutoConfig": "configuration_net.Cfg", "AutoModel": "modeling_net.Net"}
    code.write(tmp_path / "proj_ok_export")
    # the flat files import as one package, as transformers' loader imports them
    (tmp_path / "proj_ok_export/__init__.py").write_text("")
    import importlib

    net = importlib.import_module("proj_ok_export.modeling_net").Net
    assert net().forward(1) == 8  # 2 * 2 * 2
    assert net.config_class.__module__ == "proj_ok_export.configuration_net"


@pytest.mark.parametrize("modeling,error", [
    ("from proj_bad.other import VALUE\n", r"imports proj_bad.other, a module of this project "
                                           r"outside proj_bad.model"),
    ("from ..other import VALUE\n", r"imports proj_bad.other, a module of this project"),
    ("import proj_bad.model.configuration\n", r"only follows `from proj_bad.model.configuration "
                                              r"import \.\.\.`"),
    ("import importlib\nimportlib.import_module('proj_bad.model.util')\n",
     r"dynamic import of 'proj_bad.model.util'"),
    ('"""Example:\n\nfrom .somewhere import thing\n"""\n', r"would read its relative imports"),
])
def test_code_that_could_not_load_is_refused_at_export(tmp_path, monkeypatch, modeling: str,
                                                       error: str) -> None:
    _package(tmp_path / "proj_bad", BASE | {
        "model/modeling.py": modeling + "from .configuration import Cfg\n\n\nclass Net:\n"
                                        "    config_class = Cfg\n"})
    classes = _import_fresh(monkeypatch, tmp_path, "proj_bad")
    with pytest.raises(RemoteCodeError, match=error):
        collect_remote_code(classes, "proj_bad.model", "net")


def test_refused_export_writes_nothing(tmp_path, monkeypatch) -> None:
    """save_student collects the code before it writes a file."""
    import shared.student.convert as convert

    student = convert_teacher(tiny_teacher("llama"), dict(layers=[0])).eval()
    monkeypatch.setattr(convert, "_VENDORED", ())  # shared.config may no longer be carried
    with pytest.raises(RemoteCodeError, match=r"imports shared.config, a module of this project "
                                              r"outside shared.student"):
        save_student(student, None, tmp_path / "export")
    assert not (tmp_path / "export").exists()
