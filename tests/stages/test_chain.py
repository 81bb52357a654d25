"""The model chain is declared once, in dvc.yaml: the stages, the flow, the comparison, the
results page and the evaluate params all follow it, and a stage added there is found by all
of them without another list to edit."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmcore.config.evaluate import EvaluateConfig
from llmcore.config.flow import FlowConfig
from llmcore.schema import UserError
from stages import chain

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_chain():
    assert chain.models(REPO) == ["pretrain", "sft", "dpo", "rl"]
    assert [chain.source(s, REPO) for s in ("sft", "dpo", "rl")] == [
        "data/models/pretrain", "data/models/sft", "data/models/dpo"]
    assert chain.final(REPO) == "rl"
    assert chain.model_deps("evaluate", REPO) == chain.models(REPO)
    # the evaluate section's default scores the whole chain, in its order
    assert EvaluateConfig().models == chain.models(REPO)
    assert chain.stage_order(REPO)[0] == "fetch" and chain.stage_order(REPO)[-1] == "quantize"


def add_distill(root: Path) -> None:
    """The worked example of docs/orchestration.md: a stage ``distill`` after ``rl``, whose
    model quantize then ships. Only dvc.yaml changes (and the stage's own module)."""
    graph = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = graph["stages"]
    new = {}
    for name, stage in stages.items():
        if name == "evaluate":
            new["distill"] = {"cmd": "python -m stages.distill",
                              "deps": ["stages/distill.py", "data/models/rl"],
                              "params": ["distill"], "outs": ["data/models/distill"]}
        new[name] = stage
    new["quantize"]["deps"] = [d if d != "data/models/rl" else "data/models/distill"
                               for d in new["quantize"]["deps"]]
    new["evaluate"]["deps"] = [*new["evaluate"]["deps"], "data/models/distill"]
    graph["stages"] = new
    (root / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))


def test_a_stage_added_in_dvc_yaml_joins_the_chain(tmp_path):
    add_distill(tmp_path)
    assert chain.models(tmp_path) == ["pretrain", "sft", "dpo", "rl", "distill"]
    assert chain.source("distill", tmp_path) == "data/models/rl"
    assert chain.final(tmp_path) == "distill"  # quantize takes it
    assert "distill" in chain.model_deps("evaluate", tmp_path)
    assert chain.stage_order(tmp_path).index("distill") == \
        chain.stage_order(tmp_path).index("rl") + 1
    # the flow runs it with the default timeout until flow.timeouts names it
    assert FlowConfig().timeout("distill") == FlowConfig().timeouts.default
    assert FlowConfig().timeout("sft") == FlowConfig().timeouts.sft


def test_a_stage_that_names_no_model_or_two_is_refused(tmp_path):
    graph = yaml.safe_load((REPO / "dvc.yaml").read_text())
    graph["stages"]["dpo"]["deps"].remove("data/models/sft")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(graph))
    with pytest.raises(UserError, match=r"stage 'dpo' must list exactly one model it starts "
                                        r"from among its deps.*found none"):
        chain.source("dpo", tmp_path)
    graph["stages"]["dpo"]["deps"] += ["data/models/pretrain", "data/models/sft"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(graph))
    with pytest.raises(UserError, match=r"\['pretrain', 'sft'\]"):
        chain.source("dpo", tmp_path)
    assert chain.model_dep("evaluate", "sft", REPO) == "data/models/sft"
    with pytest.raises(UserError, match="stage 'quantize' does not depend on model 'sft'"):
        chain.model_dep("quantize", "sft", REPO)
    with pytest.raises(UserError, match="no stage 'distil'"):
        chain.model_deps("distil", tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: [")
    with pytest.raises(UserError, match="cannot read the pipeline"):
        chain.models(tmp_path)


@pytest.mark.skipif(shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc")
                    .exists(), reason="dvc is not installed")
def test_editing_one_stage_entry_of_dvc_yaml_stales_that_stage_alone(tmp_path):
    """Why the chain lives in dvc.yaml: DVC hashes each stage's own entry, not the file, so an
    edit of one stage's entry (a new model dep, as inserting a stage makes) re-runs that stage
    and what follows it, never the stages before it."""
    dvc = str(Path(sys.executable).parent / "dvc") if (Path(sys.executable).parent / "dvc") \
        .exists() else "dvc"

    def run(*args):
        return subprocess.run([dvc, *args], cwd=tmp_path, capture_output=True, text=True,
                              check=True, env={"DVC_NO_ANALYTICS": "1", "PATH": "/usr/bin:/bin"})

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    run("init", "-q")
    stages = {"a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
              "b": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
              "c": {"cmd": "cat b.txt > c.txt", "deps": ["b.txt"], "outs": ["c.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run("repro", "-q")
    stages["b"]["deps"].append("extra.txt")
    (tmp_path / "extra.txt").write_text("x\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    status = run("status", "--json").stdout
    changed = set(yaml.safe_load(status))
    assert changed == {"b"}, status  # c follows once b's output changes, a never
