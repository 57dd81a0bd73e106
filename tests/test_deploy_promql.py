"""Every PromQL expression of the dashboard and the alert rules parses (promtool) and uses only
metric names the services export (shared/metrics.py), DCGM's, or Prometheus's ``up``.

Also: the dashboard is raw JSON bound to the provisioned datasource uid (no ``${DS_...}``
placeholders), it has the panels the deployment promises, and Prometheus scrapes every port
the compose files give the services.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "distill.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
PROMETHEUS_METRICS = {"up"}  # written by Prometheus itself for every scrape target

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2", "start", "end",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}


def exported_metric_names() -> set[str]:
    """Sample names (with _total/_bucket/_sum/_count) the services' registries expose."""
    from shared.metrics import TeacherMetrics, TrainerMetrics

    names: set[str] = set()
    for registry in (TeacherMetrics(0).registry, TrainerMetrics(0).registry):
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (vector selectors)."""
    if "__name__" in expr:
        raise AssertionError(f"selects by __name__, which this check cannot follow: {expr}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)                                      # matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                                     # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ",
                  text)                                                         # label lists
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", text)        # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        if word.lower() in _KEYWORDS:
            continue
        if re.match(r"\s*\(", text[m.end():]):
            continue  # a function call
        names.add(word)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"]
            for r in g["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    return dashboard_exprs() + alert_exprs()


def test_metric_name_extraction():
    assert metric_names('sum by (group, le) (rate(distill_teacher_forward_seconds_bucket'
                        '{group=~"0|1"}[5m]))') == {"distill_teacher_forward_seconds_bucket"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m]))) / "
                        "on(rank) group_left(component) y > 0.5") == {"x_bucket", "y"}
    assert metric_names('up{job="teacher"} == 0 or absent(foo)') == {"up", "foo"}


def test_every_expression_uses_only_exported_metrics():
    allowed = exported_metric_names() | DCGM_METRICS | PROMETHEUS_METRICS
    assert "distill_teacher_tokens_total" in allowed and "distill_trainer_loss" in allowed
    unknown = {}
    for where, expr in all_exprs():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        bad = names - allowed
        if bad:
            unknown[where] = sorted(bad)
    assert not unknown, f"metrics not exported by shared/metrics.py (or DCGM): {unknown}"


def test_every_expression_parses_with_promtool(tmp_path: Path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool not found (Debian package prometheus); install the CI tools "
                    "with: bash .ci/install_tools.sh")
    rules = [{"record": f"check:expr_{i}", "expr": expr}
             for i, (_, expr) in enumerate(all_exprs())]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


def test_dashboard_uses_the_provisioned_datasource_uid():
    uids = set()
    for f in DATASOURCES.glob("*.yaml"):
        for ds in yaml.safe_load(f.read_text())["datasources"]:
            uids.add(ds["uid"])
    assert len(uids) == 1
    (uid,) = uids
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in text, "export-for-sharing placeholders"
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]


def test_dashboard_has_the_promised_panels():
    exprs = {}
    for title, expr in dashboard_exprs():
        exprs.setdefault(title, []).append(re.sub(r"\s+", "", expr))
    joined = "\n".join(e for v in exprs.values() for e in v)
    # Busy share and teacher-wait share exactly as specified.
    assert "rate(distill_teacher_forward_seconds_sum[1m])" in joined
    assert ("sumby(rank)(rate(distill_trainer_teacher_wait_seconds_sum[1m]))"
            "/sumby(rank)(rate(distill_trainer_step_seconds_sum[1m]))") in joined
    for metric in ("distill_teacher_tokens_total", "distill_teacher_forward_seconds_bucket",
                   "distill_teacher_transfer_seconds_sum", "distill_trainer_step_seconds",
                   "distill_trainer_loss", "distill_trainer_learning_rate",
                   "distill_trainer_tokens_total", "distill_trainer_val_loss",
                   "distill_trainer_teacher_reconnects_total",
                   "distill_trainer_teacher_reconnect_seconds_total",
                   "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"):
        assert metric in joined, metric
    assert "histogram_quantile(0.5," in joined and "histogram_quantile(0.95," in joined
    losses = " ".join(exprs["Losses"])
    for component in ("align", "kl", "ce"):
        assert component in losses
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def _compose_ports(compose: Path, variables: dict[str, str] | None = None) -> set[int]:
    """Metrics ports compose gives the services: teacher base+group, trainer base+rank
    (``${VAR:-N}`` is ``variables[VAR]``, else N)."""
    doc = yaml.safe_load(compose.read_text())
    ports: set[int] = set()
    for svc in doc["services"].values():
        cmd = [str(c) for c in svc.get("command") or []]

        def flag(name: str, cmd: list[str] = cmd) -> str | None:
            return cmd[cmd.index(name) + 1] if name in cmd else None

        if "services.teacher" in cmd:
            ports.add(int(flag("--teacher.metrics_port")) + int(flag("--group")))
        if "services.trainer" in cmd:
            nproc = re.sub(r"\$\{([A-Z_]+):-(\d+)\}",
                           lambda m: (variables or {}).get(m.group(1), m.group(2)),
                           flag("--nproc-per-node"))
            base = int(flag("--train.metrics_port"))
            ports.update(range(base, base + int(nproc)))
    return ports


@pytest.mark.parametrize("compose,prom,env_file", [
    ("compose.yaml", "prometheus.yml", None),
    ("compose.demo.yaml", "prometheus.demo.yml", None),
    ("compose.yaml", "prometheus.cpu.yml", "deploy/cpu.env"),  # + compose.cpu.yaml (make up-cpu)
])
def test_prometheus_scrapes_every_service_port(compose: str, prom: str, env_file: str | None):
    from services.runner.compose import parse_dotenv

    variables = parse_dotenv((ROOT / env_file).read_text(), {}.get) if env_file else {}
    if env_file:
        assert variables["PROMETHEUS_CONFIG"] == prom
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / prom).read_text())
    jobs = {}
    for job in config["scrape_configs"]:
        jobs[job["job_name"]] = {int(t.rsplit(":", 1)[1]) for sc in job["static_configs"]
                                 for t in sc["targets"]}
    scraped = jobs.get("teacher", set()) | jobs.get("trainer", set())
    assert _compose_ports(ROOT / compose, variables) == scraped
    assert "alerts.yml" in config["rule_files"]
