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
from llmcore.tracking import MlflowTracker, NullTracker, Tracker, default_uri

Body = Callable[[dict[str, Any], Tracker], Mapping[str, Any]]


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


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


def make_tracker(base: Any, stage: str, root: Path, cfgs: dict[str, Any]) -> Tracker:
    if base.tracking == "none" or rank() != 0:
        return NullTracker()
    tags = {
        "llmcore.stage": stage,
        "git_commit": git_commit(root),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri(root)
    run_name = f"{base.run_name}-{stage}" if base.run_name else stage
    tracker = MlflowTracker(uri, run_name, tags={k: v for k, v in tags.items() if v},
                            artifact_root=root / "mlartifacts",
                            parent_run_id=os.environ.get("LLMCORE_PARENT_RUN_ID") or None)
    params: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        params.update(flatten(name, cfg))
    tracker.log_params(params)
    return tracker


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
    except (UserError, FileNotFoundError) as exc:
        tracker.finish("FAILED")
        log(f"{stage}: error: {exc}")
        sys.exit(2)
    except BaseException:
        tracker.finish("FAILED")
        raise
    log(f"{stage}: done in {time.perf_counter() - start:.1f}s")
