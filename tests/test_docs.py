"""The README stays short, its result tables are the generated ones, and no link is dead."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


# what docs/results.py reads and writes: the tables are checked against these as committed
COMMITTED = ("README.md", "docs", "params.yaml", "dvc.yaml",
             "stages", "metrics",
             "reports")


def results(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``root``'s docs/results.py run on ``root``."""
    return subprocess.run([sys.executable, str(root / "docs" / "results.py"), *args,
                           "--root", str(root)], capture_output=True, text=True, timeout=120)


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=120)


@pytest.fixture
def committed(tmp_path) -> Path:
    """HEAD's tables, the script and the files it reads, exported into ``tmp_path``.

    ``make pipeline`` rewrites metrics/ and reports/ in the working tree; the committed tables
    are checked against the committed files, so ``make test`` passes after it too (in a fresh
    clone HEAD is the working tree)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot read the committed metrics and tables")
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout ({top.stderr.decode().strip()}): cannot "
                    "read the committed metrics and tables")
    if Path(top.stdout.decode().strip()).resolve() != REPO.resolve():
        pytest.skip(f"{REPO} is not the top of its git checkout: cannot read the committed "
                    "metrics and tables")
    if git("rev-parse", "--verify", "--quiet", "HEAD").returncode != 0:
        pytest.skip(f"{REPO} has no commit yet: nothing committed to check")
    out = git("archive", "--format=tar", "HEAD", "--", *COMMITTED)
    assert out.returncode == 0, out.stderr.decode()
    root = tmp_path / "head"
    root.mkdir()
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - a Python without extraction filters
            tar.extractall(root)
    return root


def test_readme_is_a_five_minute_read():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    assert "make test" in (REPO / "README.md").read_text()  # CI runs the README's command


def test_the_committed_result_tables_are_what_the_metrics_generate(committed):
    out = results(committed, "--check")
    assert out.returncode == 0, (out.stdout + out.stderr + "\nthe committed README.md or "
                                 "docs/results.md is not what the committed metrics give: run "
                                 "python docs/results.py and commit the tables with the metrics")


def test_check_names_a_table_that_no_longer_matches_its_metrics(committed):
    path = committed / "metrics" / "evaluate.json"
    metrics = json.loads(path.read_text())
    key = next(k for k in metrics if k.endswith("arithmetic_exact_match"))
    metrics[key] = 0.987654
    path.write_text(json.dumps(metrics))
    out = results(committed, "--check")
    assert out.returncode == 1 and "README.md" in out.stdout + out.stderr
    assert results(committed).returncode == 0  # regenerating fixes it
    assert "0.988" in (committed / "README.md").read_text()
    assert results(committed, "--check").returncode == 0


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


def test_a_baseline_alone_over_seeds_renders_its_mean_interval_and_values(tmp_path):
    """``pipeline.compare`` without a variant: one side, whose table is the default's over seeds."""
    from docs.tables.base import Files
    from docs.tables.seeds import seeded
    from llmcore.report.compare import compare

    runs = {"base": {1: {"m/acc": 0.5}, 2: {"m/acc": 0.7}, 3: {"m/acc": 0.6}}}
    data = {"profile": "full", "seeds": [1, 2, 3], "sides": {"base": ""}, "alpha": 0.05,
            "metrics": compare(runs, "base", ["m/acc"])["metrics"]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    text = "\n".join(seeded(Files(tmp_path), "c.json"))
    row = next(line for line in text.splitlines() if line.startswith("| `m/acc`"))
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.303: 0.6 +- 0.248
    assert row == "| `m/acc` | 3 | 0.600 +- 0.100 | [0.352, 0.848] | 0.500, 0.700, 0.600 |"


def test_every_report_is_read_by_a_page_and_history_is_dated():
    """One convention for ``reports/``: a current file is named by a page, the results
    generator or a benchmark (so a reader can find what made it and what it shows); a
    superseded one goes to ``reports/history/`` under its date. Files a named folder holds
    (``reports/evaluate/``, a comparison's .md and .png beside its .json) ride with it."""
    readers = "\n".join(p.read_text() for p in [REPO / "README.md", *REPO.glob("docs/*.md"),
                                                 *REPO.glob("docs/**/*.py"),
                                                 *REPO.glob("benchmarks/*.py")])
    orphans = []
    for path in sorted((REPO / "reports").rglob("*.json*")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("reports/history/"):
            assert re.match(r"\d{4}-\d{2}-\d{2}-", path.name), rel
            continue
        if rel.startswith("reports/evaluate/"):
            continue  # the evaluate stage's output, read as a folder
        named = (rel in readers
                 or (path.parent.name != "reports"
                     and f"{path.parent.relative_to(REPO).as_posix()}/" in readers)
                 or (path.parent.name == "compare" and f"`{path.stem}" in readers))
        if not named:
            orphans.append(rel)
    assert orphans == []


def test_a_figure_in_the_prose_is_rendered_from_its_file(committed):
    """A figure span of any page follows its file: a changed metrics file makes the page
    stale, regenerating renders the new figure, and an unknown figure name is an error."""
    path = committed / "metrics" / "sft.json"
    metrics = json.loads(path.read_text())
    metrics["sft/stage_seconds"] += 6000  # a hundred minutes more
    path.write_text(json.dumps(metrics))
    out = results(committed, "--check")
    assert out.returncode == 1 and "README.md" in out.stdout
    assert results(committed).returncode == 0
    readme = (committed / "README.md").read_text()
    before = re.search(r"<!-- figure:pipeline-minutes -->about (\d+) minutes",
                       (REPO / "README.md").read_text())
    after = re.search(r"<!-- figure:pipeline-minutes -->about (\d+) minutes", readme)
    assert before and after and int(after.group(1)) == int(before.group(1)) + 100
    page = committed / "docs" / "model.md"
    page.write_text(page.read_text() + "\nIt ran <!-- figure:no-such -->x<!-- /figure -->.\n")
    out = results(committed, "--check")
    assert out.returncode == 1 and "no figure named no-such" in out.stderr


def test_the_recogniser_catches_the_stale_figures_it_was_built_from():
    """Each of these was a hand-typed figure that had gone stale in the docs; the recogniser
    must flag every one, and leave code, link targets and defaults alone."""
    sys.path.insert(0, str(REPO))
    from docs.figures import hand_typed

    stale = [
        "fetch 21 s, tokenizer 10 s, pack 11 s. These are the stage seconds of the committed "
        "metrics files",
        "`make pipeline` takes about 14 minutes on a 2-core CPU",
        "The committed run is on a 2-core CPU (cpu-small, bf16, 300 s per side)",
        "    make compare VARIANT='model.positions=learned' SEEDS=5    # ~30 min on 2 cores",
        "25 runs, one shared baseline, 66 minutes on a 2-core AMX machine",
        "`pack.pretrain_chat_share: 0.5` lowered the docs val bpb (1.336 -> 1.277)",
        "llmcore decodes 885 tok/s, 0.14x of llama.cpp",
        "the int8 model is 3.9x smaller and 1.2 MB",
        "it moved arithmetic by 12% of its questions",
        "bf16 trained 1.7x faster than float32 at 4 x 128",
    ]
    for text in stale:
        assert hand_typed(text), text
    clean = ["Run `sft.max_steps=1890` for 600 steps ([link](reports/x-1.5s.json)).",
             "    dvc exp run -S pretrain.lr=0.003", "```", "took 12 s", "```",
             "<!-- results:start -->", "val bpb 1.234", "<!-- results:end -->",
             "It ran <!-- figure:x -->4.5 s<!-- /figure --> in all.",
             "a 4 x 128 model, 16 x 256 tokens a step",  # shapes, not ratios
             "`sft.lr` (default 0.015) and `pack.letters_share` (default 0.3; a share)",
             "the mean with its 95% t interval, the difference with its 95% Welch interval"]
    assert hand_typed("\n".join(clean)) == []


def test_no_page_has_a_hand_typed_figure():
    """Every measurement in the prose of README.md and docs/*.md is rendered from a file
    (``docs/prose/``, ``docs/results.py``): none is typed by hand."""
    sys.path.insert(0, str(REPO))
    from docs.figures import hand_typed

    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if page.name == "results.md":  # generated whole
            continue
        rel = page.relative_to(REPO).as_posix()
        found += [f"{rel}:{n}: {fig}" for n, fig, _ in hand_typed(page.read_text())]
    assert not found, ("hand-typed figures: render them from their file (a figure of "
                       "docs/prose/) or remove them:\n" + "\n".join(found))


def test_defaults_quoted_in_prose_are_the_params():
    """A default quoted as `` `section.key` (default VALUE`` is params.yaml's value (the way
    "60 steps" outlived a default of 20)."""
    import yaml

    sys.path.insert(0, str(REPO))
    import dataclasses

    from docs.figures import stale_defaults
    from llmcore.config.base import parse_sections
    from tests.test_config import SCHEMAS

    # every key with its value as the stages see it (params.yaml, and the preset's fields)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = {k: dataclasses.asdict(v) for k, v in parse_sections(raw, SCHEMAS).items()}
    assert stale_defaults("`rl.max_steps` (default 60)", params)
    assert stale_defaults("`rl.no_such_key` (default 1)", params)
    assert not stale_defaults(f"`rl.max_steps` (default {params['rl']['max_steps']})", params)
    stale = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        stale += [f"{page.relative_to(REPO)}: {s}" for s in stale_defaults(page.read_text(),
                                                                          params)]
    assert not stale, "\n".join(stale)


@pytest.mark.parametrize("content", [None, {}, {"rows": []}, {"batches": {}, "products": []}],
                         ids=["missing", "empty", "no-rows", "no-results"])
def test_every_figure_renders_a_sentence_when_its_file_is_missing_or_empty(content):
    """A figure's file gone or emptied makes the page say so (or say less), never stops
    docs/results.py with a traceback."""
    sys.path.insert(0, str(REPO))
    from docs.figures import FIGURES, render

    for name in FIGURES:
        out, unknown = render(f"a <!-- figure:{name} -->STALE<!-- /figure --> b",
                              lambda rel, c=content: c)
        assert not unknown and out.startswith(f"a <!-- figure:{name} -->") and "STALE" not in out
        assert out.endswith("<!-- /figure --> b") and len(out) > len(f"a <!-- figure:{name} "
                                                                     "--><!-- /figure --> b")
