"""The model chain, declared once: in dvc.yaml, by each stage's model deps and outs.

A training stage's model is its out ``data/models/<stage>``, and the model it starts from is
the one ``data/models/...`` path among its deps; quantize takes the model it depends on, and
evaluate may score every model it depends on. The stages read their edges from here when
they run, and the flow, the seeded comparison and the results page take the chain's order
from here too, so there is nothing else to keep in step when a stage is added or moved.

Why dvc.yaml and not a Python list: DVC hashes each stage's own entry (command, deps, outs,
params), never the whole file, so editing one stage's entry re-runs that stage and what
follows it, and nothing before it. A module imported by every stage would be a dependency of
every stage: one edit of it would re-run the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llmcore.schema import UserError
from stages import paths

DVC_FILE = "dvc.yaml"


def _stages(root: Path) -> dict[str, dict]:
    try:
        graph = yaml.safe_load((root / DVC_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{DVC_FILE}: cannot read the pipeline ({e})") from e
    stages = graph.get("stages")
    if not isinstance(stages, dict):
        raise UserError(f"{DVC_FILE}: no `stages:` mapping")
    return stages


def _model_names(entries: list) -> list[str]:
    """Model names of the ``data/models/<name>`` paths in a deps or outs list."""
    prefix = paths.MODELS + "/"
    names = []
    for e in entries or []:
        path = e if isinstance(e, str) else next(iter(e), "") if isinstance(e, dict) else ""
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            names.append(path[len(prefix):])
    return names


def stage_order(root: Path) -> list[str]:
    """Every stage of dvc.yaml, in its order (which is the pipeline's)."""
    return list(_stages(root))


def models(root: Path) -> list[str]:
    """The training stages, in chain order: those whose outs hold ``data/models/<stage>``."""
    return [name for name, s in _stages(root).items()
            if name in _model_names((s or {}).get("outs", []))]


def model_deps(stage: str, root: Path) -> list[str]:
    """The models ``stage`` depends on, as dvc.yaml lists them."""
    stages = _stages(root)
    if stage not in stages:
        raise UserError(f"{DVC_FILE}: no stage {stage!r} (stages: {', '.join(stages)})")
    return _model_names((stages[stage] or {}).get("deps", []))


def params(stage: str, root: Path) -> list[str]:
    """The params ``stage`` reads, as its ``params:`` in dvc.yaml lists them: whole sections
    (``pack``) or single keys (``base.seed``). The stage reads these and no other, so what it
    depends on and what DVC re-runs it for are one list."""
    stages = _stages(root)
    if stage not in stages:
        raise UserError(f"{DVC_FILE}: no stage {stage!r} (stages: {', '.join(stages)})")
    listed = (stages[stage] or {}).get("params") or []
    if not all(isinstance(k, str) for k in listed):
        raise UserError(f"{DVC_FILE}: stage {stage!r} lists params of another file; its "
                        "params are keys of params.yaml")
    return list(listed)


def model_dep(stage: str, name: str, root: Path) -> str:
    """``data/models/<name>``, a model ``stage`` depends on (a stage reads no model that its
    deps do not list: DVC would not re-run it when that model changes)."""
    found = model_deps(stage, root)
    if name not in found:
        raise UserError(f"{DVC_FILE}: stage {stage!r} does not depend on model {name!r} (its "
                        f"model deps: {', '.join(found) or 'none'})")
    return f"{paths.MODELS}/{name}"


def source(stage: str, root: Path) -> str:
    """``data/models/<name>``: the one model ``stage`` starts from (its one model dep)."""
    found = model_deps(stage, root)
    if len(found) != 1:
        raise UserError(f"{DVC_FILE}: stage {stage!r} must list exactly one model it starts "
                        f"from among its deps, a {paths.MODELS}/<stage> path (found "
                        f"{found or 'none'})")
    return f"{paths.MODELS}/{found[0]}"


def final(root: Path) -> str:
    """The model quantize takes: the one the chain ships."""
    return source("quantize", root)[len(paths.MODELS) + 1:]
