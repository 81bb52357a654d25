"""The ``base:`` section, and how a stage turns the sections of ``params.yaml`` it reads into
typed configs.

Every section is a frozen dataclass in its own module of this package (``llmcore.config.sft``
holds ``sft:``), so a stage's DVC deps name only the sections it reads: an edit to the DPO
section's docs leaves pretraining cached. Each schema is checked by :mod:`llmcore.schema`
before any work starts, and every error names the key and what is allowed, e.g.
``params.yaml: tokenizer.vocab_size must be >= 260 (got 12)``. The defaults of each schema are
params.yaml's values (a test compares them), so a key left out means what the file says.
"""

from __future__ import annotations

import dataclasses
import difflib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from llmcore.schema import ConfigError, JSONValue, parse_dataclass, spec

C = TypeVar("C")

PARAMS_FILE = "params.yaml"
# modules of this package that are not a top-level section of params.yaml: shared
# definitions (tasks; train, the loop's settings the training sections extend) and a
# subsection (lora, inside sft:, dpo: and rl:)
NOT_SECTIONS = ("tasks", "train", "lora")


@dataclass(frozen=True)
class BaseConfig:
    """``base:`` settings shared by every stage."""

    seed: int = spec(1337, ge=0, doc="seed of every random choice in the pipeline")
    device: str = spec("auto", doc="auto | cpu | cuda | cuda:N | mps")
    dtype: str = spec("auto", choices=("auto", "float32", "bfloat16", "float16"))
    run_name: str | None = spec(None, doc="MLflow run name prefix; default: the stage name")
    tracking: str = spec("mlflow", choices=("mlflow", "none"))

    def validate(self) -> list[str]:
        ok = self.device in ("auto", "cpu", "cuda", "mps") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        if not ok:
            return [f"base.device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})"]
        return []


def parse_section(name: str, raw: JSONValue, cls: type[C]) -> C:
    """Validate section ``name`` of params.yaml (``raw``, as YAML gave it) against its schema
    ``cls``; a schema with a ``from_params`` classmethod (``model:``, whose preset fills the
    fields left out) parses itself.

    Raises :class:`ConfigError` listing every problem as ``params.yaml: <key> ...``.
    """
    custom = getattr(cls, "from_params", None)
    if custom is not None:
        parsed: C = custom(raw)
        return parsed
    problems: list[str] = []
    obj = parse_dataclass(cls, raw, name, problems)
    if problems:
        raise ConfigError([f"{PARAMS_FILE}: {p}" for p in problems])
    return obj


def section_names() -> list[str]:
    """Every top-level section params.yaml may have: one per module of this package
    (``flow:`` is the Prefect flow's, not a stage's). Found, not listed, so that a stage added
    with its section's module needs no edit here: this module is a dependency of every
    stage, and an edit of it would re-run them all."""
    import llmcore.config

    return sorted(m.name for m in pkgutil.iter_modules(llmcore.config.__path__)
                  if m.name not in NOT_SECTIONS)


def check_sections(params: Mapping[str, JSONValue]) -> None:
    """Every top-level section of params.yaml must be one that something reads."""
    problems = []
    known = section_names()
    for name in params:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{PARAMS_FILE}: unknown section {name!r} ({hint}known: "
                            f"{', '.join(known)})")
    if problems:
        raise ConfigError(problems)


def parse_sections(params: Mapping[str, JSONValue], schemas: Mapping[str, type]
                   ) -> dict[str, Any]:
    """Validate several sections of a params mapping (``section -> schema``); all problems are
    reported together."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    for name, cls in schemas.items():
        try:
            out[name] = parse_section(name, params.get(name), cls)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return out


def flatten(prefix: str, cfg: object) -> dict[str, JSONValue]:
    """``{"prefix.key": value}`` for a config (or a plain dict), nested keys joined by dots."""
    out: dict[str, JSONValue] = {}

    def walk(p: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{p}.{k}", v)
        else:
            out[p] = value

    if not isinstance(cfg, dict) and not dataclasses.is_dataclass(cfg):
        raise TypeError(f"flatten needs a dataclass or a dict (got {type(cfg).__name__})")
    walk(prefix, cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))  # type: ignore[arg-type]
    return out
