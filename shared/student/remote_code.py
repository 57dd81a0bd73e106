"""Self-contained exports: a package's modeling code, flattened into the export directory.

With ``trust_remote_code=True``, transformers imports the modules that ``config.json``'s
``auto_map`` names from the model directory itself, and of the imports between them it follows
only *relative* ones between top-level files (``from .modeling_x import y``: its loader,
transformers/dynamic_module_utils.py, copies exactly the files those lines name; sub-packages are
not followed). :func:`collect_remote_code` therefore starts at the modules that define the auto
classes, follows their imports of the package's own modules (at any depth, function bodies and
``try`` blocks included) and gives each file it reaches a flat name, rewriting those imports as
relative ones. The import graph is the only list of files, so the copy follows the package as it
is edited.

Problems are found at export time (``RemoteCodeError``), never by whoever loads the export: a
copied file that imports a module of the project outside the package (it would be missing next to
the copy), an import form the loader cannot follow (``import pkg.mod``, ``from pkg import
submodule``, ``importlib.import_module("pkg.mod")``), two files that flatten to one name, or text
that the loader would misread as a relative import. Third-party imports (torch, transformers, an
optional fla) are kept as written. Data files beside the sources are not copied.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# ``from <module> import``: the module part of a from-import, at the statement's first column.
_FROM_MODULE = re.compile(r"from\s+(\.*[\w.]*)\s+import\b")
_HEADER = ("# Copied from {source} by shared.student.remote_code when this model was exported;\n"
           "# imports of {package}'s own modules are rewritten as relative ones. Do not edit:\n"
           "# change the source and export again.\n")


class RemoteCodeError(RuntimeError):
    """The package's code cannot be made into a self-contained export (the message says why)."""


