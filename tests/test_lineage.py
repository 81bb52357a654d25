"""Lineage: every stage's DVC deps are exactly the code it runs; params and layering hold.

The deps are derived from the import graph (:mod:`tests.import_graph`), so an import added
later that dvc.yaml does not list fails here, naming the stage and the file.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmcore.lineage import project_files
from pipeline.deps import package_markers, rewrite, stage_module
from pipeline.deps import problems as code_dep_problems
from tests.conftest import project_env
from tests.import_graph import (
    REPO,
    closure,
    direct_imports,
    graph,
    module_path,
)

# package markers: exempt while empty (a test below checks that they are)
PACKAGE_MARKERS = package_markers()

# The layering as package rules: what each part of llmcore may import. The cross-cutting
# modules at the top are listed by name; a package may always import its own modules.
LOW = {"config", "schema", "files", "device", "metric_keys"}
ALLOWED = {
    "schema": set(), "files": set(), "lineage": set(), "tracking": set(), "metric_keys": set(),
    "config": {"schema"}, "device": {"config", "schema"},
    "model": LOW,
    "data": LOW,
    "train": LOW | {"model", "data", "lineage", "tracking"},
    "align": LOW | {"train", "model", "infer", "data", "lineage", "tracking"},
    "infer": LOW | {"model", "data"},
    "eval": LOW | {"model", "data", "infer"},
    "report": LOW | {"model", "data", "infer", "eval"},
    "export": LOW | {"model", "data", "infer"},
    "serve": LOW | {"model", "data", "infer"},
    "cli": LOW | {"model", "data", "infer", "serve", "export", "tracking"},
}
TRAINING_PARTS = ("train", "align")


def part(module: str) -> str:
    """``llmcore.train.fit`` -> ``train``; ``llmcore.device`` -> ``device``."""
    return module.split(".")[1]


def layering_problems(root: Path = REPO) -> list[str]:
    """Every import of a llmcore module that its package's rule does not allow."""
    problems = []
    for module, deps in graph(root).items():
        if module.count(".") == 0 or module_path(module, root).name == "__init__.py":
            continue  # stages/ may import anything; package markers import nothing (checked)
        if module.startswith("stages"):
            continue
        here = part(module)
        for dep in sorted(deps):
            if module_path(dep, root).name == "__init__.py":
                continue  # `from llmcore.train import loop`: the module loop is what counts
            if dep.startswith("stages"):
                problems.append(f"{module} imports {dep}: llmcore never imports the stages")
            elif dep != "llmcore" and part(dep) != here and part(dep) not in ALLOWED[here]:
                problems.append(f"{module} imports {dep}: {here} may import only "
                                f"{', '.join(sorted(ALLOWED[here])) or 'nothing of llmcore'}")
    return problems


def cycles(root: Path = REPO) -> list[list[str]]:
    """Import circles between modules (each found once, from its smallest name)."""
    g = graph(root)
    found = []
    for start in sorted(g):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in sorted(g.get(node, ())):
                if dep == start:
                    found.append(path)
                elif dep > start and dep not in path:
                    stack.append((dep, path + [dep]))
    return found


