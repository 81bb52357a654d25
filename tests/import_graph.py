"""The project's import graph for the tests (:mod:`llmcore.lineage` reads it).

``python -m tests.import_graph`` prints the graph and the longest functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from llmcore.lineage import (
    REPO,
    closure,
    closure_files,
    direct_imports,
    graph,
    module_path,
    project_files,
)

__all__ = ["REPO", "closure", "closure_files", "direct_imports", "graph", "module_path",
           "longest_functions"]


def longest_functions(root: Path = REPO, top: int = 10) -> list[tuple[int, str]]:
    """``(lines, "file:function")`` of the longest functions in the packages."""
    found = []
    for path in project_files(root):
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
