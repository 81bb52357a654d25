"""Prefect flow ``llm-pipeline``: one task per DVC stage, DVC decides what is stale.

    python -m pipeline.flow serve                      # serve deployment llm-pipeline/local
    python -m pipeline.flow run --set pretrain.lr=0.001 --name lr-1e-3   # run once, no server

Each task runs ``dvc repro <stage>`` in its own process group (a timeout or a cancellation
kills the whole tree), retries transient failures (not a stage that failed on bad input,
which exits with status 2), and has a per-stage timeout from ``flow.timeouts`` in
params.yaml. Prefect's own result caching is off: DVC knows what is stale.

With param overrides the run is a DVC experiment: the overrides are applied to params.yaml,
the stages run, ``dvc exp save -n NAME`` records the experiment (so it shows in
``dvc exp show``), and the workspace (params.yaml, dvc.lock, metrics/, reports/ and the DVC
outputs) is put back as it was, whether the run succeeded or not.

The flow opens the MLflow parent run; every stage's run is its child. The deployment is
served with a global concurrency limit of 1: DVC's lock allows one pipeline at a time, so a
second triggered run waits for the first instead of failing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from llmcore.config.base import parse_section
from llmcore.config.flow import FlowConfig
from llmcore.schema import USER_ERROR
from llmcore.tracking import MlflowTracker, default_uri, host_name, unreachable
from stages import chain, paths

ROOT = Path(__file__).resolve().parents[1]
# the stages in pipeline order, as dvc.yaml declares them (one place to add a stage)
STAGES = tuple(chain.stage_order(ROOT))


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str) -> None:
        self.stage, self.returncode = stage, returncode
        super().__init__(f"stage {stage} failed (exit {returncode}):\n{tail}")


def flow_settings(root: Path) -> FlowConfig:
    """The ``flow:`` section, checked by its schema (a bad key or value names itself)."""
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    return parse_section("flow", params.get("flow"), FlowConfig)


def run_command(args: list[str], cwd: Path, env: Mapping[str, str], timeout: float,
                logger: Any) -> tuple[int, str]:
    """Run a command in its own process group; stream its output; kill the group on exit."""
    proc = subprocess.Popen(args, cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            chunk = proc.stdout.readline()
            if chunk:
                lines.append(chunk.rstrip("\n"))
                logger.info(chunk.rstrip("\n"))
                continue
            if proc.poll() is not None:
                rest = proc.stdout.read() or ""
                for line in rest.splitlines():
                    lines.append(line)
                    logger.info(line)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(args)} ran past its {timeout:.0f}s timeout")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:  # timeout, cancellation, or the flow process is going away
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "\n".join(lines[-40:])


def _no_retry_on_user_error(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode != USER_ERROR
    except Exception:
        return True
    return False


@task(cache_policy=NO_CACHE, retry_condition_fn=_no_retry_on_user_error, log_prints=True)
def dvc_stage(stage: str, root: str, env: dict[str, str], timeout: float) -> str:
    """``dvc repro <stage>`` (upstream stages are reproduced first when stale)."""
    logger = get_run_logger()
    code, tail = run_command(["dvc", "repro", stage], Path(root), env, timeout, logger)
    if code != 0:
        raise StageFailed(stage, code, tail)
    return tail.splitlines()[-1] if tail else ""


@task(cache_policy=NO_CACHE)
def dvc_exp_save(name: str, root: str, env: dict[str, str],
                 targets: list[str] | None = None) -> None:
    """``dvc exp save``; with ``targets`` (a run of some stages), only those stages' outputs
    (the others may not exist in this workspace)."""
    logger = get_run_logger()
    code, tail = run_command(["dvc", "exp", "save", "-f", "-n", name, *(targets or [])],
                             Path(root), env, 600, logger)
    if code != 0:
        raise RuntimeError(f"dvc exp save failed:\n{tail}")


def select_stages(stages: list[str] | None) -> list[str]:
    """The stages a run names, in pipeline order; every stage when it names none."""
    selected = list(stages or STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return [s for s in STAGES if s in selected]


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    node = params
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ValueError(f"override {key!r}: params.yaml has no section {part!r}")
        node = node[part]
    node[parts[-1]] = value


class WorkspaceSnapshot:
    """Files a pipeline run rewrites, saved before and put back after an experiment."""

    PATHS = ("params.yaml", "dvc.lock", paths.METRICS, paths.REPORTS)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = Path(tempfile.mkdtemp(prefix="llmcore-snapshot-"))
        for rel in self.PATHS:
            src = root / rel
            if src.is_dir():
                shutil.copytree(src, self.dir / rel)
            elif src.is_file():
                shutil.copy2(src, self.dir / rel)

    def restore(self, env: Mapping[str, str]) -> None:
        for rel in self.PATHS:
            src, dst = self.dir / rel, self.root / rel
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            if src.is_dir():
                shutil.copytree(src, dst)
            elif src.is_file():
                shutil.copy2(src, dst)
        shutil.rmtree(self.dir, ignore_errors=True)
        # bring data/ back in line with the restored dvc.lock (from the DVC cache)
        subprocess.run(["dvc", "checkout", "--quiet"], cwd=self.root, env=dict(env),
                       capture_output=True, timeout=600)


def read_metrics(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted((root / paths.METRICS).glob("*.json")):
        try:
            out.update(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return out


def summary_artifact(metrics: Mapping[str, Any], parent_run_id: str | None,
                     exp_name: str | None, run_name: str) -> None:
    """The table of final metrics shown on the flow run's page in the Prefect UI."""
    rows = [{"metric": k, "value": v} for k, v in sorted(metrics.items())]
    rows.append({"metric": "mlflow_parent_run_id", "value": parent_run_id})
    if exp_name:
        rows.append({"metric": "dvc_experiment", "value": exp_name})
    create_table_artifact(key="llm-pipeline-metrics", table=rows,
                          description=f"Final metrics of flow run {run_name}")


