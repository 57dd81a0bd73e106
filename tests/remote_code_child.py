"""Loads an export with ``trust_remote_code=True`` in a process of its own, for
tests/test_student_remote_code.py (not a test module; copied next to the export and run there).

    python -I -S remote_code_child.py MODE SITE_PACKAGES JOBS_JSON

MODE ``fresh``: run with ``-I -S`` from a directory outside the repository, the installed
packages' directories (SITE_PACKAGES, ':'-separated) appended to ``sys.path`` by hand (``-S``
skips their ``.pth`` files, among them the project's editable install), so the project cannot be
imported. MODE ``beside``: a normal interpreter that imports ``shared.student`` first. JOBS_JSON
lists ``{"export", "inputs", "output"}``: for each export, the logits and greedy generation for
the inputs and what it found about the classes go to its output (``torch.save``); the test
compares them. One process for all exports: starting torch and transformers is most of the time.
"""
import importlib.util
import json
import sys

mode, site_packages, jobs_path = sys.argv[1:4]
if mode == "fresh":
    sys.path.extend(site_packages.split(":"))
    if importlib.util.find_spec("shared") is not None:
        raise SystemExit("the project is importable in the fresh interpreter: the test is void")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402

torch.set_num_threads(1)
if mode == "beside":
    import shared.student  # noqa: F401 - registers the in-project classes with the Auto* factories


def run(export_dir: str, inputs_path: str, output_path: str) -> None:
    inputs = torch.load(inputs_path, weights_only=True)
    refused = ""
    if mode == "fresh":  # no stdin: transformers cannot ask, so it must refuse
        try:
            AutoModelForCausalLM.from_pretrained(export_dir)
        except ValueError as err:
            refused = str(err)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    result = {"refused": refused, "class_module": type(model).__module__,
              "config_module": type(AutoConfig.from_pretrained(export_dir,
                                                               trust_remote_code=True)).__module__}
    with torch.no_grad():
        out = model(inputs["ids"], attention_mask=inputs["mask"], use_cache=True)
        result["logits"] = out.logits
        result["cache"] = [type(out.past_key_values).__name__] + [
            type(layer).__name__ for layer in out.past_key_values.layers]
        result["generated"] = model.generate(inputs["ids"], attention_mask=inputs["mask"],
                                             max_new_tokens=6, min_new_tokens=6, do_sample=False)
    if mode == "beside":
        # the export's own classes, loaded next to the project's: they must not displace them
        remote = get_class_from_dynamic_module("modeling_rwkv_hybrid.RWKVHybridForCausalLM",
                                               export_dir)
        remote_model = remote.from_pretrained(export_dir).eval()
        with torch.no_grad():
            result["remote_logits"] = remote_model(inputs["ids"],
                                                   attention_mask=inputs["mask"]).logits
        result["remote_module"] = remote.__module__
        result["after_module"] = type(AutoModelForCausalLM.from_pretrained(export_dir)).__module__
    result["project_modules"] = sorted(m for m in sys.modules if m == "shared"
                                       or m.startswith("shared."))
    torch.save(result, output_path)


with open(jobs_path) as jobs:
    todo = json.load(jobs)
for job in todo:
    run(job["export"], job["inputs"], job["output"])
