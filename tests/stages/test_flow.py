"""Prefect orchestration against a real Prefect server on 127.0.0.1 (started and stopped here)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_project, project_env
from tests.stages.pipeline import TINY, set_params


class _Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


def test_timeout_kills_the_whole_process_tree(tmp_path):
    import psutil

    from pipeline.flow import run_command

    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(120)\n")
    logger = _Logger()
    start = time.time()
    with pytest.raises(TimeoutError, match="timeout"):
        run_command([sys.executable, "-c", script], tmp_path, dict(os.environ), 3.0, logger)
    assert time.time() - start < 30 and "started" in logger.lines
    grandchild = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, 10, "the grandchild process to die", interval=0.2)


# the runs here name the stages up to sft (what the tests use: a registered SFT model); each
# stage after it would cost its start-up and nothing more to check. `dvc exp save` then saves
# only their outputs.
UPTO_SFT = '["fetch", "tokenizer", "pack", "pretrain", "sft"]'


def test_select_stages_keeps_the_pipeline_order_and_names_the_unknown():
    from pipeline.flow import STAGES, select_stages
    from stages import chain

    assert select_stages(None) == list(STAGES) == chain.stage_order(REPO)
    assert len(STAGES) == 9 and STAGES[0] == "fetch" and STAGES[-1] == "quantize"
    assert select_stages(["sft", "fetch"]) == ["fetch", "sft"]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['train'\]"):
        select_stages(["train"])


def test_stage_exit_code_two_is_not_retried():
    from pipeline.flow import StageFailed, _no_retry_on_user_error

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert _no_retry_on_user_error(None, None, State(StageFailed("pack", 2, ""))) is False
    assert _no_retry_on_user_error(None, None, State(StageFailed("pack", 1, ""))) is True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None) -> dict | list:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def prefect_setup(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("flow"))
    set_params(root, TINY)
    # orchestration is under test here, not learning: a fraction of TINY's 600 steps (which
    # the SIGKILL test needs to kill a run in the middle)
    set_params(root, {"pretrain": {"max_steps": 150, "eval_every": 75},
                      "flow": {"retries": 0, "timeouts": {"pretrain": 600}}})
    subprocess.run(["git", "commit", "-qam", "tiny params"], cwd=root, env=project_env(),
                   check=True)
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = project_env()
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_LOGGING_LEVEL="INFO")
    bin_dir = Path(sys.executable).parent
    server_log = (home / "server.log").open("w")
    serve_log = (home / "serve.log").open("w")
    server = worker = None
    try:
        server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], cwd=root, env=env,
                                  start_new_session=True, stdout=server_log,
                                  stderr=subprocess.STDOUT)
        wait_for(lambda: _healthy(url), 120, "the Prefect server")
        worker = subprocess.Popen([sys.executable, "-m", "pipeline.flow", "serve"], cwd=root,
                                  env=env, start_new_session=True, stdout=serve_log,
                                  stderr=subprocess.STDOUT)
        wait_for(lambda: _deployment(url), 120, "deployment llm-pipeline/local")
        yield root, url, env
    finally:
        if worker is not None:
            stop(worker)
        if server is not None:
            stop(server)
        server_log.close()
        serve_log.close()


def _healthy(url: str) -> bool:
    try:
        return api(url, "/health") is True
    except OSError:
        return False


def _deployment(url: str):
    try:
        return api(url, "/deployments/name/llm-pipeline/local")
    except OSError:
        return None


def trigger(root: Path, env: dict, *params: str) -> str:
    args = [str(Path(sys.executable).parent / "prefect"), "deployment", "run",
            "llm-pipeline/local"]
    for p in params:
        args += ["-p", p]
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout)
    assert match, out.stdout
    return match.group(1)


def final_state(url: str, run_id: str, timeout: float = 600) -> dict:
    def done():
        run = api(url, f"/flow_runs/{run_id}")
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED",
                                               "CANCELLED") else None

    return wait_for(done, timeout, f"flow run {run_id}", interval=2.0)


def flow_logs(url: str, run_id: str) -> str:
    logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                     "limit": 200, "sort": "TIMESTAMP_ASC"})
    return "\n".join(entry["message"] for entry in logs)


@pytest.fixture(scope="module")
def override_run(prefect_setup):
    """A finished deployment run with an override, as DVC experiment lr-2e-3: what the tests
    after it build on (its DVC run cache, its registered model), done once per module."""
    root, url, env = prefect_setup
    params_before = (root / "params.yaml").read_text()
    # up to sft: the stages after it start the same way (test_select_stages names them all)
    run_id = trigger(root, env, 'overrides={"sft.lr": 0.002}', "experiment=lr-2e-3",
                     f"stages={UPTO_SFT}")
    return run_id, final_state(url, run_id), params_before


@pytest.mark.slow
def test_prefect_list_commands_work_against_the_live_server(prefect_setup):
    """The first commands a Prefect user types (422 with fastapi >= 0.151, see pyproject)."""
    root, _, env = prefect_setup
    prefect = str(Path(sys.executable).parent / "prefect")
    out = subprocess.run([prefect, "deployment", "ls"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "llm-pipeline/local" in out.stdout.replace("\n", "")
    for cmd in (["flow-run", "ls"], ["work-pool", "ls"], ["flow", "ls"]):
        out = subprocess.run([prefect, *cmd], cwd=root, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, (cmd, out.stdout + out.stderr)


@pytest.mark.slow
def test_deployment_run_with_override_is_a_dvc_experiment(prefect_setup, override_run):
    from mlflow.tracking import MlflowClient

    root, url, env = prefect_setup
    run_id, run, params_before = override_run
    assert run["state"]["type"] == "COMPLETED", flow_logs(url, run_id)[-3000:]
    assert (root / "params.yaml").read_text() == params_before

    show = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    assert "lr-2e-3" in show.stdout
    exps = json.loads(show.stdout)
    found = [e for b in exps for e in (b.get("experiments") or [])
             if e.get("name") == "lr-2e-3"]
    assert found
    params = found[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["sft"]["lr"] == 0.002

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llmcore")
    parents = client.search_runs([exp.experiment_id],
                                 "tags.`llmcore.stage` = 'pipeline'")
    assert len(parents) == 1 and parents[0].data.tags["dvc.exp_name"] == "lr-2e-3"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    stages = {c.data.tags["llmcore.stage"] for c in children}
    assert stages == {"fetch", "tokenizer", "pack", "pretrain", "sft"}
    sft = next(c for c in children if c.data.tags["llmcore.stage"] == "sft")
    assert sft.data.params["sft.lr"] == "0.002" and "sft/val_bpb" in sft.data.metrics
    assert sft.data.tags["git_commit"] and sft.data.tags.get("data.data/shards")
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": [
        "llm-pipeline-metrics"]}}})
    assert any(parents[0].info.run_id in json.dumps(a["data"]) for a in artifacts)


@pytest.fixture(scope="module")
def failed_then_fixed(prefect_setup, override_run):
    """After :func:`override_run`: a run with a bad pack param (it fails), then the same run
    fixed, with another SFT learning rate as experiment lr-1e-4 (the second registered model
    of the registry test). One fixed run serves both tests: each flow run costs a minute and a
    half of stage start-ups."""
    root, url, env = prefect_setup
    assert override_run[1]["state"]["type"] == "COMPLETED"  # its outputs are what is reused
    sft = '"sft.lr": 0.0001, "sft.min_lr": 0.00001'
    failed = trigger(root, env, f'overrides={{"pack.seq_len": 2, {sft}}}')
    failed_run = final_state(url, failed)
    params_after_failure = (root / "params.yaml").read_text()
    fixed = trigger(root, env, f'overrides={{"pack.seq_len": 32, {sft}}}', "experiment=lr-1e-4",
                    f"stages={UPTO_SFT}")
    return (failed, failed_run, params_after_failure), (fixed, final_state(url, fixed))


@pytest.mark.slow
def test_failing_stage_fails_the_flow_run_then_a_fixed_run_reuses_outputs(prefect_setup,
                                                                           failed_then_fixed):
    root, url, env = prefect_setup
    (run_id, run, params_after), (fixed, fixed_run) = failed_then_fixed
    assert run["state"]["type"] == "FAILED"
    logs = flow_logs(url, run_id)
    assert "pack.seq_len must be >= 8 (got 2)" in logs
    assert yaml.safe_load(params_after)["pack"]["seq_len"] == 32

    assert fixed_run["state"]["type"] == "COMPLETED", flow_logs(url, fixed)[-3000:]
    logs = flow_logs(url, fixed)
    for stage in ("fetch", "tokenizer", "pack"):  # restored from the DVC run cache
        assert f"Running stage '{stage}'" not in logs
    assert "is cached - skipping run" in logs
    # pretraining keeps uncached checkpoints, so DVC re-runs it: it resumes, trains nothing
    # (SFT trains anew: its learning rate changed)
    if "Running stage 'pretrain'" in logs:
        assert "pretrain: checkpoint is at step" in logs
    assert "Running stage 'sft'" in logs
    assert "Running stage 'dpo'" not in logs  # the run named its stages
    show = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "lr-1e-4" in show.stdout  # saved with only its stages' outputs


@pytest.mark.slow
def test_registry_best_alias_after_two_runs(prefect_setup, failed_then_fixed):
    from mlflow.tracking import MlflowClient

    from llmcore.tracking import PROMOTE_MARGIN

    root, url, env = prefect_setup
    assert failed_then_fixed[1][1]["state"]["type"] == "COMPLETED"  # the second of the two
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name='llmcore'")
    sft = [v for v in versions if v.tags.get("kind") == "sft"]
    assert len(sft) >= 2
    all_bpb = {str(v.version): float(v.tags["val_bpb"]) for v in versions}
    best = client.get_model_version_by_alias("llmcore", "best")
    # best moves only on evidence: it is within the margin of the lowest bpb, and every
    # version registered after it says why it did not take it
    assert all_bpb[str(best.version)] <= min(all_bpb.values()) + PROMOTE_MARGIN
    later = [v for v in versions if int(v.version) > int(best.version)]
    assert all(v.tags["promotion"].startswith("challenger") for v in later)
