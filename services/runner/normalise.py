"""The normalised form of a compose service, and the normalisers of the spec's alternatives.

Compose accepts several spellings of the same thing: a command as a string or a list,
``environment`` and ``depends_on`` as a list or a mapping, durations as ``1m30s`` or a
number. This module turns each into one form (:class:`Service`, :class:`Mount`,
:class:`Healthcheck`, lists and dicts of strings); :class:`.compose.Project` applies them to
the interpolated service.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from .errors import ComposeError
from .interpolate import Lookup

# --------------------------------------------------------------------------- durations
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")


def parse_duration(value: Any, default: float) -> float:
    """Compose durations (``1m30s``, ``500ms``, ``10s``) in seconds; numbers are seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    pos, total = 0, 0.0
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * scale[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ComposeError(f"invalid duration {value!r}")
    return total


# --------------------------------------------------------------------------- normalised parts
@dataclass
class Mount:
    target: str
    source: str          # host path (bind) or volume name (volume)
    kind: str            # "bind" | "volume"
    read_only: bool = False


@dataclass
class Healthcheck:
    test: list[str]      # ["CMD", ...] or ["CMD-SHELL", "..."]
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0
    start_interval: float = 5.0


@dataclass
class Service:
    """One service, interpolated and normalised."""

    name: str
    raw: dict[str, Any]
    image: str | None
    builds: bool                       # has a build: section (our image)
    entrypoint: list[str] | None
    command: list[str] | None
    environment: dict[str, str]        # env_file values, then environment (wins)
    mounts: list[Mount]
    working_dir: str | None
    restart: str
    stop_grace_period: float
    healthcheck: Healthcheck | None
    depends_on: dict[str, str]         # name -> condition
    profiles: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str] | None:
        """What the container runs besides the image's defaults: entrypoint + command."""
        if self.entrypoint is not None:
            return list(self.entrypoint) + list(self.command or [])
        return list(self.command) if self.command is not None else None


def as_argv(value: Any, what: str) -> list[str] | None:
    """``command``/``entrypoint``: a string is shell-split, a list taken item by item."""
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [scalar(v) for v in value]
    raise ComposeError(f"{what}: expected a string or a list")


def scalar(value: Any) -> str:
    """A YAML scalar as the string compose passes on (``true``/``false``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def normalise_environment(value: Any, lookup: Lookup) -> dict[str, str]:
    """``environment`` as a dict; ``KEY`` without a value takes it from ``lookup`` if set."""
    env: dict[str, str] = {}
    if value is None:
        return env
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for entry in value:
            key, sep, val = str(entry).partition("=")
            items.append((key, val if sep else None))
    else:
        raise ComposeError("environment: expected a list or a mapping")
    for key, val in items:
        if val is None:
            found = lookup(str(key))
            if found is not None:
                env[str(key)] = found
        else:
            env[str(key)] = scalar(val)
    return env


def normalise_depends_on(value: Any) -> dict[str, str]:
    """``depends_on`` as name -> condition; the list form means ``service_started``."""
    if value is None:
        return {}
    if isinstance(value, list):
        return {str(v): "service_started" for v in value}
    if isinstance(value, dict):
        return {str(k): str((v or {}).get("condition", "service_started"))
                for k, v in value.items()}
    raise ComposeError("depends_on: expected a list or a mapping")


def as_list(value: Any) -> list[Any]:
    """A field that takes one value or a list of them (``env_file``), as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
