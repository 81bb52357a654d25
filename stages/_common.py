"""What every stage shares: params loading, the tracker, metrics files, clean failures.

A stage reads the params its ``params:`` in dvc.yaml list (whole sections or single keys,
``base.seed``; :func:`stages.chain.params`), and its ``main()`` is ``run_stage(name, body,
Params)``. ``body`` gets the typed configs of those sections and a tracker and returns a flat
metrics dict. A section listed key by key reaches ``body`` as a view that refuses the other
keys, so a stage cannot come to depend on a param that DVC does not know it depends on.

Errors the user can fix (:class:`llmcore.schema.UserError`: params, input data, a missing
stage output) are printed as one clear message, without a traceback, and the process exits
with status 2. ``base.run_name`` and ``base.tracking`` only name and route the MLflow run, so
no stage declares them and every stage may read them here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmcore.config.base import (
    PARAMS_FILE,
    BaseConfig,
    check_sections,
    flatten,
    parse_sections,
)
from llmcore.files import write_json, write_text
from llmcore.metric_keys import stage_seconds
from llmcore.schema import USER_ERROR, ConfigError, UserError
from llmcore.tracking import (
    NullTracker,
    Tracker,
    default_uri,
    end_stage_run,
    host_name,
    stage_run,
    unreachable,
)
from stages import chain, paths


class StageParams:
    """A stage's typed params: one field per params.yaml section it declares (``base`` holds
    only its declared keys; reading another one fails, see :class:`SectionView`)."""

    def sections(self) -> dict[str, Any]:
        """``section -> config``, for lineage tags and the MLflow params."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def schemas(cls) -> dict[str, type]:
        """``section -> its schema``, read from the fields' types: the sections a stage parses
        are the ones it names (``base`` always, for tracking), and nothing imports the rest."""
        hints = typing.get_type_hints(cls)
        return {"base": BaseConfig, **{f.name: hints[f.name] for f in dataclasses.fields(cls)}}  # type: ignore[arg-type]


P = TypeVar("P", bound=StageParams)
Body = Callable[[P, Tracker], Mapping[str, Any]]


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
    check_sections(data)
    return data


class UndeclaredParam(UserError, AttributeError):
    """A stage read a param that its params in dvc.yaml do not list: the user's to fix (in
    dvc.yaml), so it ends the stage with one line like any bad input; an AttributeError too,
    so that ``getattr(view, key, default)`` keeps working."""


class SectionView:
    """The keys of a params section that a stage declared; reading any other is an error."""

    def __init__(self, section: str, cfg: Any, keys: Sequence[str]) -> None:
        self._section, self._cfg, self._keys = section, cfg, tuple(keys)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._keys:
            raise UndeclaredParam(f"the stage reads {self._section}.{name} but does not declare "
                                 "it: add it to the stage's params in dvc.yaml")
        return getattr(self._cfg, name)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self._cfg, k) for k in self._keys}


def as_dict(cfg: Any) -> dict[str, Any]:
    """A typed config or a :class:`SectionView` as a plain dict (for meta files)."""
    return cfg.as_dict() if isinstance(cfg, SectionView) else dataclasses.asdict(cfg)


def declared(full: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The configs a stage's body may read: whole sections, or views of single keys."""
    out: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        if not name:
            out[section] = full[section]
    for key in keys:
        section, _, name = key.partition(".")
        if name and section not in out:
            names = [k.partition(".")[2] for k in keys if k.startswith(f"{section}.")]
            out[section] = SectionView(section, full[section], names)
    return out


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def log(msg: str) -> None:
    if rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def write_tsv(path: Path, rows: Sequence[Mapping[str, Any]], columns: list[str]) -> None:
    """A small TSV for ``dvc plots`` (rows missing a column get an empty cell)."""
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join("" if row.get(c) is None else f"{row[c]:.6g}"
                               if isinstance(row[c], float) else str(row[c]) for c in columns))
    write_text(path, "\n".join(lines) + "\n")


def relaunch_under_torchrun(section: str, module: str) -> None:
    """Replace this process by ``torchrun --nproc_per_node N -m module`` (once) when
    ``<section>.nproc_per_node`` asks for N > 1 processes."""
    try:
        raw = read_params(repo_root()).get(section)
    except UserError:
        return  # run_stage reports the problem
    nproc = raw.get("nproc_per_node", 1) if isinstance(raw, dict) else 1
    if not isinstance(nproc, int) or nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    log(f"{module}: starting {nproc} processes with torchrun")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", module]
    os.execv(sys.executable, args)


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


