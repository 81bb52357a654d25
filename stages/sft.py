"""DVC stage ``sft``: fine-tune the pretrained model on chat data, loss on assistant tokens.

Starts from ``data/models/pretrain/``; ``sft.method: lora`` trains adapters only (merged into
the exported weights; the adapters alone go to ``data/models/sft/adapter/``). Writes
``data/models/sft/`` and resumable checkpoints in
``data/checkpoints/sft/``, and registers the model in MLflow with its bits per byte on every
held-out SFT reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmcore.config.base import BaseConfig
from llmcore.config.sft import SFTConfig
from llmcore.data.shards import ShardDataset
from llmcore.data.tokenizer import LLMTokenizer, token_bytes
from llmcore.device import pick_device
from llmcore.eval.evaluate import split_bpb
from llmcore.model.lora import LoRASpec
from llmcore.model.modeldir import load_model_dir, read_model_config
from llmcore.tracking import Tracker, register_model
from stages import chain, paths
from stages._common import (
    StageParams,
    log,
    model_tags,
    relaunch_under_torchrun,
    repo_root,
    run_stage,
)
from stages._training import SHARDS, train_and_export

STAGE = "sft"
OUT = paths.model_dir(STAGE)


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    sft: SFTConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    root = repo_root()
    cfg = p.sft
    adapter = LoRASpec.from_config(cfg.lora) if cfg.method == "lora" else None
    init = root / chain.source(STAGE, root)
    metrics = train_and_export(STAGE, read_model_config(init), cfg, p.base,
                               ("sft_train", "sft_val"), tracker, init_from=init,
                               adapter=adapter)
    if metrics:  # rank 0: register the model with its bpb on all held-out SFT replies
        model, _ = load_model_dir(root / OUT, pick_device(p.base.device))
        tb = torch.tensor(token_bytes(LLMTokenizer.load(root / OUT)))
        bpb = split_bpb(model, ShardDataset(root / SHARDS, "sft_val"), tb)
        metrics["sft/registry_bpb"] = round(bpb, 5) if math.isfinite(bpb) else None
        registered = register_model(tracker, root / OUT, bpb, STAGE,
                                    tags=model_tags(root, STAGE, p.sections()))
        if registered:
            log(f"sft: {registered.message}")
    return metrics


def main() -> None:
    relaunch_under_torchrun("sft", "stages.sft")
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
