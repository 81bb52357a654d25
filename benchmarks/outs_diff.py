"""Compare the outputs of two ``dvc.lock`` files, down to the files inside directory outputs.

    python benchmarks/outs_diff.py OLD_LOCK NEW_LOCK [--cache .dvc/cache ...]

A refactor that changes no number must leave every data output's md5 as it was. A directory
output's md5 is that of its listing (``<md5>.dir`` in the DVC cache), so one changed file
changes it; this script opens the listings (from any of the given caches) and names the files
that differ. Model directories carry ``meta.json`` (git commit, run fingerprint, params), which
changes with every commit by design; it is reported apart from the files that hold numbers.
Metrics files hold timings, and checkpoint folders (``persist``, uncached) hold resume state,
so both are listed but not counted as data outputs.

Writes ``reports/outs_diff.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BOOKKEEPING = {"meta.json"}  # per-commit lineage, not numbers


def outs(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {o["path"]: o.get("md5", "") for s in stages.values() for o in s.get("outs", [])}


def listing(md5: str, caches: list[Path]) -> dict[str, str] | None:
    """``relpath -> md5`` of a directory output, from the first cache that holds it."""
    digest = md5.removesuffix(".dir")
    for cache in caches:
        path = cache / "files" / "md5" / digest[:2] / (digest[2:] + ".dir")
        if path.is_file():
            return {e["relpath"]: e["md5"] for e in json.loads(path.read_text())}
    return None


def compare(old: dict[str, str], new: dict[str, str], caches: list[Path]) -> list[dict]:
    rows = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        row = {"path": path, "old": a, "new": b, "same": a == b, "files": None,
               "kind": ("metrics" if not path.startswith("data/") else
                        "state" if path.startswith("data/checkpoints") else "data")}
        if a != b and a and b and a.endswith(".dir") and b.endswith(".dir"):
            la, lb = listing(a, caches), listing(b, caches)
            if la is not None and lb is not None:
                differ = sorted(f for f in set(la) | set(lb) if la.get(f) != lb.get(f))
                row["files"] = differ
                row["only_bookkeeping"] = bool(differ) and all(
                    Path(f).name in BOOKKEEPING for f in differ)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--cache", type=Path, action="append", default=None,
                    help="DVC cache directories holding the .dir listings (default: the repo's)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "outs_diff.json")
    args = ap.parse_args()
    caches = args.cache or [REPO / ".dvc" / "cache"]
    rows = compare(outs(args.old), outs(args.new), caches)
    for r in rows:
        if r["same"]:
            status = "same"
        elif r.get("only_bookkeeping"):
            status = "differs only in " + ", ".join(r["files"])
        elif r["files"] is not None:
            status = "DIFFERS: " + ", ".join(r["files"])
        else:
            status = "differs" + {"metrics": " (timings)", "state": " (resume state, uncached)",
                                  "data": ""}[r["kind"]]
        print(f"{r['path']:<34} {status}")
    data = [r for r in rows if r["kind"] == "data"]
    same = sum(r["same"] or bool(r.get("only_bookkeeping")) for r in data)
    print(f"\n{same}/{len(data)} data outputs equal (model directories up to meta.json)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"old": args.old.name, "new": args.new.name, "outs": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
