"""What every stage shares: params loading, the tracker, metrics files, clean failures.

A stage module is ``main()`` = ``run_stage(name, sections, body)`` where ``body`` gets the typed
configs and a tracker and returns a flat metrics dict. Errors the user can fix
(:class:`llmcore.config.UserError`, a missing input) are printed as one clear message, without
a traceback, and the process exits with status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from llmcore.config import PARAMS_FILE, ConfigError, UserError, flatten, parse_sections
from llmcore.tracking import EXPERIMENT, MlflowTracker, NullTracker, Tracker, default_uri

Body = Callable[[dict[str, Any], Tracker], Mapping[str, Any]]


def repo_root() -> Path:
    """The working copy the stage runs in: DVC starts stages there (``wdir`` is the root).

    Not ``DVC_ROOT``: in queued and ``--temp`` experiments it names the original repository,
    while the stage runs in a temporary copy of it.
    """
    return Path.cwd().resolve()


def read_params(root: Path) -> dict[str, Any]:
    path = root / PARAMS_FILE
    if not path.is_file():
        raise ConfigError([f"{path} not found: run from the repository root"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{PARAMS_FILE} is not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{PARAMS_FILE} must be a mapping of sections"])
    return data


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(data), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def log(msg: str) -> None:
    if rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def write_tsv(path: Path, rows: list[Mapping[str, Any]], columns: list[str]) -> None:
    """A small TSV for ``dvc plots`` (rows missing a column get an empty cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join("" if row.get(c) is None else f"{row[c]:.6g}"
                               if isinstance(row[c], float) else str(row[c]) for c in columns))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def relaunch_under_torchrun(nproc: int, module: str) -> None:
    """Replace this process by ``torchrun --nproc_per_node nproc -m module`` (once)."""
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    log(f"{module}: starting {nproc} processes with torchrun")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", module]
    os.execv(sys.executable, args)


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def tracking_root(root: Path) -> Path:
    """The repository whose MLflow store a stage logs to.

    ``dvc exp run --temp`` and queued experiments run in ``<repo>/.dvc/tmp/exps/<tmp>/``:
    their runs belong in ``<repo>``'s store, next to every other run.
    """
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    text = str(root)
    return Path(text.split(marker, 1)[0]) if marker in text else root


def dvc_invocation() -> str | None:
    """An id of the ``dvc`` process that started this stage (pid and start time), if any."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(c).name == "dvc" for c in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return f"{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def data_hashes(root: Path, stage: str) -> dict[str, str]:
    """``{"data.<dep>": md5}`` for the stage's data dependencies, from dvc.lock."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
        graph = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    outs = {o["path"]: o.get("md5", "") for s in (lock.get("stages") or {}).values()
            for o in s.get("outs", [])}
    deps = (graph.get("stages") or {}).get(stage, {}).get("deps", [])
    return {f"data.{d}": outs[d] for d in deps if isinstance(d, str) and d in outs}


def pipeline_parent(client_uri: str, root: Path, base: Any) -> str | None:
    """The MLflow parent run of this pipeline execution.

    A Prefect flow passes its run in ``LLMCORE_PARENT_RUN_ID``. Under a plain ``dvc repro``
    (or ``dvc exp run``) the stages of one invocation share the parent run tagged with that
    dvc process's id; the first stage creates it.
    """
    if os.environ.get("LLMCORE_PARENT_RUN_ID"):
        return os.environ["LLMCORE_PARENT_RUN_ID"]
    key = dvc_invocation()
    if key is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(client_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        found = client.search_runs([exp.experiment_id],
                                   f"tags.`llmcore.invocation` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    name = f"{base.run_name}-pipeline" if base.run_name else f"dvc-{exp_name or 'repro'}"
    parent = MlflowTracker(client_uri, name, tags={
        "llmcore.stage": "pipeline", "llmcore.invocation": key, "git_commit": git_commit(root),
        "dvc.exp_name": exp_name, "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", "")},
        artifact_root=tracking_root(root) / "mlartifacts")
    return parent.run_id


def make_tracker(base: Any, stage: str, root: Path, cfgs: dict[str, Any]) -> Tracker:
    if base.tracking == "none" or rank() != 0:
        return NullTracker()
    tags = {
        "llmcore.stage": stage,
        "git_commit": git_commit(root),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        **data_hashes(root, stage),
    }
    store = tracking_root(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri(store)
    run_name = f"{base.run_name}-{stage}" if base.run_name else stage
    tracker = MlflowTracker(uri, run_name, tags={k: v for k, v in tags.items() if v},
                            artifact_root=store / "mlartifacts",
                            parent_run_id=pipeline_parent(uri, root, base))
    params: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        params.update(flatten(name, cfg))
    tracker.log_params(params)
    return tracker


def close_parent(tracker: Tracker, status: str) -> None:
    """Mark a ``dvc repro`` parent run as ended by its latest stage (a flow closes its own)."""
    client = getattr(tracker, "client", None)
    parent = getattr(tracker, "parent_run_id", None)
    if client is None or parent is None or os.environ.get("LLMCORE_PARENT_RUN_ID"):
        return
    client.set_terminated(parent, status=status)


def run_stage(stage: str, sections: list[str], body: Body) -> None:
    """Load params, run ``body``, write ``metrics/<stage>.json``; exit 2 on a user error."""
    root = repo_root()
    start = time.perf_counter()
    try:
        cfgs = parse_sections(read_params(root), sections)
        tracker = make_tracker(cfgs["base"], stage, root, cfgs)
    except UserError as exc:
        log(f"{stage}: {exc}")
        sys.exit(2)
    try:
        metrics = dict(body(cfgs, tracker))
        if rank() != 0:
            return
        metrics[f"{stage}/stage_seconds"] = round(time.perf_counter() - start, 3)
        write_json(root / "metrics" / f"{stage}.json", metrics)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.finish("FINISHED")
        close_parent(tracker, "FINISHED")
    except (UserError, FileNotFoundError) as exc:
        tracker.finish("FAILED")
        close_parent(tracker, "FAILED")
        log(f"{stage}: error: {exc}")
        sys.exit(2)
    except BaseException:
        tracker.finish("FAILED")
        close_parent(tracker, "FAILED")
        raise
    log(f"{stage}: done in {time.perf_counter() - start:.1f}s")


def registry_bpb(model_dir: Path, shard_dir: Path, device_name: str) -> float:
    """Bits per byte on every held-out SFT reply: the number the model registry ranks by."""
    import torch

    from llmcore.checkpoint import load_model_dir
    from llmcore.shards import ShardDataset
    from llmcore.tokenizer import LLMTokenizer, token_bytes
    from llmcore.train import evaluate, pick_device

    device = pick_device(device_name)
    model, _ = load_model_dir(model_dir, device)
    val = ShardDataset(shard_dir, "sft_val")
    tb = torch.tensor(token_bytes(LLMTokenizer.load(model_dir)))
    return evaluate(model, val, 16, -(-len(val) // 16), tb, device, torch.float32)["bpb"]
