"""Each stage's code deps in dvc.yaml, written from its import closure.

    python -m pipeline.deps           # rewrite the code deps of every stage in dvc.yaml
    python -m pipeline.deps --check   # list what differs (exit 1), change nothing

A stage's DVC deps must be exactly the project files its command runs, or an edit re-runs
too much (an extra dep) or too little (a missing one, the worse case: a cached output that
the code no longer computes). :mod:`llmcore.lineage` reads the import graph with ``ast``;
this writes the closure of ``python -m stages.<name>`` into the stage's ``deps:`` (stage
files first, then the library, each sorted) and leaves every other line of dvc.yaml as it is
(data deps, comments, order). ``tests/test_lineage.py`` runs the check, so a new import that
dvc.yaml misses fails the tests, naming the stage and the file; this command is the fix.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from llmcore.lineage import REPO, closure_files

# files a stage runs that cannot change any of its outputs (and why)
EXEMPT = {"llmcore/tracking.py": "records runs in MLflow; writes nothing DVC tracks"}


def package_markers(root: Path = REPO) -> tuple[str, ...]:
    """The packages' ``__init__.py`` files: exempt while empty (a lineage test checks that)."""
    return tuple(sorted(p.relative_to(root).as_posix() for pkg in ("llmcore", "stages")
                        for p in (root / pkg).rglob("__init__.py")))


def stage_module(cmd: str) -> str:
    """``stages.x`` of the command ``python -m stages.x``."""
    parts = cmd.split()
    if parts[:2] != ["python", "-m"] or len(parts) < 3:
        raise SystemExit(f"deps: stage command {cmd!r} is not `python -m stages.<name>`")
    return parts[2]


def code_deps(cmd: str, root: Path = REPO) -> list[str]:
    """The code deps of the stage that runs ``cmd``: stage files first, then the library."""
    wanted = closure_files(stage_module(cmd), root=root) - set(EXEMPT) - set(package_markers(root))
    return sorted(wanted, key=lambda p: (not p.startswith("stages/"), p))


def problems(dvc_yaml: Path, root: Path = REPO) -> list[str]:
    """Every way a stage's code deps in ``dvc_yaml`` differ from its import closure."""
    out = []
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        wanted = set(code_deps(stage["cmd"], root))
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        out += [f"{name}: missing dep {p} (the stage imports it)" for p in sorted(wanted - listed)]
        out += [f"{name}: extra dep {p} (the stage does not run it)"
                for p in sorted(listed - wanted)]
    return out


def rewrite(text: str, root: Path = REPO) -> str:
    """dvc.yaml's ``text`` with each stage's ``.py`` deps replaced by its closure; a stage
    without ``deps:`` gets them after its ``cmd:``."""
    stages = yaml.safe_load(text)["stages"]
    out: list[str] = []
    stage, in_deps = None, False
    for line in text.split("\n"):
        head = re.match(r"^  ([\w-]+):\s*$", line)
        if head:
            stage, in_deps = head.group(1), False
        if in_deps and re.match(r"^      - \S+\.py\s*$", line):
            continue  # an old code dep: the closure below replaces it
        in_deps = in_deps and line.startswith("      - ")
        out.append(line)
        if stage in stages and re.match(r"^    deps:\s*$", line):
            in_deps = True
            out += [f"      - {p}" for p in code_deps(stages[stage]["cmd"], root)]
        elif stage in stages and re.match(r"^    cmd:", line) and "deps" not in stages[stage]:
            out += ["    deps:", *(f"      - {p}" for p in code_deps(stages[stage]["cmd"], root))]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.deps", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="list the differences, change nothing")
    p.add_argument("--file", type=Path, default=REPO / "dvc.yaml")
    args = p.parse_args(argv)
    if args.check:
        found = problems(args.file)
        print("\n".join(found) or f"{args.file.name}: every stage's code deps are its imports")
        return 1 if found else 0
    before = args.file.read_text()
    after = rewrite(before)
    args.file.write_text(after)
    print(f"{args.file.name}: " + ("code deps rewritten" if after != before else "unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
