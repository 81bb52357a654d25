"""Figures quoted in the prose of README.md and docs/*.md, rendered from committed files.

A page quotes a measurement inside a marked span:

    `make pipeline` runs <!-- figure:pipeline-minutes -->...<!-- /figure --> of stages

and ``docs/results.py`` replaces the span's text with what the figure's function gives
from the files (``--check`` names a page whose span is stale). The rest of a page is prose,
and :func:`hand_typed` finds the measurements typed into it by hand, of which
``tests/test_docs.py`` allows none. The figures themselves live in ``docs/prose/``, one module
per subject, each registered by name with :func:`figure`.

What counts as a hand-typed measurement (:data:`MEASUREMENT`): a number with a unit of time
(``s``, ``min``, ``ms``, ``h``), of speed (``tok/s``, ``GFLOP/s``, ``s/step``), of size (``MB``,
``GiB``), a percentage (not the level of an interval: "95% interval"), a ratio (``1.7x``; not
a shape such as ``4 x 128``), or a decimal with three places or more (bits per byte,
accuracies, p-values). Code is not prose: fenced and indented blocks, inline code (a command,
a params value), a default quoted as ``section.key`` in backquotes followed by "(default
VALUE" (:data:`DEFAULT_QUOTE`; ``tests/test_docs.py`` compares it with params.yaml) and the
generated regions are skipped, but a comment in a code block is prose. It is a heuristic:
"600 steps" is not caught (a default, not a measurement), nor is "0.5" (two places), nor a figure spelled in words.

Standard library only (and ``stages.chain``), like docs/results.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPAN = re.compile(r"<!-- figure:([\w-]+) -->(.*?)<!-- /figure -->", re.S)
GENERATED = re.compile(r"<!-- results:start -->.*?<!-- results:end -->", re.S)
MEASUREMENT = re.compile(r"""(?x)
    (?<![\w.\-/])(?:
      \d[\d,]*(?:\.\d+)?\s?(?:ms|s|sec|seconds|min|minutes|h|hours)\b(?!/)
    | \d[\d,]*(?:\.\d+)?\s?k?\s?(?:tok/s|tokens/s|tokens\ per\ second|GFLOP/s|TFLOP/s
                                 |s/step|steps/s)
    | \d[\d,]*(?:\.\d+)?\s?(?:MB|GB|GiB|MiB|KB|kB|KiB)\b
    | \d[\d,]*(?:\.\d+)?\s?%(?!\s(?:t\s|Welch\s|Wilson\s)?(?:interval|confidence))
    | \d+(?:\.\d+)?\s?x\b(?!\s?\d)
    | \d\.\d{3,}\b
    )""")
INLINE_CODE = re.compile(r"`[^`]*`")
DEFAULT_QUOTE = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)` \(default:? ([^;),]+)")

Json = dict[str, Any]
Read = Callable[[str], "Json | None"]


def hand_typed(text: str) -> list[tuple[int, str, str]]:
    """``(line number, figure, line)`` of every measurement typed into ``text``'s prose."""
    # blank out what is generated, keeping line numbers
    text = GENERATED.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found, fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if line.lstrip().startswith(("<!--", "![")):
            continue
        if fence or line.startswith(("    ", "\t")):
            # code is not prose, but a comment in it is: "make compare  # ~30 min"
            prose = line.split(" # ", 1)[1] if " # " in line else ""
        else:
            # a default quoted as "`section.key` (default VALUE" is checked against
            # params.yaml (stale_defaults), not a measurement
            prose = INLINE_CODE.sub("", DEFAULT_QUOTE.sub("", line))
        prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets are paths, not figures
        found += [(number, m.group(0), line.strip()) for m in MEASUREMENT.finditer(prose)]
    return found


# --- the registry (the figures are in docs/prose/, one module per subject) ---------------

FIGURES: dict[str, Callable[[Read], str]] = {}


def figure(name: str) -> Callable[[Callable[[Read], str]], Callable[[Read], str]]:
    def register(fn: Callable[[Read], str]) -> Callable[[Read], str]:
        FIGURES[name] = fn
        return fn

    return register


def missing(rel: str) -> str:
    return f"(`{rel}` is missing)"


def machine_kind(text: str) -> str:
    """The machine's kind from a ``device``/``machine`` field: ``cpu with AVX-512 BF16``."""
    return text.split(",")[0].strip()


def stale_defaults(text: str, params: Json) -> list[str]:
    """Defaults quoted in prose as `` `section.key` (default VALUE`` whose value is not
    params.yaml's (or whose key params.yaml lacks): one line each."""
    out = []
    for key, quoted in DEFAULT_QUOTE.findall(text):
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        words = quoted.strip().split()
        value = words[0] if words else ""
        if node is None:
            out.append(f"`{key}`: not a key of params.yaml")
        elif str(node).lower() != value.lower() and _number(node) != _number(value):
            out.append(f"`{key}` (default {value}): params.yaml has {node!r}")
    return out


def _number(value: object) -> float | None:
    try:
        return float(str(value))
    except ValueError:
        return None


def render(text: str, read: Read) -> tuple[str, list[str]]:
    """``text`` with every figure span rendered; the unknown figure names."""
    unknown: list[str] = []

    def one(m: re.Match[str]) -> str:
        fn = FIGURES.get(m.group(1))
        if fn is None:
            unknown.append(m.group(1))
            return m.group(0)
        try:
            text = fn(read)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            # a file of another shape than the figure reads: the page says so, the rest renders
            text = f"(figure `{m.group(1)}`: its file lacks {e!r})"
        return f"<!-- figure:{m.group(1)} -->{text}<!-- /figure -->"

    return SPAN.sub(one, text), unknown


def reader(root: Path) -> Read:
    """``read(rel)``: a JSON file's object, or a JSON-lines file's records as ``{"rows": [...]}``;
    None where the file is missing or unreadable."""

    def read(rel: str) -> Json | None:
        try:
            text = (root / rel).read_text()
            if rel.endswith(".jsonl"):
                return {"rows": [json.loads(line) for line in text.splitlines() if line.strip()]}
            data = json.loads(text)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    return read


# the figures register themselves on import (after the names above exist)
from docs.prose import bench, quant, run, scaling, team  # noqa: E402,F401
