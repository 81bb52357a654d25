"""DVC stage ``pretrain``: train the decoder on the pretraining shards.

Writes ``data/models/pretrain/`` and keeps resumable checkpoints in ``data/checkpoints/pretrain/``
(a persistent DVC output). ``pretrain.nproc_per_node > 1`` re-launches itself under torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcore.config.base import BaseConfig
from llmcore.config.model import ModelConfig
from llmcore.config.pretrain import PretrainConfig
from llmcore.tracking import Tracker, register_model
from stages import paths
from stages._common import (
    StageParams,
    log,
    model_tags,
    relaunch_under_torchrun,
    repo_root,
    run_stage,
)
from stages._training import train_and_export

STAGE = "pretrain"


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    model: ModelConfig
    pretrain: PretrainConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    metrics = train_and_export("pretrain", p.model, p.pretrain, p.base,
                               ("pretrain_train", "pretrain_val"), tracker)
    if metrics:  # rank 0: its own registry name, as docs bpb and SFT-reply bpb do not compare
        root = repo_root()
        registered = register_model(tracker, root / paths.model_dir("pretrain"),
                                    metrics["pretrain/val_bpb"], "pretrain", "llmcore-pretrain",
                                    tags=model_tags(root, "pretrain", p.sections()))
        if registered:
            log(f"pretrain: {registered.message}")
    return metrics


def main() -> None:
    relaunch_under_torchrun("pretrain", "stages.pretrain")
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
