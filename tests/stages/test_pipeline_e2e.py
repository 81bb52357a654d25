"""End to end: the real DVC pipeline in a temporary git repository."""

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import copy_project, project_env
from tests.stages.pipeline import TINY, dvc, ran, set_params

pytestmark = pytest.mark.slow  # the real DVC pipeline, minutes


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("e2e"))
    set_params(root, TINY)
    return root


def must(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# The tests run in file order and each leaves the project as the next expects; run alone (or
# after a failure), a test gets that state from these fixtures, which do nothing when an
# earlier test already made it.
@pytest.fixture
def packed(project):
    """The project after test_repro_pack_then_nothing_then_only_downstream: packed twice, the
    second time with vocab_size 420 (two pipeline runs in MLflow)."""
    if not (project / "data/shards/manifest.json").is_file():
        must(dvc(project, "repro", "pack"))
        set_params(project, {"tokenizer": {"vocab_size": 420}})
        must(dvc(project, "repro", "pack"))
    return project


@pytest.fixture
def pretrained(packed):
    """The project with a finished pretraining run (what the sigkill test leaves)."""
    if not (packed / "data/models/pretrain/model.safetensors").is_file():
        set_params(packed, {"pretrain": {"resume": "never"}})
        must(dvc(packed, "repro", "pretrain"))
    return packed


def test_stages_import_the_projects_own_code(project):
    out = subprocess.run(["python", "-c", "import llmcore; print(llmcore.__file__)"], cwd=project,
                         env=project_env(), capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve().is_relative_to(project.resolve())


def test_repro_pack_then_nothing_then_only_downstream(project):
    first = dvc(project, "repro", "pack")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran(first.stdout) == {"fetch", "tokenizer", "pack"}
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["splits"]["pretrain_train"]["rows"] > 0
    assert manifest["splits"]["sft_train"]["has_loss_mask"] is True
    for stage, keys in {"fetch": ["fetch/documents", "fetch/bytes", "fetch/bad_records",
                                  "fetch/duplicates_dropped"],
                        "tokenizer": ["tokenizer/vocab_size", "tokenizer/bytes_per_token_val"],
                        "pack": ["pack/tokens", "pack/tokens_per_second",
                                 "pack/pretrain_train_cropped_fraction",
                                 "pack/sft_train_padded_fraction"]}.items():
        metrics = json.loads((project / f"metrics/{stage}.json").read_text())
        assert set(keys) <= set(metrics), (stage, metrics)
    assert json.loads((project / "metrics/fetch.json").read_text())["fetch/documents"] == 80

    second = dvc(project, "repro", "pack")
    assert second.returncode == 0 and ran(second.stdout) == set(), second.stdout

    set_params(project, {"tokenizer": {"vocab_size": 420}})
    third = dvc(project, "repro", "pack")
    assert third.returncode == 0, third.stdout + third.stderr
    assert ran(third.stdout) == {"tokenizer", "pack"}
    assert json.loads((project / "metrics/tokenizer.json").read_text())[
        "tokenizer/vocab_size"] == 420


def test_stages_are_tracked_in_mlflow(packed):
    project = packed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llmcore")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["llmcore.stage"], []).append(r)
    assert set(by_stage) == {"pipeline", "fetch", "tokenizer", "pack"}
    assert len(by_stage["tokenizer"]) == 2
    # one parent run per `dvc repro` that ran something; its stages are its children
    parents = {r.info.run_id for r in by_stage["pipeline"]}
    assert len(parents) == 2
    children = [r for s in ("fetch", "tokenizer", "pack") for r in by_stage[s]]
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in children)
    fetch_parent = by_stage["fetch"][0].data.tags["mlflow.parentRunId"]
    first = [r for r in children if r.data.tags["mlflow.parentRunId"] == fetch_parent]
    assert sorted(r.data.tags["llmcore.stage"] for r in first) == ["fetch", "pack", "tokenizer"]
    assert all(r.info.status == "FINISHED" for r in by_stage["pipeline"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True).stdout.strip()
    pack = by_stage["pack"][0]
    assert pack.data.tags["git_commit"] == head and pack.data.tags["dvc.stage"] == "pack"
    assert pack.data.params["pack.seq_len"] == "32" and pack.data.metrics["pack/tokens"] > 0
    assert pack.data.tags["data.data/tokenizer"] and pack.data.tags["data.data/corpus"]


def test_invalid_params_fail_clearly_and_lose_nothing(packed):
    project = packed
    before = (project / "data/shards/manifest.json").read_text()
    set_params(project, {"pack": {"seq_len": 2}})
    bad = dvc(project, "repro", "pack")
    assert bad.returncode != 0
    assert "params.yaml: pack.seq_len must be >= 8 (got 2)" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    set_params(project, {"pack": {"seq_len": 32}})
    again = dvc(project, "repro", "pack")
    assert again.returncode == 0, again.stdout + again.stderr
    assert ran(again.stdout) == set()  # restored from the run cache, nothing re-computed
    assert (project / "data/shards/manifest.json").read_text() == before


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(Path(p).name[5:])
                  for p in glob.glob(str(root / "data/checkpoints/pretrain/*/step-*")))


def test_pretrain_resumes_bit_exactly_after_sigkill(packed):
    from safetensors.torch import load_file

    project = packed
    proc = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=project, env=project_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = checkpoint_steps(project)
            if steps and steps[-1] >= 200:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:  # a failed assertion or a timeout above: no run left behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert 200 <= checkpoint_steps(project)[-1] < 600
    assert not (project / "data/models/pretrain").exists()

    resumed = dvc(project, "repro", "pretrain")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stderr + resumed.stdout
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert metrics["pretrain/resumed_from"] >= 200 and metrics["pretrain/steps"] == 600
    after_kill = load_file(str(project / "data/models/pretrain/model.safetensors"))
    assert (project / "metrics/pretrain_train.tsv").read_text().count("\n") == 601

    set_params(project, {"pretrain": {"resume": "never"}})  # same run, never interrupted
    fresh = dvc(project, "repro", "pretrain")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert json.loads((project / "metrics/pretrain.json").read_text())[
        "pretrain/resumed_from"] == -1
    never_killed = load_file(str(project / "data/models/pretrain/model.safetensors"))
    assert after_kill.keys() == never_killed.keys()
    assert all(torch.equal(after_kill[k], never_killed[k]) for k in after_kill)


def test_repro_runs_every_stage_then_nothing_then_sft_downstream(pretrained):
    project = pretrained
    full = dvc(project, "repro")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    keys = {
        "sft": ["sft/val_bpb", "sft/val_loss", "sft/tokens_per_second", "sft/mfu"],
        "evaluate": ["evaluate/pretrain/docs_bpb", "evaluate/sft/docs_bpb",
                     "evaluate/sft/sft_bpb", "evaluate/pretrain/bpb_ctx2x",
                     "evaluate/sft/bpb_ctx4x", "evaluate/sft/arithmetic_exact_match",
                     "evaluate/pretrain/doc_mc_accuracy", "evaluate/sft/im_end_rate",
                     "evaluate/rl/doc_mc_accuracy_clean_n", "evaluate/contract/violations",
                     "evaluate/contamination/docs_test/contaminated"],
        "dpo": ["dpo/val_reward_accuracy", "dpo/kl_to_reference", "dpo/trainable_share",
                "dpo/train_pairs"],
        "rl": ["rl/reward_last10", "rl/arithmetic_exact_before", "rl/arithmetic_exact_after"],
        "quantize": ["quantize/size_ratio", "quantize/bpb_delta",
                     "quantize/greedy_token_agreement", "quantize/decode_speed_ratio"],
    }
    for stage, wanted in keys.items():
        metrics = json.loads((project / f"metrics/{stage}.json").read_text())
        assert set(wanted) <= set(metrics), (stage, sorted(metrics))
    q = json.loads((project / "metrics/quantize.json").read_text())
    assert q["quantize/size_ratio"] > 1.5 and abs(q["quantize/bpb_delta"]) < 0.1
    for report in ("comparison.md", "extrapolation.md", "samples.md", "contamination.md"):
        assert (project / "reports/evaluate" / report).read_text().startswith("# ")
    assert (project / "data/models/chat-int8/config.json").is_file()
    assert "| metric | pretrain | sft | dpo | rl |" in (
        project / "reports/evaluate/comparison.md").read_text()
    assert json.loads((project / "metrics/dpo.json").read_text())["dpo/trainable_share"] < 0.5
    assert (project / "data/models/dpo/adapter/adapter_model.safetensors").is_file()

    again = dvc(project, "repro")
    assert again.returncode == 0 and ran(again.stdout) == set(), again.stdout

    set_params(project, {"sft": {"lr": 0.002}})
    changed = dvc(project, "repro")
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert ran(changed.stdout) == {"sft", "dpo", "rl", "evaluate", "quantize"}


def test_queued_grid_runs_and_logs_to_the_main_store(packed):
    from mlflow.tracking import MlflowClient

    project = packed
    params_before = (project / "params.yaml").read_text()
    subprocess.run(["git", "commit", "-qam", "params"], cwd=project, env=project_env(),
                   timeout=60)
    queued = dvc(project, "exp", "run", "--queue", "-S", "tokenizer.vocab_size=300,330", "pack")
    assert queued.returncode == 0, queued.stderr
    try:
        started = dvc(project, "queue", "start")
        assert started.returncode == 0, started.stderr

        def finished() -> bool:
            status = dvc(project, "queue", "status").stdout
            return "Queued" not in status and "Running" not in status

        deadline = time.time() + 300
        while not finished() and time.time() < deadline:
            time.sleep(2)
        status = dvc(project, "queue", "status").stdout
    finally:  # the queue's workers are background processes: never leave them running
        dvc(project, "queue", "stop", "--kill")
    assert status.count("Success") == 2, status
    show = json.loads(dvc(project, "exp", "show", "--json").stdout)
    sizes = {e["revs"][0]["data"]["params"]["params.yaml"]["data"]["tokenizer"]["vocab_size"]
             for b in show for e in (b.get("experiments") or [])}
    assert {300, 330} <= sizes
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llmcore")
    names = {r.data.tags.get("dvc.exp_name") for r in client.search_runs(
        [exp.experiment_id], "tags.`llmcore.stage` = 'tokenizer'")}
    assert len(names - {None, ""}) >= 2  # both queued runs logged here, not in their temp copy
    assert (project / "params.yaml").read_text() == params_before
