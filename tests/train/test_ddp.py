"""DDP with 2 CPU processes (gloo) follows the same loss curve as 1 process."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import project_env, run_group

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow  # torchrun: two processes and a rendezvous


def run(cmd: list[str], env: dict, timeout: float = 300):
    return run_group(cmd, timeout, env=env)  # torchrun and its workers go on a timeout


def test_two_processes_match_one_at_the_same_global_batch(tiny_shards, tmp_path):
    shard_dir, tok = tiny_shards
    data = tmp_path / "shards"
    shutil.copytree(shard_dir, data)
    tok.save(data / "tok")
    env = project_env()
    env["OMP_NUM_THREADS"] = "1"
    script = [str(HERE / "dist_fit.py"), str(data)]
    single = run([sys.executable, *script, str(tmp_path / "one"), "--batch", "8"], env)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", *script, str(tmp_path / "two"), "--batch", "4"], env)
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())["losses"]
    two = json.loads((tmp_path / "two.json").read_text())["losses"]
    assert len(one) == len(two) == 12
    assert one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


def test_ranks_with_other_params_are_refused_before_training(tiny_shards, tmp_path):
    """A node started with another params.yaml (here: rank 1's lr) must not average its
    gradients into the run: every rank stops with a message naming the rank."""
    shard_dir, tok = tiny_shards
    data = tmp_path / "shards"
    shutil.copytree(shard_dir, data)
    tok.save(data / "tok")
    env = project_env()
    env["OMP_NUM_THREADS"] = "1"
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(HERE / "dist_fit.py"), str(data),
                str(tmp_path / "skew"), "--skew-rank", "1"], env)
    assert done.returncode != 0
    assert "rank(s) [1] would train another configuration than rank 0" in done.stderr
    assert not (tmp_path / "skew.json").exists()
