"""What a worker runs: the pipeline at the commit a run names, in the worker's own checkout.

Flow ``llm-team-pipeline`` (deployment ``llm-team-pipeline/team`` on pool ``llmcore``):

1. (the deployment's pull step, pipeline/team/steps.py, before this module is imported) fetch
   the team's git remote and check out the commit the run names, detached and forced: a
   worker never trains on a tree no one committed, and an unknown commit fails the run. The
   checkout is persistent: ignored files, the checkpoint folders among them, survive, so a
   run killed mid-stage resumes from its last checkpoint when it is run again. The task
   ``sync_checkout`` checks that the checkout is at that commit, in the run's record;
2. ``dvc pull`` what the team's DVC remote already has (a stage that is cached there is not
   trained again; what it lacks is recomputed, so a failed pull only warns);
3. the stages, as flow ``llm-pipeline`` runs them (a subflow), saved as DVC experiment
   ``experiment`` (``team-<flow run>`` by default), logged to the team's MLflow server;
4. ``dvc exp push``: the experiment's git ref to the team's git remote and its outputs to the
   DVC remote. A failed push fails the run with one line; nothing is lost, the experiment
   stays in this checkout and its DVC cache, and the same run again (same commit, stages and
   overrides) only pushes it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.flow import llm_pipeline, run_command
from pipeline.team.settings import REMOTE

GIT_TIMEOUT_S = 300


class TeamRunError(RuntimeError):
    """A step of a team run failed for a reason its message states in one line."""


def git(root: Path, *args: str, timeout: float = GIT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    """The line that says what went wrong: DVC's last ``ERROR:`` line, else the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["(no output)"])[-1]


@task(cache_policy=NO_CACHE)
def sync_checkout(root: str, commit: str) -> str:
    """The full id of ``commit``, checked to be what the checkout holds: the deployment's
    pull step (pipeline/team/steps.py) checked it out before this flow was imported."""
    path = Path(root)
    if not (path / ".git").exists():
        raise TeamRunError(f"{root} is not a git checkout: start the worker with "
                           "`python -m pipeline.team worker --checkout DIR`")
    wanted = git(path, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    head = git(path, "rev-parse", "HEAD").stdout.strip()
    if wanted.returncode or wanted.stdout.strip() != head:
        raise TeamRunError(f"the checkout {root} is at {head[:12] or 'no commit'}, not at "
                           f"{commit!r}: the run must come from deployment "
                           "llm-team-pipeline/team, whose pull step checks its commit out")
    get_run_logger().info(f"running commit {head} in {root}")
    return head


@task(cache_policy=NO_CACHE)
def dvc_pull(root: str, env: dict[str, str]) -> None:
    logger = get_run_logger()
    code, tail = run_command(["dvc", "pull", "--allow-missing"], Path(root), env, 1800, logger)
    if code:
        logger.warning(f"dvc pull: {last_line(tail)} (going on: the stages recompute what "
                       "this host lacks)")


@task(cache_policy=NO_CACHE)
def dvc_exp_push(root: str, name: str, env: dict[str, str]) -> None:
    logger = get_run_logger()
    code, tail = run_command(["dvc", "exp", "push", REMOTE, name], Path(root), env, 3600, logger)
    if code:
        raise TeamRunError(
            f"dvc exp push {REMOTE} {name} failed: {last_line(tail)}. Nothing is lost: the "
            f"experiment and its outputs stay in {root} and its DVC cache; the same run "
            "again (same commit, stages and overrides) pushes them")


def unpushed_marker(root: Path, name: str) -> Path:
    """Where a run records an experiment it saved but could not push (inside ``.git``: no
    checkout touches it)."""
    return root / ".git" / "llmcore-unpushed" / f"{name}.json"


def made_here_unpushed(root: Path, name: str, request: dict[str, Any]) -> bool:
    """Whether experiment ``name`` was made here, for the same request, by a run whose push
    failed: then only the push is left to do (the stages would only repeat themselves)."""
    marker = unpushed_marker(root, name)
    try:
        return json.loads(marker.read_text()) == request
    except (OSError, json.JSONDecodeError):
        return False


@flow(name="llm-team-pipeline", log_prints=True)
def team_pipeline(commit: str, stages: list[str] | None = None,
                  overrides: dict[str, Any] | None = None,
                  experiment: str | None = None) -> dict[str, Any]:
    """Run the pipeline at ``commit`` in this worker's checkout and push what it made."""
    from prefect.runtime import flow_run

    root = Path(os.environ.get("LLMCORE_WORKER_CHECKOUT") or os.getcwd()).resolve()
    full = sync_checkout(str(root), commit)
    env = {**os.environ, "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}
    dvc_pull(str(root), env)
    name = experiment or f"team-{flow_run.get_name() or 'run'}"
    request = {"commit": full, "stages": stages, "overrides": overrides}
    result: dict[str, Any] = {"experiment": name}
    if made_here_unpushed(root, name, request):
        get_run_logger().info(f"experiment {name} was made here by a run whose push failed: "
                              "pushing it")
    else:
        os.environ["LLMCORE_ROOT"] = str(root)
        os.environ["LLMCORE_EXP_NAME"] = name
        result = llm_pipeline(stages=stages, overrides=overrides, experiment=name)
        marker = unpushed_marker(root, name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(request))
    dvc_exp_push(str(root), name, env)
    unpushed_marker(root, name).unlink(missing_ok=True)
    return {**result, "commit": full}
