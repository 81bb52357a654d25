"""Experiment tracking behind a small interface: MLflow for real runs, a null one for tests.

Only this module imports ``mlflow``. The store is SQLite at an absolute path inside the
repository (``sqlite:///<repo>/mlflow.db``) and artifacts go to ``<repo>/mlartifacts``, so runs
started from a ``dvc exp run --temp`` copy of the repository land in the same store. Per-step
metrics are buffered and sent with ``log_batch`` (one ``log_metric`` call costs milliseconds);
call :meth:`Tracker.flush` or close the tracker to send them.

Runs nest: each stage's run is the child of a pipeline run. A Prefect flow opens its pipeline
run and passes its id down; under a plain ``dvc repro`` the stages of one invocation find the
pipeline run by a tag naming that ``dvc`` process (:func:`stage_run`), the first stage creates it
and each stage marks it ended with its own status.

Telemetry of MLflow is switched off before it is imported.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeAlias

# A param's value: what a flattened params section holds (llmcore.schema.JSONValue, spelled
# again here because this module imports no library code: see llmcore.lineage), logged as text
ParamValue: TypeAlias = "str | int | float | bool | None | list[ParamValue] | dict[str, ParamValue]"

EXPERIMENT = "llmcore"
_PARAM_MAX = 6000  # MLflow's limit on a param value's length


class Tracker(Protocol):
    @property
    def run_id(self) -> str | None: ...


    def log_params(self, params: Mapping[str, ParamValue]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def start_system_metrics(self, interval: float = 10.0) -> None: ...


class NullTracker:
    """Keeps everything in memory; what tests and ``base.tracking: none`` use."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.params: dict[str, ParamValue] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.status: str | None = None

    def log_params(self, params: Mapping[str, ParamValue]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status

    def start_system_metrics(self, interval: float = 10.0) -> None:
        pass  # nothing to sample for: no run to log them to

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 *_: BaseException | TracebackType | None) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")


def host_name() -> str:
    """The host a run ran on (tag ``llmcore.host``): which machine of a team made a model."""
    return socket.gethostname()


def is_server(tracking_uri: str) -> bool:
    """A tracking server (``http(s)://``): it stores artifacts itself (``mlflow-artifacts:``)."""
    return tracking_uri.startswith(("http://", "https://"))


def unreachable(exc: BaseException) -> str | None:
    """One line saying the tracking server cannot be reached, if that is what ``exc`` is."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        # MLflow's REST client wraps what requests raised in this message; an error of
        # anything else (a rendezvous, a download) is not the tracking server's
        if isinstance(seen, (requests.ConnectionError, requests.Timeout)) or (
                isinstance(seen, MlflowException) and text.startswith("API request to")
                and "failed with exception" in text):
            first = text.strip().splitlines()[0] if text.strip() else type(seen).__name__
            return first[:300]
        seen = seen.__cause__ or seen.__context__
    return None


def default_uri(repo_root: Path) -> str:
    return f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"


def quiet_telemetry() -> None:
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true"),
                       ("MLFLOW_ENABLE_ASYNC_LOGGING", "false")):
        os.environ.setdefault(key, value)


class MlflowTracker:
    """One MLflow run (optionally nested under ``parent_run_id``) with buffered metrics."""

    def __init__(self, tracking_uri: str, run_name: str, tags: Mapping[str, str] | None = None,
                 experiment: str = EXPERIMENT, artifact_root: Path | None = None,
                 parent_run_id: str | None = None, flush_every: int = 500) -> None:
        quiet_telemetry()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # a server keeps artifacts itself; a folder here would be one only this host sees
            location = (Path(artifact_root).resolve().as_uri()
                        if artifact_root and not is_server(tracking_uri) else None)
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id: str = run.info.run_id
        self.parent_run_id = parent_run_id
        self.owns_parent = False  # set by stage_run: the pipeline run is this process's to end
        self.flush_every = flush_every
        self._buffer: list[Any] = []
        self._finished = False
        self._system: Any = None

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """Sample CPU / memory / GPU use into the run (``system/...`` metrics) until finish."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                            tracking_uri=self.client.tracking_uri)
        self._system.start()

    def log_params(self, params: Mapping[str, ParamValue]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._buffer.append(Metric(key, float(value), now, step or 0))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished:
            return
        if self._system is not None:
            self._system.finish()
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
        self._finished = True

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 *_: BaseException | TracebackType | None) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")


