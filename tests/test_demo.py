"""``make demo`` end to end on CPU with the tiny teacher (``--teacher tiny``: the offline path;
the real teacher's demo is tests/test_demo_real.py), and a real Prometheus (Debian's) checked
against it.

One demo run (``python -m demo`` with a small step count, ``--keep-up``) serves the module: the
summary it writes, the student it exports, and its Prometheus, which stays up (with the
teacher) until the fixture's ``runner down``. Against that Prometheus every PromQL
expression of the Grafana dashboard and of the alert rules must return data, and
deploy/render_dashboard.py must draw every panel from it.

Needs Debian's prometheus on PATH (``bash .ci/install_tools.sh`` or ``apt-get install
prometheus``) and the free ports 9400, 9500 and 9501 of compose.demo.yaml. About 1.5 minutes
on an idle 2 cores (the trainer builds no DeepSpeed op: services/trainer/components.py).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, service_env
from deploy import render_dashboard
from services.data import c4_sample

DEMO_STEPS = 24           # per stage: mid-run validation at 12, final at 24
TEACHER_STEPS = 100
DEMO_TIMEOUT = 1200         # a hang guard: 3-4 min idle, 13 min seen on a machine at load 10
COMPOSE_DEMO = ROOT / "compose.demo.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "distill.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Panels that cannot have data here, each with the reason. Nothing else may be left out.
NO_DATA_PANELS = {
    "GPU utilisation": "DCGM exporter (compose profile dcgm) needs an NVIDIA GPU; CI has none",
    "GPU memory used": "DCGM exporter (compose profile dcgm) needs an NVIDIA GPU; CI has none",
}
COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*-?\d+(\.\d+)?([eE][+-]?\d+)?\s*$")


def prometheus_missing() -> str:
    return ("Debian's prometheus is not on PATH: install it with `bash "
            ".ci/install_tools.sh` (or `sudo apt-get install prometheus`)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo once; yield (run dir, demo-summary.json, output); always runner down."""
    if shutil.which("prometheus") is None:
        pytest.fail(prometheus_missing())
    run_dir = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "demo", "--teacher", "tiny", "--run-dir", str(run_dir),
           "--steps", str(DEMO_STEPS), "--teacher-steps", str(TEACHER_STEPS), "--keep-up",
           "--no-install", "--prometheus-port", str(free_port())]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=service_env(), capture_output=True, text=True,
                              timeout=DEMO_TIMEOUT)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"demo failed ({done.returncode}):\n{out[-8000:]}"
        summary = json.loads((run_dir / "demo-summary.json").read_text())
        yield run_dir, summary, out
    finally:
        subprocess.run([sys.executable, "-m", "services.runner", "down", "-f", str(COMPOSE_DEMO),
                        "--run-dir", str(run_dir / "stack")], cwd=ROOT, env=service_env(),
                       capture_output=True, timeout=180)


# --------------------------------------------------------------------------- the demo itself


def test_demo_trains_both_stages_and_prints_the_summary(demo):
    run_dir, summary, out = demo
    for text in ("llama2rwkv demo: summary", "tokens/s", "teacher wait", "KL(teacher ‖ student)",
                 "Student (HF format):", "Service logs:",
                 f"Prometheus:          {summary['prometheus_url']}", "Greedy generation",
                 "still up"):
        assert text in out, text
    stages = summary["stages"]
    assert list(stages) == ["align", "kd"]
    for name, s in stages.items():
        assert s["steps"] == DEMO_STEPS, name
        assert s["tokens"] > 0 and s["tokens_per_second"] > 0, name
        assert 0.0 <= s["teacher_wait_share"] < 1.0, name
        assert Path(s["student"], "config.json").is_file(), name
        for key in ("val_first", "val_last"):
            assert math.isfinite(s[key]["kl"]) and s[key]["kl"] >= 0, (name, key)
            assert math.isfinite(s[key]["student_loss"]), (name, key)
    assert stages["align"]["train_first"]["align"] > stages["align"]["train_last"]["align"]
    kl = summary["kl"]
    for key in ("align_val_first", "align_val_last", "kd_val_first", "kd_val_last",
                "kd_train_first", "kd_train_last"):
        assert kl[key] is not None and math.isfinite(kl[key]) and kl[key] > 0, key
    # align then kd brings the student closer to the teacher on held-out text
    assert kl["kd_val_last"] < kl["align_val_first"], kl
    # kd started from align's export (--student.init_from), in its own run directory
    trainer_log = (run_dir / "stack" / "logs" / "trainer.log").read_text()
    assert f"student loaded from {stages['align']['student']}" in trainer_log
    assert Path(stages["kd"]["student"]) == run_dir / "runs" / "kd" / "student"
    # the teacher learned something before being distilled
    stamp = json.loads((run_dir / "models" / "tiny-llama" / "demo_pretraining.json").read_text())
    assert stamp["steps"] == TEACHER_STEPS and stamp["last_loss"] < stamp["first_loss"] - 1.0


