"""The code a module runs: the project's import graph, read with :mod:`ast`.

Nothing is imported or run: every ``import`` statement of a file counts, at module level or
inside a function, because a lazy import still runs when the code takes that path and is then
part of what the result depends on. Two things are derived from it:

* the resume fingerprint's code (:func:`code_hash`): the files the training loop and its
  objective reach, so that an edit to any of them (the autocast helper, the RNG restore)
  starts a new run instead of resuming one that would no longer be bit-exact;
* each DVC stage's code deps, which the lineage tests compare with ``dvc.yaml``.

Trade-off: imports are found by name only (``importlib`` calls or ``__import__`` with a
computed name are invisible), which is why the package ``__init__`` files stay empty and the
project never imports by computed name.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llmcore", "stages")


def module_path(name: str, root: Path = REPO) -> Path | None:
    """The file of project module ``name`` (``llmcore.train.fit`` -> ``llmcore/train/fit.py``)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = REPO) -> str:
    """``llmcore/train/fit.py`` -> ``llmcore.train.fit``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def direct_imports(path: Path, root: Path = REPO) -> set[str]:
    """Project modules that the file at ``path`` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from llmcore.export import llama_cpp` names a submodule
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and module_path(name, root) is not None:
                found.add(name)
    return found


def project_files(root: Path = REPO) -> list[Path]:
    """Every Python file of the packages, sorted."""
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts)


def graph(root: Path = REPO) -> dict[str, set[str]]:
    """``module -> project modules it imports`` for every module of the packages."""
    out: dict[str, set[str]] = {}
    for path in project_files(root):
        name = module_name(path, root)
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


def closure_files(*starts: str, root: Path = REPO) -> set[str]:
    """The files of the closures of ``starts``, relative to ``root`` with forward slashes."""
    files = set()
    for start in starts:
        for name in closure(start, root):
            path = module_path(name, root)
            if path is not None:
                files.add(path.relative_to(root).as_posix())
    return files


@functools.cache
def code_hash(*modules: str, root: Path = REPO) -> str:
    """SHA-256 over the path and bytes of every file the ``modules`` reach (sorted).

    Cached: the code does not change while a process runs.
    """
    h = hashlib.sha256()
    for rel in sorted(closure_files(*modules, root=root)):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()
