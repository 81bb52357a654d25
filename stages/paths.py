"""Where the pipeline's files live, relative to the repository: the one list of them.

Stages, tests and benchmarks name these instead of writing ``"data/..."`` literals, and
dvc.yaml lists the same paths as deps and outs (a lineage test checks that every path a
stage names here is one of its deps or outs).
"""

from __future__ import annotations

CORPUS = "data/corpus"  # fetch: Parquet tables of documents, conversations, preference pairs
TOKENIZER = "data/tokenizer"  # tokenizer: tokenizer.json + tokenizer_config.json
SHARDS = "data/shards"  # pack: Arrow shards + manifest.json
MODELS = "data/models"  # one model directory per training stage, and the quantized one
CHECKPOINTS = "data/checkpoints"  # one folder per training stage (not DVC outs: docs/orchestration.md)
METRICS = "metrics"  # small git-tracked metrics JSON and plot TSVs
REPORTS = "reports"  # evaluation tables, samples, charts


def model_dir(name: str) -> str:
    """``data/models/<name>`` (a stage's model, or ``chat-int8`` for the quantized one)."""
    return f"{MODELS}/{name}"


def checkpoint_dir(stage: str) -> str:
    """``data/checkpoints/<stage>``: the resumable checkpoints of a training stage."""
    return f"{CHECKPOINTS}/{stage}"
