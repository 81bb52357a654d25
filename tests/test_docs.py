"""The README stays short, its result tables are the generated ones, and no link is dead."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def results(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "docs" / "results.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_readme_is_a_five_minute_read():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    assert "make test" in (REPO / "README.md").read_text()  # CI runs the README's command


def test_the_committed_result_tables_are_what_the_metrics_generate():
    out = results("--check")
    assert out.returncode == 0, out.stdout + out.stderr + "\nrun: python docs/results.py"


def test_check_names_a_table_that_no_longer_matches_its_metrics(tmp_path):
    for rel in ("README.md", "docs/results.md", "docs/results.py", "params.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    shutil.copytree(REPO / "metrics", tmp_path / "metrics")
    shutil.copytree(REPO / "reports", tmp_path / "reports")
    path = tmp_path / "metrics" / "evaluate.json"
    metrics = json.loads(path.read_text())
    key = next(k for k in metrics if k.endswith("arithmetic_exact_match"))
    metrics[key] = 0.987654
    path.write_text(json.dumps(metrics))
    out = results("--check", "--root", str(tmp_path))
    assert out.returncode == 1 and "README.md" in out.stdout + out.stderr
    assert results("--root", str(tmp_path)).returncode == 0  # regenerating fixes it
    assert "0.988" in (tmp_path / "README.md").read_text()
    assert results("--check", "--root", str(tmp_path)).returncode == 0


def test_every_relative_link_of_the_docs_exists():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    dead = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                dead.append(f"{page.relative_to(REPO)} -> {target}")
    assert dead == []