@flow(name="llm-pipeline", log_prints=True)
def llm_pipeline(stages: list[str] | None = None, overrides: dict[str, Any] | None = None,
                 experiment: str | None = None) -> dict[str, Any]:
    """Run the DVC stages in order; with overrides, as a DVC experiment."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(os.environ.get("LLMCORE_ROOT", ROOT)).resolve()
    selected = select_stages(stages)
    settings = flow_settings(root)
    run_name = str(flow_run.get_name() or "manual")
    exp_name = experiment or (f"prefect-{run_name}" if overrides else None)

    env = {**os.environ, "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["MLFLOW_TRACKING_URI"] = env.get("MLFLOW_TRACKING_URI") or default_uri(root)
    parent = MlflowTracker(env["MLFLOW_TRACKING_URI"], f"pipeline-{run_name}",
                           tags={"llmcore.stage": "pipeline", "prefect.flow_run": run_name,
                                 "prefect.flow_run_id": str(flow_run.get_id() or ""),
                                 "dvc.exp_name": exp_name or "",
                                 "llmcore.overrides": json.dumps(overrides or {}),
                                 "llmcore.host": host_name()},
                           artifact_root=root / "mlartifacts")
    parent.log_params({f"override.{k}": v for k, v in (overrides or {}).items()})
    env["LLMCORE_PARENT_RUN_ID"] = parent.run_id or ""
    snapshot = None
    status = "FAILED"
    metrics: dict[str, Any] = {}
    try:
        if overrides:
            snapshot = WorkspaceSnapshot(root)
            params = yaml.safe_load((root / "params.yaml").read_text())
            for key, value in overrides.items():
                set_dotted(params, key, value)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            logger.info(f"experiment {exp_name}: overrides {overrides}")
        for stage in selected:
            dvc_stage.with_options(
                name=f"dvc-{stage}", retries=settings.retries,
                retry_delay_seconds=settings.retry_delay,
            )(stage, str(root), env, settings.timeout(stage))
        if exp_name:
            dvc_exp_save(exp_name, str(root), env,
                         None if len(selected) == len(STAGES) else selected)
        metrics = read_metrics(root)
        parent.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        status = "FINISHED"
    finally:
        if snapshot is not None:
            snapshot.restore(env)
        try:
            parent.finish(status)
        except Exception as exc:  # the server went away: say so, keep the stage's own error
            if (why := unreachable(exc)) is None:
                raise
            logger.warning(f"the MLflow server cannot be reached ({why}): run "
                           f"{parent.run_id} is left unfinished there")
        summary_artifact(metrics, parent.run_id, exp_name, run_name)
    return {"mlflow_parent_run_id": parent.run_id, "experiment": exp_name, "metrics": metrics}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE (got {pair!r})")
        out[key] = yaml.safe_load(raw)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.flow", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the deployment llm-pipeline/local")
    s.add_argument("--name", default="local")
    r = sub.add_parser("run", help="run the flow once in this process")
    r.add_argument("--stage", action="append", dest="stages", choices=STAGES)
    r.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    r.add_argument("--name", default=None, help="experiment name")
    args = ap.parse_args(argv)
    if args.command == "serve":
        llm_pipeline.serve(name=args.name, global_limit=1)
    else:
        result = llm_pipeline(stages=args.stages, overrides=parse_overrides(args.overrides) or None,
                              experiment=args.name)
        print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))


if __name__ == "__main__":
    main()
