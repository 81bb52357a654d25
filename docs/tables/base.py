"""Reading the files the tables come from, and formatting their values: what every part of
the page shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from stages import chain  # the chain's order, as dvc.yaml declares it

ROOT = Path(__file__).resolve().parents[2]  # the repository: its dvc.yaml names the chain
# how the tables name each model of the chain (a model without a label shows its stage name)
LABELS = {"pretrain": "pretrained", "sft": "SFT", "dpo": "DPO", "rl": "RL (GRPO)"}
MODELS = tuple((m, LABELS.get(m, m)) for m in chain.models(ROOT))
STAGES = tuple(chain.stage_order(ROOT))
TASK_LABELS = {"count": '"count the letter"', "arithmetic": "arithmetic", "spell": "spell",
               "reverse": "reverse"}

Json = dict[str, Any]


# --- reading -------------------------------------------------------------------------------

class Files:
    """The JSON files under the root, read once; what was missing, by path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Json | None] = {}

    def get(self, rel: str) -> Json | None:
        if rel not in self._cache:
            try:
                data = json.loads((self.root / rel).read_text())
                self._cache[rel] = data if isinstance(data, dict) else None
            except (OSError, ValueError):
                self._cache[rel] = None
        return self._cache[rel]

    def params(self) -> Json:
        try:
            data = yaml.safe_load((self.root / "params.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}


def missing(rel: str, how: str) -> list[str]:
    return [f"_`{rel}` is missing or unreadable: {how} writes it._", ""]


def dig(data: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
    return data


# --- formatting ----------------------------------------------------------------------------

def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:,.{digits}f}"


def whole(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{round(value):,}"


def pct(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.{digits}f}%"


def ratio(value: Any, digits: int = 2) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}x"


def with_ci(value: Any, low: Any, high: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return f"{value:.3f} [{low:.2f}, {high:.2f}]"
    return f"{value:.3f}"


def minutes(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return f"{seconds:,.0f} s" if seconds < 90 else f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def key_table(data: Json, prefix: str,
              rows: Sequence[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    """``| metric | value | key |`` for the keys of ``rows`` that ``data`` has."""
    body = [(label, fmt(data[prefix + key]), f"`{prefix}{key}`")
            for key, label, fmt in rows if prefix + key in data]
    return table(("metric", "value", "key"), body)