def pipeline_run(client_uri: str, invocation: str, name: str, tags: Mapping[str, str],
                 artifact_root: Path | None = None) -> str | None:
    """The id of the pipeline run tagged with ``invocation``; created if there is none."""
    quiet_telemetry()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(client_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        found = client.search_runs([exp.experiment_id],
                                   f"tags.`llmcore.invocation` = '{invocation}'", max_results=1)
        if found:
            return found[0].info.run_id
    parent = MlflowTracker(client_uri, name, tags={**tags, "llmcore.stage": "pipeline",
                                                   "llmcore.invocation": invocation},
                           artifact_root=artifact_root)
    return parent.run_id


def stage_run(client_uri: str, run_name: str, tags: Mapping[str, str],
              params: Mapping[str, ParamValue], artifact_root: Path,
              parent_run_id: str | None = None,
              invocation: str | None = None, pipeline_name: str = "pipeline",
              pipeline_tags: Mapping[str, str] | None = None) -> MlflowTracker:
    """A stage's run with its params, the child of ``parent_run_id`` (a flow's run) or of the
    run of the ``dvc`` ``invocation`` that started it (found or created)."""
    owns_parent = False
    if parent_run_id is None and invocation is not None:
        parent_run_id = pipeline_run(client_uri, invocation, pipeline_name,
                                     pipeline_tags or {}, artifact_root)
        owns_parent = True
    tracker = MlflowTracker(client_uri, run_name, tags=tags, artifact_root=artifact_root,
                            parent_run_id=parent_run_id)
    tracker.owns_parent = owns_parent
    tracker.log_params(params)
    return tracker


def end_stage_run(tracker: Tracker, status: str) -> None:
    """Finish a stage's run; a ``dvc repro`` pipeline run ends with its latest stage."""
    tracker.finish(status)
    if isinstance(tracker, MlflowTracker) and tracker.owns_parent and tracker.parent_run_id:
        tracker.client.set_terminated(tracker.parent_run_id, status=status)


def save_pyfunc(model_dir: Path, out: Path) -> Path:
    """Write ``model_dir`` as an MLflow ``pyfunc`` model at ``out`` (see :mod:`llmcore.export.pyfunc`).

    The flavour names its loader by module (``llmcore.export.pyfunc``) and ships the ``llmcore``
    package as code, so loading needs torch and tokenizers, not this repository.
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    # the params and their defaults are llmcore.export.pyfunc.DEFAULT_PARAMS (this module imports no
    # library code; a test compares the two)
    # no input schema: MLflow would enforce one by dropping what it does not name (a list of
    # strings became an empty answer); llmcore.export.pyfunc.requests checks every shape it
    # takes and names them in its error
    signature = ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(DataType.string, "completion")]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, 64),
                            ParamSpec("temperature", DataType.double, 0.0),
                            ParamSpec("top_p", DataType.double, 1.0),
                            ParamSpec("seed", DataType.long, 0),
                            ParamSpec("raw", DataType.boolean, False)]))
    example = pd.DataFrame({"prompt": ["What is 12 + 7?"]})
    mlflow.pyfunc.save_model(
        str(out), loader_module="llmcore.export.pyfunc", data_path=str(model_dir),
        code_paths=[str(Path(__file__).resolve().parent)], signature=signature,
        input_example=example,
        pip_requirements=["torch", "tokenizers", "safetensors", "numpy", "pandas"])
    return out


class Registered(NamedTuple):
    """A new registry version and what it became: ``best`` or ``challenger``."""

    version: str
    alias: str
    message: str


# a new version takes ``best`` only when its bpb is below the holder's by more than this: a
# smaller drop is within what a rerun with another seed can give, so it is no evidence. A
# stated margin (docs/tracking.md), not one measured for every model size.
PROMOTE_MARGIN = 0.01

# the version of the corpus's train/val/test construction. A val_bpb is a number about one
# val split: measured on another split it is another quantity, so ``best`` compares only
# versions registered on the same split version. Bump this string whenever the construction of
# the splits changes (what goes in, the seed or fractions of the split, dedup or contamination
# filtering of val/test); the first version registered after the bump takes ``best``.
SPLIT_VERSION = "4"


def register_model(tracker: Tracker, model_dir: Path, val_bpb: float | None, kind: str,
                   name: str = EXPERIMENT, tags: Mapping[str, str] | None = None,
                   margin: float = PROMOTE_MARGIN,
                   split_version: str = SPLIT_VERSION) -> Registered | None:
    """Log ``model_dir`` to the run as an MLflow pyfunc model and register it as a new version
    of model ``name``, with ``tags`` (lineage: git commit, DVC hashes, params) on the version.

    Alias ``best`` (what users load) moves to the new version only on evidence: its
    ``val_bpb`` is below the current holder's by more than ``margin``. Otherwise the version
    becomes ``challenger`` and its tags say why (``promotion``, ``best_version``,
    ``best_val_bpb``, ``val_bpb_delta``). (``latest`` needs no alias: MLflow reserves that
    name and ``models:/llmcore/latest`` already resolves to the newest version.) Returns None
    for a tracker without a registry.

    Every version carries tag ``split_version`` (``split_version``, by default
    :data:`SPLIT_VERSION`, the version of the corpus's train/val/test construction: bump it
    whenever that construction changes). A val_bpb is only compared with one measured on the
    same split version: a ``best`` holder on another split version (or with none recorded) is
    not compared, the new version takes ``best`` and its ``promotion`` tag says so.
    """
    import tempfile

    client = getattr(tracker, "client", None)
    if client is None or tracker.run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(save_pyfunc(Path(model_dir), Path(tmp) / "model"), "model")
    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(name)
    split_version = str(split_version)
    version_tags = {"kind": kind, "val_bpb": str(val_bpb),
                    **{k: str(v)[:_PARAM_MAX] for k, v in (tags or {}).items()},
                    "split_version": split_version}  # the argument wins over a tag of that name
    version = str(client.create_model_version(name, f"runs:/{tracker.run_id}/model",
                                              run_id=tracker.run_id, tags=version_tags).version)
    try:
        return _promote(client, name, version, val_bpb, margin, split_version)
    except BaseException:
        # no half-registered model: a version without its alias is taken back (when the
        # server that refused the alias still answers the delete)
        with contextlib.suppress(Exception):
            client.delete_model_version(name, version)
        raise


def _bpb(tags: Mapping[str, str]) -> float:
    try:
        return float(tags.get("val_bpb", "nan"))
    except ValueError:
        return math.nan


def _promote(client: Any, name: str, version: str, val_bpb: float | None,
             margin: float, split_version: str = SPLIT_VERSION) -> Registered:
    """Point ``best`` at ``version`` if it beats the holder by more than ``margin``, else
    ``challenger``; the decision goes into the version's tags and the returned message.

    The holder counts only if it was registered on ``split_version``: a val_bpb of another
    split version is not comparable, so such a holder loses ``best`` without a comparison."""
    from mlflow.exceptions import MlflowException

    new = math.nan if val_bpb is None else float(val_bpb)
    try:
        holder = client.get_model_version_by_alias(name, "best")
    except MlflowException:
        holder = None
    if holder is not None and holder.tags.get("split_version") != split_version:
        held_on = holder.tags.get("split_version")
        held_on = f"split version {held_on}" if held_on else "no recorded split version"
        reason = (f"best: the first version on split version {split_version} (version "
                  f"{holder.version} held best on {held_on})")
        client.set_registered_model_alias(name, "best", version)
        for key, value in (("promotion", reason), ("previous_best_version", holder.version),
                           ("previous_best_split_version",
                            holder.tags.get("split_version", "none"))):
            client.set_model_version_tag(name, version, key, value)
        return Registered(version, "best", f"registered as {name} version {version} "
                                           f"({reason}; val_bpb is not compared across split "
                                           "versions)")
    old = _bpb(holder.tags) if holder is not None else math.nan
    if holder is None or not math.isfinite(old):
        client.set_registered_model_alias(name, "best", version)
        client.set_model_version_tag(name, version, "promotion", "best: the first version "
                                     "with a val_bpb")
        return Registered(version, "best", f"registered as {name} version {version} (best: "
                                           "none held it before)")
    delta = new - old if math.isfinite(new) else math.nan
    better = math.isfinite(delta) and delta < -margin
    alias = "best" if better else "challenger"
    client.set_registered_model_alias(name, alias, version)
    on = f"split version {split_version}"
    verdict = (f"best: val_bpb {new:.4f} beats version {holder.version}'s {old:.4f} ({on}) by "
               f"more than {margin}" if better else
               f"challenger: val_bpb {new:.4f} against best version {holder.version}'s "
               f"{old:.4f} ({on}); best moves only for a drop of more than {margin}")
    for key, value in (("promotion", verdict), ("best_version", holder.version),
                       ("best_val_bpb", f"{old:.5f}"), ("val_bpb_delta", f"{delta:.5f}"),
                       ("promote_margin", str(margin))):
        client.set_model_version_tag(name, version, key, value)
    return Registered(version, alias, f"registered as {name} version {version} ({verdict})")


def fetch_registered_model(uri: str, tracking_uri: str, cache: Path) -> tuple[Path, str]:
    """The local model directory of a registry URI, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``, and its id ``<name>:<version>``.

    Downloaded once per version into ``cache``; a missing model, alias or version raises
    LookupError naming it.
    """
    import shutil

    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    quiet_telemetry()
    spec = uri.removeprefix("models:/")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.partition("/")
            version = client.get_model_version(name, number or "latest")
    except MlflowException as exc:
        raise LookupError(f"{uri} is not in the registry at {tracking_uri}: "
                          f"{exc.message.splitlines()[0][:200]}") from None
    model_id = f"{name}:{version.version}"
    # the run id makes the cache entry unique across stores that reuse names and numbers
    dest = Path(cache) / f"{name}-v{version.version}-{(version.run_id or 'norun')[:12]}"
    if not (dest / "MLmodel").is_file():
        tmp = dest.with_name(dest.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp),
                           tracking_uri=tracking_uri)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    data = Model.load(str(dest / "MLmodel")).flavors["python_function"].get("data")
    if not data:
        raise LookupError(f"{uri} is not an llmcore model (its pyfunc flavour has no data "
                          "directory)")
    return dest / data, model_id
