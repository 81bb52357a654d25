"""The speedrun benchmark runs end to end on the tiny preset with a short budget."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, project_env


def test_speedrun_writes_both_sides_json_and_png(tiny_shards, tmp_path):
    shard_dir, tok = tiny_shards
    tok.save(tmp_path / "tok")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/speedrun.py"), "--preset", "tiny",
         "--seconds", "8", "--slice", "1", "--eval-every", "3", "--batch-size", "8",
         "--variant", "plain:model.doc_mask=false",
         "--shards", str(shard_dir), "--tokenizer", str(tmp_path / "tok"),
         "--out", str(tmp_path / "out"), "--device", "cpu"],
        env=project_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out/speedrun.json").read_text())
    assert set(result["sides"]) == {"llmcore", "plain", "peer"}
    assert result["variants"] == {"plain": {"model": {"doc_mask": False}, "pretrain": {}}}
    for side in result["sides"].values():
        assert side["steps"] > 0 and side["tokens_per_s"] > 0
        assert 8 <= side["seconds"] < 12  # its own clock: the budget plus at most one step
        assert len(side["evals"]) >= 3  # step 0, every 3 s, the end
        assert side["evals"][-1]["val_bpb"] < side["evals"][0]["val_bpb"]  # it learned
    assert result["tokens_per_s_ratio"] > 0 and len(result["checkpoints"]) >= 3
    assert Path(tmp_path / "out/speedrun.png").stat().st_size > 1000


def test_speedrun_rejects_a_malformed_variant(tiny_shards, tmp_path):
    shard_dir, tok = tiny_shards
    tok.save(tmp_path / "tok")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/speedrun.py"), "--shards", str(shard_dir),
         "--tokenizer", str(tmp_path / "tok"), "--variant", "x:optimizer=muon"],
        env=project_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "must be model.KEY=VALUE or pretrain.KEY=VALUE" in out.stderr
    assert "Traceback" not in out.stderr
