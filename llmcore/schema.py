"""A small checker for params: typed dataclass fields with bounds and choices.

:func:`spec` declares a field (default, ``ge``/``gt``/``le``/``lt``, ``choices``, a doc line);
:func:`parse_dataclass` checks a raw mapping against a dataclass and collects every problem
as one readable line naming the key, e.g. ``tokenizer.vocab_size must be >= 260 (got 12)``.
Unknown keys are problems too, with a suggestion for near misses, because a typo silently
ignored is a run silently wrong.

Trade-off: plain dataclasses and ~150 lines written here rather than pydantic. It produces
exactly the messages above and keeps configs trivially picklable and printable; what it gives
up is pydantic's coercion zoo (it converts nothing except int -> float).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, TypeAlias

# A value as JSON or YAML holds it: what json.load / yaml.safe_load give back, and what a
# params section flattens to
JSONValue: TypeAlias = "str | int | float | bool | None | list[JSONValue] | dict[str, JSONValue]"

# the exit status of a stage or command that failed on a UserError: the message is the whole
# report (no traceback), and the Prefect flow does not retry it (the same input fails again)
USER_ERROR = 2


class UserError(ValueError):
    """A problem the user fixes (params, input data, missing stage output), not a bug.

    Stages and the ``llmcore`` command print its message without a traceback and exit with
    :data:`USER_ERROR`.
    """


class ConfigError(UserError):
    """Invalid parameters. The message lists every problem, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def spec(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    doc: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with bounds/choices that :func:`parse_section` enforces."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner).split(' ', 1)[1]}s"
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, converted value) for a value against a simple type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, conv = _check_type(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, conv = _check_type(item, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping), value
    return isinstance(value, tp), value


def _bounds_problem(key: str, value: Any, meta: Mapping[str, Any]) -> str | None:
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        return f"{key} must be one of {allowed} (got {value!r})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    for name, op, word in (
        ("ge", lambda a, b: a >= b, ">="),
        ("gt", lambda a, b: a > b, ">"),
        ("le", lambda a, b: a <= b, "<="),
        ("lt", lambda a, b: a < b, "<"),
    ):
        bound = meta.get(name)
        if bound is not None and not op(value, bound):
            return f"{key} must be {word} {bound:g} (got {value!r})"
    return None


def parse_dataclass(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """``raw`` checked against dataclass ``cls``; problems are appended, keys prefixed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{prefix} must be a mapping of keys to values (got {raw!r})")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(
                f"unknown key {prefix}.{key} ({hint}allowed: {', '.join(sorted(fields))})"
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = parse_dataclass(typing.cast(type, tp), raw[name], key, problems)
            continue
        ok, conv = _check_type(raw[name], tp)
        if not ok:
            problems.append(f"{key} must be {_type_name(_strip_optional(tp))} (got "
                            f"{raw[name]!r}){_number_hint(raw[name])}")
            continue
        problem = _bounds_problem(key, conv, f.metadata)
        if problem:
            problems.append(problem)
            continue
        values[name] = conv
    try:
        obj = cls(**values)
    except TypeError as exc:  # a required field is missing
        problems.append(f"{prefix}: {exc}")
        return None
    validate = getattr(obj, "validate", None)
    if validate is not None and not any(p.startswith(prefix) for p in problems):
        for problem in validate():
            # schemas shared by several sections report keys without their section
            problems.append(problem if "." in problem.split(" ", 1)[0]
                            else f"{prefix}.{problem}")
    return obj


def _number_hint(value: Any) -> str:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; say so, since it looks like a number."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f"; YAML reads {value} as a string: write it with a dot, e.g. 1.0e-3"
    return ""


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp
