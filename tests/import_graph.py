"""The import graph of llmpipe as the tests read it: every llmpipe module a file imports,
anywhere in the file (function-level and type-only imports included), with its parent
packages. The dep-closure test (test_dvc_yaml.py) and the layer test (test_layers.py) count
exactly the same imports."""

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"


def module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _package_of(path: Path) -> list[str]:
    """The package a file under src/ belongs to, as name parts (for relative imports)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return parts if parts[-1] == "__init__" and parts.pop() else parts[:-1]


def imported_modules(path: Path) -> set[str]:
    """Every llmpipe module `path` imports, anywhere in the file, with its parent packages."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from .x import y: relative to the file's package
                package = _package_of(path)
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            names.add(module)
            # `from llmpipe import layout` imports a module, `from llmpipe.x import f` does not
            names.update(f"{module}.{alias.name}" for alias in node.names)
    modules = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "llmpipe":
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in modules if module_file(m) is not None}


def import_closure(stage: str) -> set[str]:
    """The stage script and every llmpipe file it imports, transitively (repo-relative)."""
    return file_closure(ROOT / "stages" / f"{stage}.py")


def file_closure(script: Path) -> set[str]:
    """A file and every llmpipe file it imports, transitively (repo-relative)."""
    files, todo = {script}, [script]
    while todo:
        for module in imported_modules(todo.pop()):
            path = module_file(module)
            if path not in files:
                files.add(path)
                todo.append(path)
    return {path.relative_to(ROOT).as_posix() for path in files}
