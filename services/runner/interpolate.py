"""Compose's variable interpolation and its ``.env`` (dotenv) syntax.

Interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``, ``${VAR+alt}``, nesting, ``$$``.
Values come from a ``lookup(name)`` callable that returns None for an unset variable; the
precedence of the sources (``--env``, process environment, ``.env``) is the caller's
(:meth:`.compose.Project.lookup`).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import ComposeError

Lookup = Callable[[str], "str | None"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --------------------------------------------------------------------------- interpolation
def interpolate(text: str, lookup: Lookup, where: str = "") -> str:
    """Substitute variables in ``text`` as compose does; ``lookup(name)`` is None when unset."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        if i + 1 < n and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if i + 1 < n and text[i + 1] == "{":
            end = _matching_brace(text, i + 1)
            if end < 0:
                raise ComposeError(f"{where}: unclosed '${{' in {text!r}")
            out.append(_expand_braced(text[i + 2:end], lookup, where))
            i = end + 1
            continue
        m = _NAME.match(text, i + 1)
        if m:
            value = lookup(m.group(0))
            out.append(value if value is not None else "")
            i = m.end()
            continue
        out.append("$")
        i += 1
    return "".join(out)


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _expand_braced(body: str, lookup: Lookup, where: str) -> str:
    m = _NAME.match(body)
    if not m:
        raise ComposeError(f"{where}: invalid interpolation '${{{body}}}'")
    name, rest = m.group(0), body[m.end():]
    value = lookup(name)
    if rest == "":
        return value if value is not None else ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            word = rest[len(op):]
            break
    else:
        raise ComposeError(f"{where}: invalid interpolation '${{{body}}}'")
    missing = value is None or (op.startswith(":") and value == "")
    if op in (":-", "-"):
        return interpolate(word, lookup, where) if missing else value  # type: ignore[return-value]
    if op in (":+", "+"):
        return "" if missing else interpolate(word, lookup, where)
    if missing:  # ":?" / "?"
        message = interpolate(word, lookup, where) or "is not set"
        raise ComposeError(f"required variable {name} is missing a value: {message}")
    return value  # type: ignore[return-value]


def interpolate_tree(node: Any, lookup: Lookup, where: str = "") -> Any:
    """Interpolate every string value (not mapping keys) of a YAML tree."""
    if isinstance(node, str):
        return interpolate(node, lookup, where)
    if isinstance(node, list):
        return [interpolate_tree(v, lookup, where) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, lookup, f"{where}.{k}" if where else str(k))
                for k, v in node.items()}
    return node


# --------------------------------------------------------------------------- dotenv
def parse_dotenv(text: str, lookup: Lookup | None = None, where: str = ".env") -> dict[str, str]:
    """Parse compose's dotenv syntax.

    ``KEY=VALUE`` lines (optionally ``export KEY=VALUE``); ``#`` comment lines; unquoted values
    end at `` #`` and are trimmed; ``'single'`` quotes are literal; ``"double"`` quotes take
    ``\\n \\t \\" \\\\`` escapes. Unquoted and double-quoted values are interpolated from the
    variables defined above them in the file, then from ``lookup``.
    """
    values: dict[str, str] = {}

    def look(name: str) -> str | None:
        if name in values:
            return values[name]
        return lookup(name) if lookup else None

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        if "=" not in line:
            raise ComposeError(f"{where}:{lineno}: expected KEY=VALUE, got {raw!r}")
        key, value = line.split("=", 1)
        key = key.strip()
        if not _NAME.fullmatch(key):
            raise ComposeError(f"{where}:{lineno}: invalid variable name {key!r}")
        value = value.strip()
        if value.startswith("'"):
            end = value.find("'", 1)
            if end < 0:
                raise ComposeError(f"{where}:{lineno}: unterminated single quote")
            values[key] = value[1:end]
        elif value.startswith('"'):
            chars, j = [], 1
            while j < len(value) and value[j] != '"':
                if value[j] == "\\" and j + 1 < len(value):
                    chars.append({"n": "\n", "t": "\t", "r": "\r"}.get(value[j + 1], value[j + 1]))
                    j += 2
                    continue
                chars.append(value[j])
                j += 1
            if j >= len(value):
                raise ComposeError(f"{where}:{lineno}: unterminated double quote")
            values[key] = interpolate("".join(chars), look, f"{where}:{lineno}")
        else:
            cut = re.search(r"\s#", value)
            if cut:
                value = value[:cut.start()].rstrip()
            values[key] = interpolate(value, look, f"{where}:{lineno}")
    return values