@dataclass(frozen=True)
class RemoteCode:
    """The flattened sources of an export and the ``auto_map`` that points at them."""

    sources: dict[str, str]
    """Flat file name (``modeling_rwkv_hybrid.py``...) -> its rewritten text."""
    origins: dict[str, Path]
    """Flat file name -> the source file it was made from."""
    auto_map: dict[str, str]
    """Auto class name -> ``module.Class`` as ``config.json``'s ``auto_map`` holds it."""
    requirements: tuple[str, ...]
    """Third-party packages that the loader's import check demands (imports outside ``try``)."""

    def write(self, output_dir: str | Path) -> list[Path]:
        """Write the sources into ``output_dir``; returns the paths written."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in self.sources.items():
            (out / name).write_text(text, encoding="utf-8")
            written.append(out / name)
        return written


def collect_remote_code(auto_classes: Mapping[str, type], package: str, model_type: str,
                        vendored: Sequence[str] = ()) -> RemoteCode:
    """The flattened code that defines ``auto_classes`` (``{"AutoConfig": cls, ...}``).

    ``package``: the dotted package whose modules are copied (``shared.student``). ``vendored``:
    modules of the project outside ``package`` that may be copied too (their own imports are
    followed and checked the same way). The module of ``AutoConfig``'s class becomes
    ``configuration_{model_type}.py``, that of the other classes ``modeling_{model_type}.py``
    (HF's convention); every other module ``{model_type}_{path}.py`` (``shared.student.ops.common``
    -> ``rwkv_hybrid_ops_common.py``). Raises ``RemoteCodeError`` (see the module docstring).
    """
    if "AutoConfig" not in auto_classes:
        raise RemoteCodeError("auto_classes needs an 'AutoConfig' entry: the loader reads the "
                              "config class from auto_map first")
    graph = _ImportGraph(package, tuple(vendored))
    names: dict[str, str] = {}
    for auto, cls in auto_classes.items():
        module = cls.__module__
        if not graph.is_copied(module):
            raise RemoteCodeError(f"{auto}: {cls.__qualname__} is defined in {module}, outside "
                                  f"{package}: only {package}'s code is exported")
        kind = "configuration" if auto == "AutoConfig" else "modeling"
        wanted = f"{kind}_{model_type}"
        if names.setdefault(module, wanted) != wanted:
            raise RemoteCodeError(f"{module} defines both the config class and a model class; "
                                  "keep the config in a module of its own (HF's layout)")
    if len(set(names.values())) != len(names):
        raise RemoteCodeError(f"the model classes {dict(auto_classes)} come from several modules; "
                              f"define them in one module (it becomes modeling_{model_type}.py)")
    for module in graph.walk(list(names)):
        names.setdefault(module, graph.flat_name(module, model_type))
    clashes = _clashes(names)
    if clashes:
        raise RemoteCodeError(f"modules {clashes} would all be copied as one flat file name; "
                              "rename one of them")
    sources = {f"{flat}.py": graph.rewritten(module, names) for module, flat in names.items()}
    _check_loader_view(sources, {f"{names[m]}.py": {names[d] for d in graph.edges[m]}
                                 for m in names})
    auto_map = {auto: f"{names[cls.__module__]}.{cls.__name__}"
                for auto, cls in auto_classes.items()}
    return RemoteCode(sources=sources, origins={f"{names[m]}.py": graph.files[m] for m in names},
                      auto_map=auto_map, requirements=_requirements(sources))


class _ImportGraph:
    """The package's modules that the roots reach through their imports, and those imports."""

    def __init__(self, package: str, vendored: tuple[str, ...]) -> None:
        self.package, self.vendored = package, vendored
        self.top = package.split(".")[0]
        spec = importlib.util.find_spec(self.top)
        if spec is None or not spec.submodule_search_locations:
            raise RemoteCodeError(f"package {package!r} cannot be found (is it importable here?)")
        self.project_root = Path(next(iter(spec.submodule_search_locations))).resolve().parent
        self.files: dict[str, Path] = {}
        self.edges: dict[str, set[str]] = {}
        self.trees: dict[str, ast.Module] = {}
        self.texts: dict[str, str] = {}
        self.rewrites: dict[str, list[tuple[ast.ImportFrom, str]]] = {}

    def is_copied(self, module: str) -> bool:
        return (module == self.package or module.startswith(self.package + ".")
                or module in self.vendored)

    def flat_name(self, module: str, prefix: str) -> str:
        inside = module == self.package or module.startswith(self.package + ".")
        rel = module[len(self.package):].lstrip(".") if inside else module
        return f"{prefix}_{rel.replace('.', '_')}" if rel else prefix

    def walk(self, roots: list[str]) -> list[str]:
        """Every module reached from ``roots`` (roots first), parsing each once."""
        order, todo = [], list(roots)
        while todo:
            module = todo.pop(0)
            if module in self.files:
                continue
            self._parse(module)
            order.append(module)
            todo += sorted(self.edges[module] - set(self.files))
        return order

    def _parse(self, module: str) -> None:
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix != ".py" or not origin.is_file():
            raise RemoteCodeError(f"{module} has no Python source file to copy ({origin})")
        text = origin.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(origin))
        self.files[module], self.texts[module], self.trees[module] = origin, text, tree
        self.edges[module], self.rewrites[module] = set(), []
        here = module if origin.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            where = f"{origin}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._check_absolute(alias.name, where, f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                target = (importlib.util.resolve_name("." * node.level + (node.module or ""),
                                                      here) if node.level else node.module)
                if self.is_copied(target):
                    self._check_names(target, node, where)
                    self.edges[module].add(target)
                    self.rewrites[module].append((node, target))
                else:
                    self._check_outside(target, where)
            elif isinstance(node, ast.Call) and _dynamic_import(node):
                name = node.args[0].value
                if self.is_copied(name) or self._first_party(name):
                    raise RemoteCodeError(f"{where}: a dynamic import of {name!r} is not followed "
                                          "by the export; use a from-import")

    def _check_absolute(self, name: str, where: str, statement: str) -> None:
        if self.is_copied(name):
            raise RemoteCodeError(f"{where}: `{statement}`: the export's loader only follows "
                                  f"`from {name} import ...`; write the import that way")
        self._check_outside(name, where)

    def _check_names(self, target: str, node: ast.ImportFrom, where: str) -> None:
        spec = importlib.util.find_spec(target)
        if spec is None or spec.submodule_search_locations is None:
            return  # a plain module: the names are its attributes
        for alias in node.names:
            if alias.name != "*" and importlib.util.find_spec(f"{target}.{alias.name}"):
                raise RemoteCodeError(f"{where}: `from {target} import {alias.name}` imports a "
                                      "module, which the export's loader does not follow; "
                                      f"write `from {target}.{alias.name} import ...`")

    def _check_outside(self, name: str, where: str) -> None:
        if self._first_party(name):
            raise RemoteCodeError(
                f"{where}: imports {name}, a module of this project outside {self.package}: an "
                f"export carries only {self.package}'s code, so it would fail to load. Move what "
                f"is needed into {self.package} (or vendor the module: collect_remote_code's "
                "vendored)")

    def _first_party(self, name: str) -> bool:
        """A module of the project itself (not the standard library, not installed packages)."""
        top = name.split(".")[0]
        if top == self.top:
            return True
        if top in sys.stdlib_module_names:
            return False
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return False
        if spec is None:
            return False  # not installed here: an optional third-party package (fla on a CPU)
        places = ([spec.origin] if spec.has_location and spec.origin
                  else list(spec.submodule_search_locations or []))
        return any(_inside(Path(p).resolve(), self.project_root) and not _installed(Path(p))
                   for p in places)

    def rewritten(self, module: str, names: Mapping[str, str]) -> str:
        """The module's text with its imports of copied modules made relative to the flat names."""
        lines = self.texts[module].splitlines(keepends=True)
        nodes = sorted(self.rewrites[module], key=lambda r: (r[0].lineno, r[0].col_offset),
                       reverse=True)
        for node, target in nodes:
            line = lines[node.lineno - 1]
            found = _FROM_MODULE.match(line, _char_offset(line, node.col_offset))
            if found is None:
                raise RemoteCodeError(f"{self.files[module]}:{node.lineno}: cannot rewrite this "
                                      "import (put `from <module> import` on one line)")
            start, end = found.span(1)
            lines[node.lineno - 1] = f"{line[:start]}.{names[target]}{line[end:]}"
        header = _HEADER.format(source=self._display(self.files[module]), package=self.package)
        return header + "".join(lines)

    def _display(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.project_root).as_posix()
        except ValueError:
            return path.name