def model_tags(root: Path, stage: str, cfgs: Mapping[str, Any]) -> dict[str, str]:
    """Lineage of a registered model: git commit, DVC hashes of its data inputs, its params."""
    tags = {"git_commit": git_commit(root), "dvc.stage": stage, **data_hashes(root, stage)}
    tags.update({f"param.{k}": str(v) for k, v in flat_params(cfgs).items()})
    return {k: v for k, v in tags.items() if v}


def make_tracker(base: Any, stage: str, root: Path, params: Mapping[str, Any]) -> Tracker:
    """The stage's MLflow run (a child of its pipeline's run), or a do-nothing tracker."""
    if base.tracking == "none" or rank() != 0:
        return NullTracker()
    # DVC names the experiment under `dvc exp run`; a team run names it for `dvc exp save`
    exp_name = os.environ.get("DVC_EXP_NAME") or os.environ.get("LLMCORE_EXP_NAME", "")
    lineage = {"git_commit": git_commit(root), "dvc.exp_name": exp_name,
               "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
               "llmcore.host": host_name()}
    tags = {"llmcore.stage": stage, "dvc.stage": os.environ.get("DVC_STAGE", ""), **lineage,
            **data_hashes(root, stage)}
    store = tracking_root(root)
    return stage_run(
        os.environ.get("MLFLOW_TRACKING_URI") or default_uri(store),
        f"{base.run_name}-{stage}" if base.run_name else stage,
        {k: v for k, v in tags.items() if v}, params, store / "mlartifacts",
        parent_run_id=os.environ.get("LLMCORE_PARENT_RUN_ID") or None,
        invocation=dvc_invocation(),
        pipeline_name=f"{base.run_name}-pipeline" if base.run_name else
        f"dvc-{exp_name or 'repro'}",
        pipeline_tags=lineage)


def flat_params(cfgs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for name, cfg in cfgs.items() for k, v in flatten(name, as_dict(cfg)).items()}


def fail(stage: str, exc: BaseException) -> None:
    log(f"{stage}: error: {exc}")
    sys.exit(USER_ERROR)


def tracking_down(stage: str, exc: BaseException) -> None:
    """The tracking server went away: one line, and exit 1 (not the user's error, so the
    flow may retry); no model is registered, and DVC records no output of a failed stage."""
    log(f"{stage}: error: the MLflow server {os.environ.get('MLFLOW_TRACKING_URI', '')} cannot "
        f"be reached ({unreachable(exc)}); nothing of this stage was registered: run it again "
        "once the server is back")
    sys.exit(1)


def run_stage(stage: str, body: Body[P], params: type[P]) -> None:
    """Load the params dvc.yaml lists for ``stage``, run ``body``, write
    ``metrics/<stage>.json``; exit 2 on a user error."""
    root = repo_root()
    start = time.perf_counter()
    try:
        keys = chain.params(stage, root)
        schemas = params.schemas()
        sections = list(dict.fromkeys(["base", *(k.partition(".")[0] for k in keys)]))
        missing = [s for s in sections if s not in schemas]
        if missing:
            raise UserError(f"{chain.DVC_FILE}: stage {stage!r} lists params of "
                            f"{', '.join(missing)}, which it does not read (its Params class "
                            f"has {', '.join(schemas)})")
        full = parse_sections(read_params(root), {s: schemas[s] for s in sections})
        cfgs = declared(full, keys)
        unlisted = [f.name for f in dataclasses.fields(params)  # type: ignore[arg-type]
                    if f.name not in cfgs]
        if unlisted:
            raise UserError(f"{chain.DVC_FILE}: stage {stage!r} reads the params of "
                            f"{', '.join(unlisted)}, which its params there do not list")
        typed = params(**cfgs)
        tracker = make_tracker(full["base"], stage, root, flat_params(cfgs))
    except UserError as exc:
        fail(stage, exc)
    except Exception as exc:
        if unreachable(exc) is None:
            raise
        tracking_down(stage, exc)
    try:
        metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                   for k, v in body(typed, tracker).items()}  # NaN is not JSON
        if rank() != 0:
            return
        metrics[stage_seconds(stage)] = round(time.perf_counter() - start, 3)
        write_json(root / paths.METRICS / f"{stage}.json", metrics)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        end_stage_run(tracker, "FINISHED")
    except (UserError, FileNotFoundError) as exc:
        end_stage_run(tracker, "FAILED")
        fail(stage, exc)
    except BaseException as exc:
        if unreachable(exc) is None:
            end_stage_run(tracker, "FAILED")
            raise
        tracking_down(stage, exc)
    log(f"{stage}: done in {time.perf_counter() - start:.1f}s")
