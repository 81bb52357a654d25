"""The ``fetch:`` section: where the corpus comes from and how it is cleaned and split."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.config.tasks import SYNTHETIC_TASKS
from llmcore.schema import spec


@dataclass(frozen=True)
class TaskWeights:
    """``fetch.synthetic_task_weights:`` each synthetic task's training conversations, as a
    multiple of ``fetch.synthetic_per_task``. Tasks differ in what they cost and teach: an
    arithmetic reply is a few tokens and its skill grows with examples; a reverse reply is
    several times longer and, past the letters it shares with spell, recalls its words."""

    arithmetic: float = spec(2.0, ge=0, doc="arithmetic conversations per synthetic_per_task")
    spell: float = spec(1.0, ge=0, doc="spell conversations per synthetic_per_task")
    count: float = spec(1.0, ge=0, doc="count conversations per synthetic_per_task")
    reverse: float = spec(1.0, ge=0, doc="reverse conversations per synthetic_per_task")

    def counts(self, per_task: int) -> dict[str, int]:
        """task -> training conversations for ``per_task`` (rounded)."""
        return {t: round(per_task * getattr(self, t)) for t in SYNTHETIC_TASKS}


@dataclass(frozen=True)
class FetchConfig:
    """``fetch:`` where the corpus comes from and how it is cleaned and split."""

    source: str = spec("builtin", choices=("builtin", "files", "hf"))
    paths: list[str] = spec(default_factory=list, doc="files or globs for source: files")
    text_field: str = spec("text", doc="field holding a document's text (jsonl, parquet, hf)")
    hf_dataset: str | None = spec(None, doc="Hugging Face dataset id or a local dataset folder")
    hf_config: str | None = spec(None)
    hf_split: str = spec("train")
    val_fraction: float = spec(0.1, gt=0.0, lt=0.5, doc="share of document groups (and "
                               "user conversations, preference prompts) held out for decisions")
    test_fraction: float = spec(0.1, ge=0.0, lt=0.5, doc="share held out for the reported "
                                "table, never for a decision")
    max_documents: int | None = spec(None, ge=1)
    max_bytes: int | None = spec(None, ge=1)
    min_chars: int = spec(1, ge=1, doc="documents shorter than this (after strip) are dropped")
    strict: bool = spec(False, doc="fail on the first malformed record instead of skipping it")
    builtin_code: bool = spec(False, doc="builtin: also the standard library's Python source, "
                                         "as training documents only")
    doc_questions: bool = spec(True, doc="add SFT questions answered from the stdlib docs")
    synthetic_per_task: int = spec(20000, ge=0, doc="SFT training examples per synthetic task")
    synthetic_task_weights: TaskWeights = spec(default_factory=TaskWeights,
                                               doc="per task: a multiple of synthetic_per_task")
    synthetic_val_per_task: int = spec(250, ge=0, doc="val examples per synthetic task, drawn "
                                       "from the val pools of words and operand pairs")
    synthetic_test_per_task: int = spec(250, ge=0, doc="test examples per synthetic task, "
                                        "drawn from the test pools")
    preference_paths: list[str] = spec(default_factory=list, doc="preference pairs for DPO: "
                                       ".jsonl / .parquet files or globs, MiniMind's dpo.jsonl "
                                       "(chosen / rejected message lists) or TRL's (prompt, "
                                       "chosen, rejected as strings or messages)")

    def validate(self) -> list[str]:
        problems = []
        if self.source == "files" and not self.paths:
            problems.append(
                "fetch.paths must list at least one file or glob when fetch.source is files"
            )
        if self.val_fraction + self.test_fraction >= 0.6:
            problems.append(f"fetch.val_fraction + fetch.test_fraction must be below 0.6 (got "
                            f"{self.val_fraction} + {self.test_fraction}): most data must train")
        if self.source == "hf" and not self.hf_dataset:
            problems.append(
                "fetch.hf_dataset must name a dataset (hub id or local folder) "
                "when fetch.source is hf"
            )
        return problems
