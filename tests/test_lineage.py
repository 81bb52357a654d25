"""Lineage: every stage's DVC deps are exactly the code it runs; params and layering hold.

The deps are derived from the import graph (:mod:`tests.import_graph`), so an import added
later that dvc.yaml does not list fails here, naming the stage and the file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import project_env
from tests.import_graph import REPO, closure, closure_files, direct_imports, graph, module_path

# files a stage runs that cannot change any of its outputs (and why)
EXEMPT = {"llmcore/tracking.py": "records runs in MLflow; writes nothing DVC tracks"}
PACKAGE_MARKERS = ("llmcore/__init__.py", "stages/__init__.py")  # exempt while empty
INFERENCE = ("llmcore.serve", "llmcore.generate", "llmcore.evaluate", "llmcore.export",
             "llmcore.cli", "llmcore.quantize", "llmcore.modeldir")
TRAINING = ("llmcore.train", "llmcore.trainer", "llmcore.optim", "llmcore.checkpoint")


def stage_module(cmd: str) -> str:
    parts = cmd.split()
    assert parts[:2] == ["python", "-m"], f"stage command {cmd!r} is not `python -m stages.x`"
    return parts[2]


def code_dep_problems(dvc_yaml: Path, root: Path = REPO) -> list[str]:
    """Every way a stage's code deps in ``dvc_yaml`` differ from its import closure."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        runs = closure_files(stage_module(stage["cmd"]), root)
        wanted = runs - set(EXEMPT) - set(PACKAGE_MARKERS)
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        problems += [f"{name}: missing dep {p} (the stage imports it)"
                     for p in sorted(wanted - listed)]
        problems += [f"{name}: extra dep {p} (the stage does not run it)"
                     for p in sorted(listed - wanted)]
    return problems


def stage_params(module: str) -> tuple[str, ...]:
    """The ``PARAMS`` a stage module declares (read from its source, not imported)."""
    tree = ast.parse(module_path(module).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARAMS"
                                                 for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{module} declares no PARAMS")


def data_literals(module: str) -> set[str]:
    """``"data/..."`` paths written as string constants in the stage's own files."""
    found = set()
    for name in closure(module):
        if not name.startswith("stages."):
            continue
        for node in ast.walk(ast.parse(module_path(name).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.startswith("data/"):
                found.add(node.value)
    return found


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_exactly_the_code_it_runs():
    assert code_dep_problems(REPO / "dvc.yaml") == []


def test_the_check_names_a_missing_and_an_extra_dep(tmp_path):
    graph_ = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = graph_["stages"]["pretrain"]["deps"]
    deps.remove("llmcore/model.py")
    deps.append("llmcore/cli.py")
    broken = tmp_path / "dvc.yaml"
    broken.write_text(yaml.safe_dump(graph_))
    assert code_dep_problems(broken) == [
        "pretrain: missing dep llmcore/model.py (the stage imports it)",
        "pretrain: extra dep llmcore/cli.py (the stage does not run it)"]


def test_the_check_follows_new_imports(tmp_path):
    """An import added to a library module reaches every stage that imports that module."""
    for pkg in ("llmcore", "stages"):
        (tmp_path / pkg).mkdir()
        for f in (REPO / pkg).glob("*.py"):
            (tmp_path / pkg / f.name).write_text(f.read_text())
    shards = tmp_path / "llmcore" / "shards.py"
    shards.write_text(shards.read_text() + "\nfrom llmcore import cli  # noqa\n")
    problems = code_dep_problems(REPO / "dvc.yaml", tmp_path)
    for stage in ("pack", "pretrain", "sft", "dpo", "rl", "evaluate", "quantize"):
        assert f"{stage}: missing dep llmcore/cli.py (the stage imports it)" in problems


def test_exempt_files_really_change_nothing():
    for marker in PACKAGE_MARKERS:
        assert (REPO / marker).read_text().strip() == "", f"{marker} has code: list it as a dep"
    # the tracking wrapper must not pull library code in behind the exemption
    assert direct_imports(REPO / "llmcore/tracking.py") == set()


def test_stages_declare_the_params_dvc_lists():
    for name, stage in dvc_stages().items():
        declared = stage_params(stage_module(stage["cmd"]))
        assert list(declared) == stage["params"], name


def test_data_paths_in_stage_code_are_deps_or_outs():
    for name, stage in dvc_stages().items():
        listed = {d for d in stage.get("deps", []) if isinstance(d, str)}
        listed |= {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}
        listed = {p.split("${")[0].rstrip("-") if "${" in p else p for p in listed}
        for path in data_literals(stage_module(stage["cmd"])):
            assert path in listed or any(path.startswith(p) for p in listed), (name, path)


def test_a_stage_cannot_read_an_undeclared_param():
    from llmcore.config import BaseConfig
    from stages._common import SectionView

    view = SectionView("base", BaseConfig(), ["seed"])
    assert view.seed == 1337 and view.as_dict() == {"seed": 1337}
    with pytest.raises(AttributeError, match=r"reads base.dtype but does not declare it"):
        _ = view.dtype


def test_only_tracking_imports_mlflow():
    offenders = []
    for pkg in ("llmcore", "stages"):
        for path in (REPO / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] == "mlflow" for n in names):
                    offenders.append(path.relative_to(REPO).as_posix())
    assert sorted(set(offenders)) == ["llmcore/tracking.py"]


def test_inference_code_never_reaches_training_code():
    for module in INFERENCE:
        reached = closure(module) & set(TRAINING)
        assert not reached, f"{module} imports {sorted(reached)}"
    # and the layering the design draws: the model knows only its config
    assert graph()["llmcore.model"] == {"llmcore.config"}
    for low in ("llmcore.device", "llmcore.metrics", "llmcore.modeldir", "llmcore.files"):
        assert closure(low) <= {low, "llmcore", "llmcore.config", "llmcore.schema",
                                "llmcore.files", "llmcore.device", "llmcore.model"}, low


def test_importing_inference_modules_loads_no_training_code():
    code = ("import sys; import " + ", ".join(INFERENCE) + "; print(' '.join(sorted(m for m in "
            "sys.modules if m.startswith(('llmcore', 'mlflow')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=project_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "llmcore.serve" in loaded
    assert not loaded & set(TRAINING), loaded & set(TRAINING)
    assert not any(m.startswith("mlflow") for m in loaded)
