"""The names of the metrics the stages write (``metrics/<stage>.json``, MLflow), defined once.

The stages write them through these functions, and the comparison tool, the results page and
the benchmarks read them through the same functions, so that renaming one is one edit.
Standard library only: ``docs/`` imports it.

    stage_seconds("sft")                    -> "sft/stage_seconds"
    model_metric("rl", DOCS_BPB)            -> "evaluate/rl/docs_bpb"
    model_metric(VAL, exact_match("count")) -> "evaluate/val/count_exact_match"
    exact_match("spell", MULTI)             -> "spell_multi_exact_match"
"""

from __future__ import annotations

EVALUATE = "evaluate"
VAL = "val"  # evaluate/val/...: the final model on the val task questions (decisions)
FINAL = "final"  # evaluate/final/...: the comparison tool's name for the last scored model

DOCS_BPB = "docs_bpb"  # bits per byte on the test docs at the trained context
SFT_BPB = "sft_bpb"  # bits per byte on the test SFT replies
IM_END_RATE = "im_end_rate"  # share of task replies that end with <|im_end|>
MULTI, SINGLE = "multi", "single"  # word tasks on test words of several tokens / of one


def stage_metric(stage: str, name: str) -> str:
    """A metric of a stage's own run (``sft/val_bpb``)."""
    return f"{stage}/{name}"


def stage_seconds(stage: str) -> str:
    """The wall seconds of a stage's process, set-up excluded."""
    return stage_metric(stage, "stage_seconds")


def model_metric(model: str, name: str) -> str:
    """A metric of one model of the chain (or of :data:`VAL` / :data:`FINAL`) in evaluate's
    metrics."""
    return f"{EVALUATE}/{model}/{name}"


def contract_metric(name: str) -> str:
    """A figure of the evaluation sets' contract check (``violations``...)."""
    return f"{EVALUATE}/contract/{name}"


CONTAMINATION = f"{EVALUATE}/contamination/"  # the prefix of the contamination check's figures


def contamination_metric(set_name: str, name: str) -> str:
    """A figure of one evaluation set's contamination check."""
    return f"{CONTAMINATION}{set_name}/{name}"


def exact_match(task: str, kind: str | None = None) -> str:
    """A task's exact match; ``kind`` :data:`MULTI` or :data:`SINGLE` for the word tasks' split
    by tokens per word."""
    return f"{task}_{kind}_exact_match" if kind else f"{task}_exact_match"


def bpb_at_context(factor: int) -> str:
    """Bits per byte on the test docs at ``factor`` times the trained context."""
    return f"bpb_ctx{factor}x"


def context_factor(name: str) -> int | None:
    """The factor of a :func:`bpb_at_context` name, None for any other name."""
    head, _, tail = name.partition("bpb_ctx")
    return int(tail[:-1]) if not head and tail.endswith("x") and tail[:-1].isdigit() else None


# the final model's figures the default is judged on (test) and a comparison decides on (val)
JUDGED = (exact_match("arithmetic"), exact_match("count"), exact_match("spell", MULTI),
          exact_match("reverse", MULTI))
