"""The project's import graph, read with :mod:`ast` (nothing is imported or run).

Every ``import`` statement counts, at module level or inside a function: a lazy import still
runs when the stage takes that path, so it is part of what the stage's output depends on.
Used by the lineage and layering tests; ``python -m tests.import_graph`` prints the graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llmcore", "stages")


def module_path(name: str, root: Path = REPO) -> Path | None:
    """The file of project module ``name`` (``llmcore.train`` -> ``llmcore/train.py``)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(path: Path, root: Path = REPO) -> set[str]:
    """Project modules that the file at ``path`` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from llmcore import x` may name a submodule x
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and module_path(name, root) is not None:
                found.add(name)
    return found


def graph(root: Path = REPO) -> dict[str, set[str]]:
    """``module -> project modules it imports`` for every module of the packages."""
    out: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).glob("*.py")):
            name = f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg
            out[name] = direct_imports(path, root) - {name}
    return out


def closure(start: str, root: Path = REPO) -> set[str]:
    """``start`` and every project module it reaches through imports (packages included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run
        path = module_path(name, root)
        if path is not None:
            todo.extend(direct_imports(path, root))
    return seen


def closure_files(start: str, root: Path = REPO) -> set[str]:
    """The files of :func:`closure`, relative to ``root`` with forward slashes."""
    files = set()
    for name in closure(start, root):
        path = module_path(name, root)
        if path is not None:
            files.add(path.relative_to(root).as_posix())
    return files


def longest_functions(root: Path = REPO, top: int = 10) -> list[tuple[int, str]]:
    """``(lines, "file:function")`` of the longest functions in the packages."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    found.append((lines, f"{path.relative_to(root).as_posix()}:{node.name}"))
    return sorted(found, reverse=True)[:top]


def main() -> None:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO
    for name, deps in graph(root).items():
        print(f"{name} -> {', '.join(sorted(deps)) or '-'}")
    print()
    for lines, where in longest_functions(root):
        print(f"{lines:4d}  {where}")


if __name__ == "__main__":
    main()
