"""Preference pairs for DPO: a prompt, the reply to prefer and the reply to avoid.

One pair per ``.jsonl`` line (a JSON object) or ``.parquet`` row (the same fields as columns),
in any of these layouts:

* MiniMind's ``dpo.jsonl``, which is also TRL's implicit-prompt layout: two whole
  conversations that share everything but their last, assistant message::

    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}

* TRL / Hugging Face with an explicit prompt, as strings (the prompt is one user message) or
  as messages (each reply exactly one assistant message, TRL's conversational layout)::

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]}

Roles are system (first message only), user and assistant, checked as for SFT conversations
(:func:`llmcore.data.sources.parse_messages`). The prompt must end with a user message; the replies
must be non-empty and different. A row that breaks a rule is a :class:`BadRecord` naming the
rule, so the fetch stage skips, counts and lists it like any other malformed record.

The fetch stage drops exact duplicates (same prompt and replies) and splits pairs by the hash
of their *prompt*, not of the whole pair: several pairs for one prompt (common in preference
sets) then all land on the same side, and the held-out reward accuracy measures prompts the
model has not been trained on. The price: the val share counts prompts, not pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcore.config.fetch import FetchConfig
from llmcore.data.assemble import CorpusStats
from llmcore.data.corpus import PREFERENCES, SPLITS, BadRecord
from llmcore.data.sources import content_hash, parse_messages, read_rows
from llmcore.data.splits import assign_splits

Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages  # (role, content) messages before the reply; the last one is the user's
    chosen: str  # the assistant reply to prefer
    rejected: str  # the assistant reply to avoid
    source: str
    split: str | None = None  # a fixed split; None: decided by the hash of the prompt


def _messages(raw: Any, name: str, location: str) -> Messages:
    try:
        return parse_messages(raw, location, need_assistant=False)
    except BadRecord as bad:
        raise BadRecord(location, f"{name}: {bad.reason}") from None


def _from_conversations(row: dict, location: str) -> tuple[Messages, str, str]:
    """Prompt and replies of two whole conversations (MiniMind, TRL implicit prompt)."""
    convs = {}
    for name in ("chosen", "rejected"):
        if isinstance(row[name], str):
            raise BadRecord(location, f"missing field 'prompt' ({name} is a string, so it is "
                                      "only the reply)")
        convs[name] = _messages(row[name], name, location)
        if convs[name][-1][0] != "assistant":
            raise BadRecord(location, f"{name} must end with an assistant message")
    chosen, rejected = convs["chosen"], convs["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord(location, "chosen and rejected must share the prompt (every message "
                                  "before the last)")
    return chosen[:-1], chosen[-1][1], rejected[-1][1]


def _reply(raw: Any, name: str, location: str) -> str:
    """A reply given apart from its prompt: a string, or exactly one assistant message."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise BadRecord(location, f"{name} must be a string or a list of messages")
    msgs = _messages(raw, name, location)
    if len(msgs) != 1 or msgs[0][0] != "assistant":
        raise BadRecord(location, f"{name} must be exactly one assistant message when the "
                                  f"prompt is given apart (got roles {[r for r, _ in msgs]})")
    return msgs[0][1]


def parse_preference(row: Any, location: str, source: str) -> PreferencePair:
    """Turn one JSON-like row into a PreferencePair, or raise BadRecord saying what is wrong."""
    if not isinstance(row, dict):
        raise BadRecord(location, f"expected a JSON object, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise BadRecord(location, f"missing field {name!r}")
    prompt_raw = row.get("prompt")
    if prompt_raw is None:
        prompt, chosen, rejected = _from_conversations(row, location)
    else:
        if isinstance(prompt_raw, str):
            prompt = (("user", prompt_raw),)
        elif isinstance(prompt_raw, list):
            prompt = _messages(prompt_raw, "prompt", location)
        else:
            raise BadRecord(location, "prompt must be a string or a list of messages")
        chosen, rejected = (_reply(row[n], n, location) for n in ("chosen", "rejected"))
    if not prompt or prompt[-1][0] != "user":
        raise BadRecord(location, "the prompt must end with a user message")
    if not prompt[-1][1].strip():
        raise BadRecord(location, "the prompt's last user message is empty")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRecord(location, f"the {name} reply is empty")
    if chosen.strip() == rejected.strip():
        raise BadRecord(location, "chosen and rejected are the same reply")
    return PreferencePair(prompt, chosen, rejected, source)


def read_preferences_file(path: Path) -> Iterator[PreferencePair | BadRecord]:
    """Pairs of one ``.jsonl`` or ``.parquet`` file; malformed rows are yielded as
    BadRecord instances (location ``file:line`` or ``file:row i``), not raised."""
    source = f"file:{path}"
    return read_rows(Path(path), lambda row, location: parse_preference(row, location, source))


def collect_preferences(records: Iterable[PreferencePair | BadRecord], cfg: FetchConfig,
                        stats: CorpusStats) -> dict[str, list[dict]]:
    """De-duplicate and split pairs into the rows of ``preferences_{train,val,test}`` by the
    hash of their prompt, counting them (and skipping malformed records, or failing on them)
    in ``stats``."""
    rows: list[dict] = []
    seen: set[str] = set()
    for rec in records:
        if isinstance(rec, BadRecord):
            stats.skip_bad(rec, cfg.strict)
            continue
        key = content_hash([rec.prompt, rec.chosen, rec.rejected])
        if key in seen:
            stats.preference_duplicates_dropped += 1
            continue
        seen.add(key)
        rows.append({"table": PREFERENCES, "split": rec.split, "id": key,
                     "prompt": [{"role": r, "content": c} for r, c in rec.prompt],
                     "chosen": rec.chosen, "rejected": rec.rejected, "source": rec.source,
                     "pool": [f"prompt:{content_hash(rec.prompt)}"]})
    assign_splits(rows, cfg.val_fraction, cfg.test_fraction, stats.notes,
                  ((PREFERENCES, "preference pairs"),))
    tables: dict[str, list[dict]] = {f"{PREFERENCES}_{s}": [] for s in SPLITS}
    for row in rows:
        split = row.pop("split")
        del row["table"]
        stats.preference_pairs[split] += 1
        tables[f"{PREFERENCES}_{split}"].append(row)
    return tables
