"""Which stages does DVC re-run when one project module changes?

    python benchmarks/stale_map.py                 # the working tree
    python benchmarks/stale_map.py --rev HEAD~3    # the layout of another commit
    python benchmarks/stale_map.py --rev A --against B   # both, side by side

DVC re-runs a stage when the content of one of its deps changes, and a code file is a dep
of the stages whose ``deps:`` in dvc.yaml list it (the lineage tests keep those lists equal to
each stage's import closure). So the map is read from dvc.yaml (at ``--rev``, through
``git show``) and the files of that tree: nothing is run, and no data or DVC lock is needed
(asking ``dvc status`` instead would mix in every change since the last committed run).

Writes ``reports/stale_map.json``: ``{"rev", "files": {path: [stages]}, "summary"}``, and with
``--against`` the second layout as ``"against"``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                          check=True).stdout


def layout(rev: str | None) -> dict[str, list[str]]:
    """``code file -> stages it makes stale`` for the tree at ``rev`` (None: the work tree)."""
    if rev is None:
        dvc_yaml = (HERE / "dvc.yaml").read_text()
        files = [p.relative_to(HERE).as_posix() for p in
                 [*HERE.glob("llmcore/**/*.py"), *HERE.glob("stages/*.py")]]
    else:
        dvc_yaml = git("show", f"{rev}:dvc.yaml")
        files = [f for f in git("ls-tree", "-r", "--name-only", rev, "llmcore", "stages")
                 .splitlines() if f.endswith(".py") and (f.startswith("llmcore/")
                                                         or f.count("/") == 1)]
    stages = yaml.safe_load(dvc_yaml)["stages"]
    return {f: sorted(name for name, stage in stages.items()
                      if f in {d for d in stage.get("deps", []) if isinstance(d, str)})
            for f in sorted(files) if "__pycache__" not in f}


def summary(files: dict[str, list[str]]) -> dict[str, float]:
    """How far an edit reaches: stages made stale per file, on average and at most."""
    counts = [len(s) for s in files.values()]
    return {"files": len(counts), "mean_stages_per_file": round(sum(counts) / len(counts), 2),
            "max_stages_per_file": max(counts),
            "files_staling_every_stage": sum(c == max(counts) for c in counts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default=None, help="git revision (default: the working tree)")
    ap.add_argument("--against", default=None, metavar="REV",
                    help="also the layout of REV, shown beside")
    args = ap.parse_args()
    try:
        now = layout(args.rev)
        other = layout(args.against) if args.against else None
    except subprocess.CalledProcessError as exc:
        sys.exit(f"stale_map: git failed: {exc.stderr.strip()}")
    width = max(len(f) for f in [*now, *(other or {})])
    if other is not None:
        print(f"{'file':{width}s}  {args.against:24s}  {args.rev or 'work tree'}")
        for f in sorted({*now, *other}):
            before = " ".join(other.get(f, ["(absent)"])) or "-"
            after = " ".join(now.get(f, ["(absent)"])) or "-"
            print(f"{f:{width}s}  {before:24s}  {after}")
    else:
        for f, s in now.items():
            print(f"{f:{width}s}  {' '.join(s) or '-'}")
    result: dict[str, object] = {"rev": args.rev or "work tree", "files": now,
                                 "summary": summary(now)}
    if other is not None:
        result["against"] = {"rev": args.against, "files": other, "summary": summary(other)}
    print(json.dumps({k: v for k, v in result.items() if k == "summary"}))
    out = HERE / "reports" / "stale_map.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
