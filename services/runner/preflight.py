"""Pre-flight checks of a plan against this host, before anything starts.

What would stop the stack early and can be told now: a read-only bind mount whose host path
is missing, and a teacher model directory without a ``config.json``. ``up`` runs them (and
creates the writable mount directories), ``check`` runs only them.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .render import Plan


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def teacher_model_paths(plan: Plan) -> dict[str, Path]:
    """Host path of the teacher model each program loads (--teacher.model_path, else config)."""
    found: dict[str, Path] = {}
    for p in plan.programs:
        value = _flag_value(p.argv, "--teacher.model_path")
        if value is None:
            config = _flag_value(p.argv, "--config")
            if not config:
                continue
            cfg_path = Path(config) if Path(config).is_absolute() else Path(p.directory) / config
            try:
                doc = yaml.safe_load(cfg_path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue  # the service reports its own config errors
            value = str((doc.get("teacher") or {}).get("model_path") or "")
            if not value:
                continue
        path = Path(value)
        found[p.name] = path if path.is_absolute() else Path(p.directory) / path
    return found


def preflight(plan: Plan, create: bool = False) -> list[str]:
    """Problems that would stop the stack early; with ``create``, make writable mount dirs."""
    problems: list[str] = []
    for name, mounts in plan.mounts.items():
        for m in mounts:
            if m.kind == "volume":
                if create:
                    (plan.run_dir / "volumes" / m.source).mkdir(parents=True, exist_ok=True)
                continue
            if Path(m.source).exists():
                continue
            if m.read_only:
                problems.append(f"{name}: {m.source} (mounted at {m.target}) does not exist")
            elif create:
                Path(m.source).mkdir(parents=True, exist_ok=True)
    for name, path in teacher_model_paths(plan).items():
        if not (path / "config.json").is_file():
            problems.append(
                f"{name}: the teacher model {path} has no config.json - MODELS_DIR must hold "
                f"the configured teacher (TEACHER_MODEL) as a Hugging Face model directory")
    return sorted(set(problems))