def test_exported_student_loads_and_generates_what_the_demo_printed(demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shared.student  # noqa: F401 - registers rwkv_hybrid
    from shared.student import HybridRWKVCache, RWKVHybridForCausalLM

    _, summary, _ = demo
    gen = summary["generation"]
    assert gen["student"]["text"].strip(), gen
    assert gen["student"]["tokens"] == gen["max_new_tokens"] or gen["student"]["tokens"] > 0
    assert gen["student"]["cache"] == "HybridRWKVCache"
    assert gen["student"]["rwkv_state_bytes"] > 0 and gen["student"]["rwkv_layers"] == [1, 3]
    path = summary["stages"]["kd"]["student"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert isinstance(model, RWKVHybridForCausalLM)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(gen["prompt"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=gen["max_new_tokens"], do_sample=False,
                             use_cache=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)
    assert isinstance(out.past_key_values, HybridRWKVCache)
    text = tok.decode(out.sequences[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == gen["student"]["text"]


def test_c4_sample_has_the_c4_layout(demo):
    run_dir, _, _ = demo
    en = run_dir / "c4" / "en"
    assert sorted(p.name for p in en.iterdir()) == sorted(
        ["c4-train.00000-of-01024.json.gz", "c4-validation.00000-of-00008.json.gz"])
    for name in en.iterdir():
        with gzip.open(name, "rt") as f:
            rows = [json.loads(line) for line in f]
        assert rows, name
        for row in rows:
            assert set(row) == {"text", "timestamp", "url"}
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["timestamp"])
            assert row["url"].startswith("file:///usr/share/")
            assert len(row["text"]) >= c4_sample.DOC_MIN
    card = json.loads((run_dir / "data" / "card.json").read_text())
    assert card["subcommand"] == "c4" and card["splits"]["validation"]["samples"] > 0


def test_strip_roff():
    page = "\n".join([
        '.\\" a comment',
        '.TH GZIP 1 local',
        '.SH NAME',
        'gzip \\- compress \\fBfiles\\fR',
        '.PP',
        'The',
        '.B gzip',
        'command uses \\(lqLZ77\\(rq.',
        '.IP "\\(bu" 2m',
        'one item',
    ])
    text = c4_sample.strip_roff(page)
    assert "comment" not in text and ".TH" not in text and "\\f" not in text
    assert "gzip - compress files" in text and '"LZ77"' in text
    assert "The\ngzip\ncommand" in text and "2m" not in text and "• " not in text
    assert c4_sample.strip_roff(".so man1/other.1\n") == ""


# --------------------------------------------------------------------------- Prometheus


def _prom(summary) -> str:
    url = summary["prometheus_url"]
    assert url, f"the demo ran without Prometheus: {summary.get('prometheus_note')}"
    return url


def _trainer_up_until(prom: str, summary) -> float:
    """The last moment both kd trainer ranks were scraped as up.

    The trainer exits when its run is done (restart: "no"), so the trainer's series go stale
    then; the teacher and Prometheus stay up. Instant queries are evaluated at this moment,
    when every service of the stack was up and scraped. A finished trainer serves its final
    values for ``train.metrics_linger_seconds`` (5 s in configs/demo_*.yaml, more than the
    demo Prometheus' 2 s interval + 2 s timeout), so by then each rank was scraped after its
    last validation: without it, a rank's last scrape could come before its first validation
    of a short stage, and ``distill_trainer_val_loss`` read NaN here (a flake of issue 11).
    """
    start, end = summary["windows"]["kd"]
    series = render_dashboard.query_range(prom, 'count(up{job="trainer"} == 1)', start,
                                          end + 10, 1)
    times = [t for _, points in series for t, v in points if v == 2]
    assert times, "Prometheus never saw both trainer ranks up during the kd stage"
    return max(times)


def _panels() -> list[dict]:
    """Every panel of the dashboard JSON, those inside collapsed rows included."""
    return [p for top in json.loads(DASHBOARD.read_text())["panels"]
            for p in (top, *top.get("panels", []))]


def _dashboard_exprs() -> list[tuple[str, str]]:
    exprs = []
    for panel in _panels():
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    return exprs


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_only_the_dcgm_panels_are_left_out():
    dcgm = {title for title, expr in _dashboard_exprs() if "DCGM_" in expr}
    assert dcgm == set(NO_DATA_PANELS), "NO_DATA_PANELS must list exactly the GPU panels"


def test_every_dashboard_expression_returns_data(demo):
    _, summary, _ = demo
    prom = _prom(summary)
    at = _trainer_up_until(prom, summary)
    ups = render_dashboard.query(prom, "up", at)
    assert sorted((s["job"], v) for s, v in ups) == [("teacher", 1.0), ("trainer", 1.0),
                                                     ("trainer", 1.0)], ups
    empty, checked = [], 0
    for title, expr in _dashboard_exprs():
        if title in NO_DATA_PANELS:
            continue
        result = render_dashboard.query(prom, expr, at)
        checked += 1
        if not any(math.isfinite(v) for _, v in result):
            empty.append(f"{title}: {expr} -> {result}")
    assert checked >= 15
    assert not empty, f"no data at t={at:.0f}:\n" + "\n".join(empty)


def test_every_alert_rule_is_loaded_and_its_metrics_return_data(demo):
    """An alert's expression is empty while the stack is healthy ("teacher down" is
    ``up{job="teacher"} == 0``), so emptiness proves nothing: what must return data is the
    expression without its final comparison, i.e. the metric the alert watches. The rules
    themselves must be loaded by the demo's Prometheus and evaluate without error."""
    _, summary, _ = demo
    prom = _prom(summary)
    at = _trainer_up_until(prom, summary)
    rules = _alert_rules()
    assert len(rules) >= 5
    empty = []
    for rule in rules:
        expr = " ".join(rule["expr"].split())
        watched = COMPARISON.sub("", expr)
        assert watched != expr, f"{rule['alert']}: no final comparison to strip in {expr!r}"
        result = render_dashboard.query(prom, watched, at)
        if not any(math.isfinite(v) for _, v in result):
            empty.append(f"{rule['alert']}: {watched} -> {result}")
    assert not empty, "\n".join(empty)
    # healthy stack: the "down" alerts' conditions do not hold
    for rule in rules:
        if rule["alert"] in ("DistillTeacherDown", "DistillTrainerDown"):
            assert render_dashboard.query(prom, rule["expr"], at) == [], rule["alert"]
    loaded = render_dashboard._get(f"{prom}/api/v1/rules")["groups"]
    health = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
    assert set(health) == {r["alert"] for r in rules}, health
    assert set(health.values()) == {"ok"}, health


# --------------------------------------------------------------------------- dashboard picture


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_dashboard_picture_draws_every_panel(demo, tmp_path):
    run_dir, summary, _ = demo
    prom = _prom(summary)
    start, end = summary["windows"]["align"][0], summary["windows"]["kd"][1] + 5
    out = tmp_path / "dashboard.png"
    # Through its output only (a stand-in for a screenshot): exit status, report line, picture.
    done = subprocess.run([sys.executable, "-m", "deploy.render_dashboard",
                           "--prometheus", prom, f"--start={start}", f"--end={end}",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    titles = [p["title"] for p in _panels() if p["type"] != "row"]
    report = done.stdout.strip().splitlines()[-1]
    assert report.startswith(f"{out}: {len(titles)} panels; no data for: "), report
    assert set(report.split("; no data for: ")[1].split(", ")) == set(NO_DATA_PANELS), report
    width, height = _png_size(out)
    assert width >= 1600 and height >= 1200
    # the demo drew its own, and the repository's picture is one of these
    assert _png_size(run_dir / "dashboard.png")[0] == width
    assert _png_size(ROOT / "docs" / "dashboard.png")[0] >= 1600


def test_render_dashboard_cli_reports_an_unreachable_prometheus(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deploy.render_dashboard",
                           "--prometheus", f"http://127.0.0.1:{free_port()}",
                           "--output", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot reach Prometheus" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_make_demo_target():
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed (apt-get install make)")
    done = subprocess.run([make, "-n", "-f", str(ROOT / "demo.mk"), "demo", "VENV_STAMP=",
                           "DEMO_ARGS=--steps 5"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MAKEFLAGS": ""}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "-m demo --steps 5" in done.stdout


def test_c4_documents_are_sized_like_web_pages():
    paras = [("word " * n).strip() for n in (30, 200, 90, 500, 10, 60, 60, 60)]
    docs = list(c4_sample.documents("\n\n".join(paras)))
    assert docs
    for doc in docs:
        assert c4_sample.DOC_MIN <= len(doc) <= c4_sample.DOC_MAX