def stage_paths(module: str, stage: str) -> set[str]:
    """The paths a stage's own files name through :mod:`stages.paths` (``paths.CORPUS``,
    ``paths.model_dir("sft")``). A helper's ``paths.model_dir(stage)`` (a name, not a
    literal) is the running stage's own; an f-string argument keeps its literal prefix."""
    import stages.paths as paths

    found = set()
    for name in closure(module):
        if not name.startswith("stages.") or name == "stages.paths":
            continue
        for node in ast.walk(ast.parse(module_path(name).read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "paths":
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    value = arg.value
                elif isinstance(arg, ast.JoinedStr):  # f"chat-{cfg.method}": its literal head
                    value = "".join(v.value for v in arg.values[:1] if isinstance(v, ast.Constant))
                else:
                    value = stage
                found.add(getattr(paths, node.func.attr)(value))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "paths" and node.attr.isupper():
                found.add(getattr(paths, node.attr))
    return found


def data_literals(module: str) -> set[str]:
    """``"data/..."`` paths written as string constants in the stage's own files."""
    found = set()
    for name in closure(module):
        if not name.startswith("stages.") or name == "stages.paths":
            continue
        for node in ast.walk(ast.parse(module_path(name).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.startswith(("data/", "metrics/", "reports/")):
                found.add(node.value)
    return found


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_exactly_the_code_it_runs():
    assert code_dep_problems(REPO / "dvc.yaml") == []


def test_the_check_names_a_missing_and_an_extra_dep(tmp_path):
    graph_ = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = graph_["stages"]["pretrain"]["deps"]
    deps.remove("llmcore/model/transformer.py")
    deps.append("llmcore/cli.py")
    broken = tmp_path / "dvc.yaml"
    broken.write_text(yaml.safe_dump(graph_))
    assert code_dep_problems(broken) == [
        "pretrain: missing dep llmcore/model/transformer.py (the stage imports it)",
        "pretrain: extra dep llmcore/cli.py (the stage does not run it)"]


def test_pipeline_deps_writes_back_what_the_check_wants():
    """``python -m pipeline.deps`` is the fix the check names: from a dvc.yaml with a dep
    missing, one extra and a stage whose deps list no code at all, it writes the committed
    file back, line for line (data deps, comments and order kept)."""
    committed = (REPO / "dvc.yaml").read_text()
    broken = committed.replace("      - llmcore/model/transformer.py\n", "", 1).replace(
        "      - stages/fetch.py\n", "      - stages/fetch.py\n      - llmcore/cli.py\n", 1)
    assert broken != committed
    assert rewrite(broken) == committed
    assert rewrite(committed) == committed


def test_the_check_follows_new_imports(tmp_path):
    """An import added to a library module reaches every stage that imports that module."""
    for pkg in ("llmcore", "stages"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shards = tmp_path / "llmcore" / "data" / "shards.py"
    shards.write_text(shards.read_text() + "\nfrom llmcore import cli  # noqa\n")
    problems = code_dep_problems(REPO / "dvc.yaml", tmp_path)
    for stage in ("pack", "pretrain", "sft", "dpo", "rl", "evaluate", "quantize"):
        assert f"{stage}: missing dep llmcore/cli.py (the stage imports it)" in problems


def test_exempt_files_really_change_nothing():
    for marker in PACKAGE_MARKERS:
        assert (REPO / marker).read_text().strip() == "", f"{marker} has code: list it as a dep"
    # the tracking wrapper must not pull library code in behind the exemption
    assert direct_imports(REPO / "llmcore/tracking.py") == set()


def test_each_stage_reads_the_sections_dvc_lists_for_it():
    """The params a stage reads are its ``params:`` in dvc.yaml (read when it runs), and its
    Params class has a field for each of their sections, and no other (``base`` aside, which
    every stage may read for MLflow's run name)."""
    import importlib

    from stages import chain

    for name, stage in dvc_stages().items():
        assert chain.params(name, REPO) == stage["params"], name
        module = importlib.import_module(stage_module(stage["cmd"]))
        fields = set(module.Params.schemas()) - {"base"}
        listed = {k.partition(".")[0] for k in stage["params"]} - {"base"}
        assert fields == listed, name


def test_data_paths_in_stage_code_are_deps_or_outs():
    """Every data path a stage names (through stages.paths) is one of its deps or outs, but
    its checkpoint folder: working state for resume, kept out of the outs so that DVC's run
    cache can restore the stage (docs/orchestration.md)."""
    helpers = {"data/checkpoints", "data/models", "metrics", "reports"}  # folders of many
    from stages import paths
    for name, stage in dvc_stages().items():
        listed = {d for d in stage.get("deps", []) if isinstance(d, str)}
        listed |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}
        for m in stage.get("metrics", []) + stage.get("plots", []):
            listed.add(next(iter(m)) if isinstance(m, dict) else m)
        listed = {p.split("${")[0].rstrip("-") if "${" in p else p for p in listed}
        used = stage_paths(stage_module(stage["cmd"]), name)
        assert used, name
        assert paths.checkpoint_dir(name) not in listed, name  # not an out: see above
        for path in used - helpers - {paths.checkpoint_dir(name)}:
            assert path in listed or any(p.startswith(path) or path.startswith(p)
                                         for p in listed), (name, path)


def test_stage_code_writes_no_data_path_literal():
    """Paths live in stages/paths.py alone (the stages and the tests name them from there)."""
    for name, stage in dvc_stages().items():
        assert data_literals(stage_module(stage["cmd"])) == set(), name


def test_a_stage_cannot_read_an_undeclared_param():
    from llmcore.config.base import BaseConfig
    from stages._common import SectionView

    view = SectionView("base", BaseConfig(), ["seed"])
    assert view.seed == 1337 and view.as_dict() == {"seed": 1337}
    with pytest.raises(AttributeError, match=r"reads base.dtype but does not declare it: "
                                             r"add it to the stage's params in dvc.yaml"):
        _ = view.dtype


def test_only_tracking_imports_mlflow():
    offenders = []
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "mlflow" for n in names):
                offenders.append(path.relative_to(REPO).as_posix())
    # the pyfunc flavour runs inside MLflow and raises its error type (imported lazily there)
    assert sorted(set(offenders)) == ["llmcore/export/pyfunc.py", "llmcore/tracking.py"]


def test_every_package_imports_only_what_its_rule_allows():
    assert layering_problems() == []
    # every part of llmcore has a rule (a new package must say what it may import)
    assert {part(m) for m in graph() if m.startswith("llmcore.")} == set(ALLOWED)


def test_the_rules_catch_an_inference_module_importing_training_code(tmp_path):
    for pkg in ("llmcore", "stages"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    engine = tmp_path / "llmcore" / "infer" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom llmcore.train import loop  # noqa\n")
    model = tmp_path / "llmcore" / "model" / "transformer.py"
    model.write_text(model.read_text() + "\nfrom llmcore.data.shards import ShardDataset  # noqa\n")
    assert layering_problems(tmp_path) == [
        "llmcore.infer.engine imports llmcore.train.loop: infer may import only config, data, "
        "device, files, metric_keys, model, schema",
        "llmcore.model.transformer imports llmcore.data.shards: model may import only config, "
        "device, files, metric_keys, schema"]


def test_there_are_no_import_circles(tmp_path):
    assert cycles() == []
    for pkg in ("llmcore", "stages"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    files = tmp_path / "llmcore" / "files.py"
    files.write_text(files.read_text() + "\nfrom llmcore import lineage  # noqa\n")
    lineage = tmp_path / "llmcore" / "lineage.py"
    lineage.write_text(lineage.read_text() + "\nfrom llmcore import files  # noqa\n")
    assert cycles(tmp_path) == [["llmcore.files", "llmcore.lineage"]]


def test_the_resume_fingerprint_covers_the_loops_whole_import_closure():
    from llmcore.lineage import closure_files, code_hash

    reached = closure_files("llmcore.train.fit")
    # what the loop runs, including the two files a hand-written list once missed
    for f in ("llmcore/train/loop.py", "llmcore/train/optim.py", "llmcore/train/muon.py",
              "llmcore/train/checkpoint.py", "llmcore/device.py", "llmcore/model/transformer.py",
              "llmcore/model/loss.py", "llmcore/data/shards.py"):
        assert f in reached, f
    assert not any(f.startswith(("llmcore/serve/", "llmcore/export/", "llmcore/report/"))
                   for f in reached)
    # the adapter's module is added to the closure: LoRA code changes the fingerprint
    assert code_hash("llmcore.train.fit") != code_hash("llmcore.train.fit", "llmcore.model.lora")


def test_editing_any_file_of_the_closure_changes_the_fingerprint(tmp_path):
    from llmcore.lineage import code_hash

    for pkg in ("llmcore", "stages"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    fresh = code_hash.__wrapped__  # uncached: the files change under it here
    before = fresh("llmcore.train.fit", root=tmp_path)
    assert before == code_hash("llmcore.train.fit")  # the copy hashes like the original
    for rel in ("llmcore/device.py", "llmcore/train/checkpoint.py", "llmcore/data/shards.py"):
        f = tmp_path / rel
        f.write_text(f.read_text() + "\n# edited\n")
        after = fresh("llmcore.train.fit", root=tmp_path)
        assert after != before, rel
        before = after
    # a file outside the closure does not
    serve = tmp_path / "llmcore" / "serve" / "app.py"
    serve.write_text(serve.read_text() + "\n# edited\n")
    assert fresh("llmcore.train.fit", root=tmp_path) == before


INFERENCE = ("llmcore.serve.app", "llmcore.infer.generate", "llmcore.infer.engine",
             "llmcore.eval.evaluate", "llmcore.export.hf", "llmcore.export.gguf",
             "llmcore.export.pyfunc", "llmcore.export.quantize", "llmcore.cli",
             "llmcore.model.modeldir")


def test_importing_inference_modules_loads_no_training_code():
    code = ("import sys; import " + ", ".join(INFERENCE) + "; print(' '.join(sorted(m for m in "
            "sys.modules if m.startswith(('llmcore', 'mlflow')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=project_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "llmcore.serve.app" in loaded
    training = {m for m in loaded if m.split(".")[1:2] and part(m) in TRAINING_PARTS}
    assert not training, training
    assert not any(m.startswith("mlflow") for m in loaded)
