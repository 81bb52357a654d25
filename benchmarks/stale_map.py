"""Which stages does DVC re-run when one project module changes?

    python benchmarks/stale_map.py [REPO]      # default: this repository

In a throw-away clone of REPO (HEAD), appends a comment to each ``llmcore/**/*.py`` and
``stages/*.py`` file in turn and asks ``dvc status --json`` which stages now have a changed
code dependency. Prints a table and writes ``reports/stale_map.json`` (of this repository).
It reads only dependency hashes, so the clone needs no data and nothing is run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def stale_stages(repo: Path) -> dict[str, set[str]]:
    """``stage -> code files whose change DVC sees`` from ``dvc status --json``."""
    out = subprocess.run(["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, set[str]] = {}
    for stage, changes in (json.loads(out or "{}") or {}).items():
        for change in changes if isinstance(changes, list) else []:
            if isinstance(change, dict):
                deps = change.get("changed deps") or {}
                found.setdefault(stage, set()).update(d for d in deps if d.endswith(".py"))
    return found


def main() -> None:
    source = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE
    with tempfile.TemporaryDirectory(prefix="stale-map-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(source), str(repo)], check=True)
        baseline = stale_stages(repo)
        result: dict[str, list[str]] = {}
        for path in sorted([*repo.glob("llmcore/**/*.py"), *repo.glob("stages/*.py")]):
            rel = path.relative_to(repo).as_posix()
            original = path.read_text()
            path.write_text(original + "\n# touched\n")
            now = stale_stages(repo)
            path.write_text(original)
            result[rel] = sorted(s for s, files in now.items()
                                 if rel in files and rel not in baseline.get(s, set()))
            print(f"{rel:28s} {' '.join(result[rel]) or '-'}", flush=True)
    out = HERE / "reports" / "stale_map.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
