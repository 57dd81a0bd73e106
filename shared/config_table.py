"""The README's config table, made from the schema in shared/config.py: every key, its type (a
bounded number with its bound), its default and the docstring under it.
``python -m shared.config_table`` prints it; tests/test_config.py checks README against it."""
from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from shared.config import Bound, Config


def type_text(hint: Any, written: str) -> str:
    """The type column of the config table: the type as written, a bounded number as its
    base type and bound (``float > 0``)."""
    if get_origin(hint) is Annotated:
        base, *marks = get_args(hint)
        bounds = " ".join(str(m) for m in marks if isinstance(m, Bound))
        return f"{base.__name__} {bounds}".strip()
    return written


def documented_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every key: the README's config table is made from it
    (``python -m shared.config_table`` prints it)."""
    import ast
    import inspect

    rows = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        tree = ast.parse(inspect.getsource(cls))
        docs: dict[str, str] = {}
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = nxt.value.value  # type: ignore[attr-defined]
        defaults = cls()
        hints = get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            rows.append((f"{section.name}.{f.name}", type_text(hints[f.name], str(f.type)),
                         getattr(defaults, f.name), docs.get(f.name, "")))
    return rows


def markdown_table() -> str:
    """The README's config table."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, doc in documented_keys():
        kind = kind.replace(" | ", " or ")  # a pipe would end the cell
        lines.append(f"| `{key}` | {kind} | `{default}` | {' '.join(doc.split())} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
