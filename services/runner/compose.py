"""Read compose files the way Docker Compose does, for the subset of the spec this project uses.

Covered: ``.env`` files (compose's dotenv syntax), variable interpolation (``$VAR``,
``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``,
``${VAR:+alt}``, ``${VAR+alt}``, nesting, ``$$``), YAML anchors and merge keys, several files
merged in order (``-f a.yaml -f b.yaml``), ``environment`` (list or mapping), ``env_file``
(string, list, ``{path, required}``), the ``!reset`` and ``!override`` tags of override files,
``command``/``entrypoint`` (string or list),
``volumes`` (short and long syntax), ``depends_on``, ``healthcheck``, ``restart``,
``stop_grace_period``, ``profiles`` and ``COMPOSE_PROFILES``.

Precedence of interpolation values, as in compose: the ``--env`` overrides of the runner, then
the process environment, then the ``.env`` file.

Only what a service needs is interpolated (:meth:`Project.service`), so a variable that only
Grafana needs (its admin password) does not block a run that leaves Grafana out.

This module owns the project: loading and merging the files, selecting services, and
turning one into a :class:`Service`. The interpolation and dotenv syntax are in
:mod:`.interpolate`, the normalised parts and their parsers in :mod:`.normalise`; their
public names are re-exported here, the runner's one entry point to the compose reader.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ComposeError
from .interpolate import Lookup, interpolate, interpolate_tree, parse_dotenv
from .normalise import (
    Healthcheck,
    Mount,
    Service,
    as_argv,
    as_list,
    normalise_depends_on,
    normalise_environment,
    parse_duration,
    scalar,
)

__all__ = ["ComposeError", "Healthcheck", "Lookup", "Mount", "Project", "Service", "interpolate",
           "interpolate_tree", "normalise_environment", "parse_dotenv", "parse_duration"]


# --------------------------------------------------------------------------- YAML tags
class _Reset:
    """``!reset``: the attribute is removed from what earlier files set."""

    def __repr__(self) -> str:
        return "!reset"

    def __deepcopy__(self, memo: dict) -> _Reset:
        return self  # one marker, compared by identity


RESET = _Reset()


class Override:
    """``!override VALUE``: VALUE replaces what earlier files set instead of merging with it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: safe types plus the ``!reset`` and ``!override`` tags."""


def _construct_tagged(loader: ComposeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override",
                              lambda loader, node: Override(_construct_tagged(loader, node)))


def load_yaml(text: str) -> Any:
    """Parse one compose file (tags kept as markers until the files are merged)."""
    return yaml.load(text, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def _untag(value: Any) -> Any:
    """The value with no markers left: ``!reset`` keys dropped, ``!override`` unwrapped."""
    if isinstance(value, Override):
        return _untag(value.value)
    if isinstance(value, dict):
        return {k: _untag(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_untag(v) for v in value if v is not RESET]
    return value


# --------------------------------------------------------------------------- merging files
def _merge_service(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of one service across files (the subset we need)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is RESET:
            out.pop(key, None)
        elif isinstance(value, Override):
            out[key] = copy.deepcopy(value.value)
        elif key == "environment":
            merged = _env_items(out.get("environment"))
            merged.update(_env_items(value))
            out[key] = merged
        elif key == "depends_on":
            merged_d = {k: {"condition": c} for k, c in normalise_depends_on(out.get(key)).items()}
            merged_d.update({k: {"condition": c} for k, c in normalise_depends_on(value).items()})
            out[key] = merged_d
        elif key == "volumes":
            by_target: dict[str, Any] = {}
            for v in list(out.get("volumes") or []) + list(value or []):
                by_target[_volume_target(v)] = v
            out[key] = list(by_target.values())
        elif key in ("env_file",):
            out[key] = as_list(out.get(key)) + as_list(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "healthcheck":
            out[key] = _deep_merge(out[key], value)
        elif key == "healthcheck" and isinstance(out.get(key), dict) and isinstance(value, dict):
            merged_h = dict(out[key])
            merged_h.update(value)
            out[key] = merged_h
        else:
            out[key] = copy.deepcopy(value)
    return out


def _env_items(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    items: dict[str, Any] = {}
    for entry in value:
        key, sep, val = str(entry).partition("=")
        items[key] = val if sep else None
    return items


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if v is RESET:
            out.pop(k, None)
        elif isinstance(v, Override):
            out[k] = copy.deepcopy(v.value)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _volume_target(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("target", ""))
    parts = str(entry).split(":")
    return parts[1] if len(parts) >= 2 else parts[0]


# --------------------------------------------------------------------------- project
class Project:
    """One or more compose files, merged, with their interpolation environment."""

    def __init__(self, files: list[str | Path], env_files: list[str | Path] | None = None,
                 overrides: Mapping[str, str] | None = None,
                 environ: Mapping[str, str] | None = None,
                 project_dir: str | Path | None = None) -> None:
        if not files:
            raise ComposeError("no compose file given")
        self.files = [Path(f).resolve() for f in files]
        for f in self.files:
            if not f.is_file():
                raise ComposeError(f"compose file not found: {f}")
        self.project_dir = Path(project_dir).resolve() if project_dir else self.files[0].parent
        self.environ = dict(os.environ if environ is None else environ)
        self.overrides = dict(overrides or {})
        if env_files is None:
            default = self.project_dir / ".env"
            env_files = [default] if default.is_file() else []
        self.env_files = [Path(p) for p in env_files]
        self.dotenv: dict[str, str] = {}
        for path in self.env_files:
            if not path.exists():
                raise ComposeError(f"env file not found: {path}")
            self.dotenv.update(parse_dotenv(path.read_text(), self._shell_lookup, str(path)))
        self.data = self._load()
        self.name = str(self.data.get("name") or self.project_dir.name)

    def _shell_lookup(self, name: str) -> str | None:
        if name in self.overrides:
            return self.overrides[name]
        return self.environ.get(name)

    def lookup(self, name: str) -> str | None:
        """Interpolation value of ``name``: --env overrides, process environment, .env."""
        if name in self.overrides:
            return self.overrides[name]
        if name in self.environ:
            return self.environ[name]
        return self.dotenv.get(name)

    def _load(self) -> dict[str, Any]:
        merged: dict[str, Any] = {"services": {}}
        for path in self.files:
            try:
                doc = load_yaml(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ComposeError(f"{path}: {err}") from None
            if not isinstance(doc, dict):
                raise ComposeError(f"{path}: expected a mapping at the top level")
            for key, value in doc.items():
                if key == "services":
                    for name, svc in (value or {}).items():
                        svc = svc or {}
                        base = merged["services"].get(name)
                        merged["services"][name] = (_merge_service(base, svc)
                                                    if base else copy.deepcopy(svc))
                elif value is RESET:
                    merged.pop(key, None)
                elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = _deep_merge(merged[key], value)
                else:
                    merged[key] = copy.deepcopy(value)
        return _untag(merged)

    # ---------------------------------------------------------------- queries
    @property
    def service_names(self) -> list[str]:
        return list(self.data.get("services", {}))

    def raw(self, name: str) -> dict[str, Any]:
        try:
            return self.data["services"][name]
        except KeyError:
            raise ComposeError(f"no service {name!r} (services: {', '.join(self.service_names)})") \
                from None

    def active_profiles(self, profiles: list[str] | None = None) -> set[str]:
        active = set(profiles or [])
        env = self.lookup("COMPOSE_PROFILES")
        if env:
            active.update(p.strip() for p in env.split(",") if p.strip())
        return active

    def select(self, services: list[str] | None = None, profiles: list[str] | None = None,
               with_deps: bool = True) -> list[str]:
        """Services to run, in dependency order (dependencies first), as ``compose up`` would."""
        active = self.active_profiles(profiles)

        def enabled(name: str) -> bool:
            prof = self.raw(name).get("profiles") or []
            return not prof or bool(active.intersection(prof))

        if services:
            wanted = list(services)
            for name in wanted:
                self.raw(name)
        else:
            wanted = [n for n in self.service_names if enabled(n)]
        chosen: list[str] = []
        seen: set[str] = set()

        def visit(name: str, stack: tuple[str, ...]) -> None:
            if name in stack:
                raise ComposeError(f"dependency cycle: {' -> '.join(stack + (name,))}")
            if name in seen:
                return
            if with_deps:
                for dep in normalise_depends_on(self.raw(name).get("depends_on")):
                    visit(dep, stack + (name,))
            seen.add(name)
            chosen.append(name)

        for name in wanted:
            visit(name, ())
        return chosen

    def volume_names(self) -> list[str]:
        return list((self.data.get("volumes") or {}).keys())

    def service(self, name: str) -> Service:
        """Interpolate and normalise one service."""
        raw = interpolate_tree(self.raw(name), self.lookup, f"services.{name}")
        env: dict[str, str] = {}
        for entry in as_list(raw.get("env_file")):
            if isinstance(entry, dict):
                path, required = entry.get("path"), entry.get("required", True)
            else:
                path, required = entry, True
            p = self.resolve_host(str(path))
            if not p.is_file():
                if required:
                    raise ComposeError(f"services.{name}.env_file: {p} not found")
                continue
            env.update(parse_dotenv(p.read_text(), self.lookup, str(p)))
        env.update(normalise_environment(raw.get("environment"), self.lookup))
        health = raw.get("healthcheck")
        healthcheck = None
        if health and not health.get("disable"):
            test = health.get("test")
            if isinstance(test, str):
                test = ["CMD-SHELL", test]
            if test and test[0] != "NONE":
                healthcheck = Healthcheck(
                    test=[scalar(t) for t in test],
                    interval=parse_duration(health.get("interval"), 30.0),
                    timeout=parse_duration(health.get("timeout"), 30.0),
                    retries=int(health.get("retries", 3)),
                    start_period=parse_duration(health.get("start_period"), 0.0),
                    start_interval=parse_duration(health.get("start_interval"), 5.0))
        restart = scalar(raw.get("restart", "no")) or "no"
        return Service(
            name=name, raw=raw, image=raw.get("image"), builds="build" in raw,
            entrypoint=as_argv(raw.get("entrypoint"), f"services.{name}.entrypoint"),
            command=as_argv(raw.get("command"), f"services.{name}.command"),
            environment=env, mounts=[self._mount(v, name) for v in raw.get("volumes") or []],
            working_dir=raw.get("working_dir"), restart=restart,
            stop_grace_period=parse_duration(raw.get("stop_grace_period"), 10.0),
            healthcheck=healthcheck, depends_on=normalise_depends_on(raw.get("depends_on")),
            profiles=list(raw.get("profiles") or []))

    def resolve_host(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.project_dir / p).resolve()

    def _mount(self, entry: Any, service: str) -> Mount:
        if isinstance(entry, dict):
            kind = entry.get("type", "volume")
            source, target = entry.get("source"), entry.get("target")
            read_only = bool(entry.get("read_only", False))
        else:
            parts = str(entry).split(":")
            if len(parts) == 1:
                kind, source, target, read_only = "volume", None, parts[0], False
            else:
                source, target = parts[0], parts[1]
                read_only = len(parts) > 2 and "ro" in parts[2].split(",")
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        if not target:
            raise ComposeError(f"services.{service}.volumes: {entry!r} has no target")
        if kind == "bind":
            if not source:
                raise ComposeError(f"services.{service}.volumes: bind {entry!r} has no source")
            return Mount(str(target), str(self.resolve_host(str(source))), "bind", read_only)
        if kind != "volume":
            raise ComposeError(f"services.{service}.volumes: type {kind!r} is not supported")
        return Mount(str(target), str(source or f"anonymous-{service}-{target.strip('/')}"),
                     "volume", read_only)