def _dynamic_import(node: ast.Call) -> bool:
    func = node.func
    called = (func.attr if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
              and func.value.id == "importlib" else getattr(func, "id", None))
    return (called in ("import_module", "__import__") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def _char_offset(line: str, col_offset: int) -> int:
    # ast's col_offset counts UTF-8 bytes
    return len(line.encode("utf-8")[:col_offset].decode("utf-8", errors="ignore"))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _installed(path: Path) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in path.parts)


def _clashes(names: Mapping[str, str]) -> list[str]:
    seen: dict[str, list[str]] = {}
    for module, flat in names.items():
        seen.setdefault(flat, []).append(module)
    return [m for group in seen.values() if len(group) > 1 for m in group]


def _check_loader_view(sources: Mapping[str, str], expected: Mapping[str, set[str]]) -> None:
    """transformers' own reading of the written files must find exactly our relative imports:
    it picks them with a regex, so e.g. a docstring line ``from .x import y`` would send it after
    a file that does not exist."""
    from transformers.dynamic_module_utils import get_relative_imports

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in sources.items():
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            seen = set(get_relative_imports(str(path)))
            if seen != expected[name]:
                raise RemoteCodeError(
                    f"{name}: transformers' loader would read its relative imports as "
                    f"{sorted(seen)}, but the file imports {sorted(expected[name])}; reword "
                    "text that looks like `from .x import` outside an import statement")


def _requirements(sources: Mapping[str, str]) -> tuple[str, ...]:
    from transformers.dynamic_module_utils import get_imports

    found: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in sources.items():
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            found.update(get_imports(str(path)))
    return tuple(sorted(m for m in found if m not in sys.stdlib_module_names))
