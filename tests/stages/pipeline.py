"""What the pipeline tests share: the tiny params of a whole run in seconds, and helpers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import run_group

TINY = {
    "base": {"tracking": "mlflow"},
    "fetch": {"max_documents": 80, "synthetic_per_task": 20, "doc_questions": False},
    "tokenizer": {"vocab_size": 400},
    "pack": {"seq_len": 32, "rows_per_shard": 64},
    "model": {"preset": "tiny", "dropout": 0.1},
    "pretrain": {"max_steps": 600, "batch_size": 8, "warmup_steps": 10, "eval_every": 300,
                 "eval_batches": 2, "checkpoint_every": 20, "log_every": 100, "export": "last",
                 "compile": False},  # compiling costs more than it saves at these sizes
    "sft": {"max_steps": 30, "batch_size": 8, "warmup_steps": 5, "eval_every": 10,
            "eval_batches": 2, "checkpoint_every": 10, "log_every": 10, "compile": False},
    "dpo": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
            "pairs_per_task": 6, "val_pairs_per_task": 2, "max_new_tokens": 6,
            "method": "lora"},
    "rl": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6,
           "eval_per_task": 2},
    "evaluate": {"max_task_examples": 6, "max_new_tokens": 8, "max_rows": 16,
                 "prompts": ["What is 1 + 1?", "Spell the word 'a'."]},
    "quantize": {"agreement_prompts": 4, "agreement_tokens": 8, "decode_tokens": 8},
}


def set_params(root: Path, updates: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in updates.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``dvc *args`` in ``root``, its output captured. In a session of its own: past the
    timeout (or on any interruption) the whole process group goes, the stages DVC started
    included, not only dvc itself."""
    return run_group(["dvc", *args], timeout, cwd=root)


def ran(out: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in out}


STAGES = ("fetch", "tokenizer", "pack", "pretrain", "sft", "dpo", "rl", "evaluate", "quantize")
