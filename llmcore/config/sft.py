"""The ``sft:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.config.lora import LoRAConfig
from llmcore.config.train import TrainConfig, with_default
from llmcore.schema import spec


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """``sft:`` the same loop with fine-tuning defaults (params.yaml's ``sft:``)."""

    method: str = spec("full", choices=("full", "lora"),
                       doc="full: every weight trains; lora: adapters only (sft.lora)")
    lora: LoRAConfig = spec(default_factory=LoRAConfig)

    max_steps: int = with_default(TrainConfig, "max_steps", 1600)
    batch_size: int = with_default(TrainConfig, "batch_size", 16)
    lr: float = with_default(TrainConfig, "lr", 1.5e-2)
    min_lr: float = with_default(TrainConfig, "min_lr", 1.5e-3)
    warmup_steps: int = with_default(TrainConfig, "warmup_steps", 20)
    optimizer: str = with_default(TrainConfig, "optimizer", "muon")
    eval_every: int = with_default(TrainConfig, "eval_every", 400)
    # 1,600 steps repay building the compiled blocks (docs/training.md#compile)
    compile: bool = with_default(TrainConfig, "compile", True)
