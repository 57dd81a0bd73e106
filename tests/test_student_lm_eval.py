"""lm-evaluation-harness runs on an export (``--model hf``, ``trust_remote_code=True``) in an
interpreter that cannot import this project, on a local multiple-choice task (a task YAML with
``dataset_path: json``); its log-likelihoods are the in-project model's.

lm-eval is not one of the project's dependencies: install it with
``.venv/bin/pip install lm-eval==0.4.13 -c constraints.txt`` (docs/student.md, "Loading an export
elsewhere"); without it this module is skipped.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.student import convert_teacher, load_student, save_student
from test_student_remote_code import SITE_PACKAGES

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(900)]
if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("lm-eval is not installed (.venv/bin/pip install lm-eval==0.4.13 -c "
                "constraints.txt)", allow_module_level=True)

WORDS = ["red", "green", "blue", "cat", "dog", "fox", "one", "two", "three", "sun"]
# lm_eval's CLI, in an interpreter started with -I -S: site-packages is appended by hand, so the
# project's editable install (a .pth file) is not on the path.
RUN_LM_EVAL = textwrap.dedent("""\
    import importlib.util, sys
    sys.path.extend(sys.argv.pop(1).split(":"))
    assert importlib.util.find_spec("shared") is None, "the project is importable: test void"
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "lm_eval"
    sys.exit(cli_evaluate())
    """)


def _task(task_dir: Path, docs: int) -> None:
    task_dir.mkdir()
    data = task_dir / "tiny_choice.jsonl"
    data.write_text("".join(
        json.dumps({"question": f"The {WORDS[i % 10]} word is",
                    "choices": [WORDS[(i + j) % 10] for j in range(3)], "answer": i % 3}) + "\n"
        for i in range(docs)))
    (task_dir / "tiny_choice.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as lm-eval's HF model does (whole string, no
    special tokens; the continuation is what the context's tokens do not cover)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n = len(whole) - len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0, :-1]
    rows = torch.arange(len(whole) - 1 - n, len(whole) - 1)
    return logprobs[rows, ids[0, -n:]].sum().item()


def test_lm_eval_harness_evaluates_an_export(tiny_llama, tmp_path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    export = save_student(convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7"),
                                          tokenizer=tokenizer).eval(),
                          tokenizer, tmp_path / "export")
    _task(tmp_path / "task", docs=24)
    (tmp_path / "run_lm_eval.py").write_text(RUN_LM_EVAL)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-I", "-S", str(tmp_path / "run_lm_eval.py"),
           SITE_PACKAGES,
           "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
           "--tasks", "tiny_choice", "--include_path", str(tmp_path / "task"),
           "--device", "cpu", "--limit", "20", "--batch_size", "4",
           "--output_path", str(tmp_path / "results"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results_file] = (tmp_path / "results").glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]["tiny_choice"]
    assert results["sample_len"] == 20
    [samples_file] = (tmp_path / "results").glob("*/samples_tiny_choice_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 20

    model = load_student(export).eval()
    correct = 0
    for sample in samples:
        got = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [_loglikelihood(model, tokenizer, a["arg_0"], a["arg_1"])
                    for a in sample["arguments"].values()]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4), sample["doc"]
        correct += max(range(len(got)), key=got.__getitem__) == sample["doc"]["answer"]
    assert results["acc,none"] == pytest.approx(correct / 20)
