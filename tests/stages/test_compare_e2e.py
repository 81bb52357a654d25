"""`python -m pipeline.compare` end to end on the tiny params: DVC's queue runs every side and
seed, the seed changes the run and nothing else, and the report compares them."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, copy_project, project_env, run_group
from tests.stages.pipeline import TINY, dvc, set_params


def test_the_seed_reaches_no_data_stage_and_no_held_out_set():
    """base.seed is a param of the training and scoring stages only: the corpus, tokenizer,
    shards (and so every held-out set) are the same for every seed."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("fetch", "tokenizer", "pack"):
        assert "base.seed" not in stages[name].get("params", []), name
    for name in ("pretrain", "sft", "dpo", "rl"):
        assert "base.seed" in stages[name]["params"], name


@pytest.mark.slow
def test_a_seeded_comparison_through_the_dvc_queue(tmp_path):
    root = copy_project(tmp_path / "proj")
    set_params(root, TINY)
    # seeds and the queue are under test, not learning: 100 of TINY's 600 steps
    set_params(root, {"base": {"tracking": "none"},
                      "pretrain": {"max_steps": 100, "eval_every": 50}})
    packed = dvc(root, "repro", "pack")
    assert packed.returncode == 0, packed.stderr[-2000:]
    env = project_env()
    subprocess.run(["git", "commit", "-qam", "tiny params"], cwd=root, env=env, timeout=60,
                   check=True)
    # a variant that changes nothing the training computes: its runs must equal the
    # baseline's seed for seed, while two seeds must differ
    cmd = [sys.executable, "-m", "pipeline.compare", "--variant", "pretrain.log_every=7",
           "--seed-list", "1,2", "--target", "pretrain", "--metric", "pretrain/val_bpb",
           "--metric", "pretrain/train_loss", "--name", "t"]
    try:
        out = run_group(cmd, timeout=600, cwd=root, env=env)
    finally:  # the queue's workers are background processes: never leave them running
        dvc(root, "queue", "stop", "--kill")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "compare: 4/4 done (0 failed)" in out.stdout
    result = json.loads((root / "reports/compare/t.json").read_text())
    assert result["missing"] == [] and result["seeds"] == [1, 2]
    bpb = result["metrics"]["pretrain/val_bpb"]
    base, variant = bpb["sides"]["base"]["values"], bpb["sides"]["log-every-7"]["values"]
    assert len(base) == 2 and base[0] != base[1]  # another seed, another run
    assert variant == base  # the same seed repeats exactly
    assert bpb["against_baseline"]["log-every-7"]["verdict"] == "no detectable difference"
    assert (root / "reports/compare/t.png").is_file()
    assert "| pretrain/val_bpb | base | 2 |" in (root / "reports/compare/t.md").read_text()
    # --report-only reads the same experiments again without running anything
    again = run_group([*cmd, "--report-only"], timeout=120, cwd=root, env=env)
    assert again.returncode == 0 and "queued" not in again.stdout
    assert json.loads((root / "reports/compare/t.json").read_text())["metrics"] == \
        result["metrics"]
