"""The ``dpo:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.config.lora import LoRAConfig
from llmcore.config.train import OptimConfig, with_default
from llmcore.schema import spec


@dataclass(frozen=True)
class DPOConfig(OptimConfig):
    """``dpo:`` preference optimisation of the SFT model, its frozen self as the reference."""

    max_steps: int = with_default(OptimConfig, "max_steps", 30, ge=0,
                              doc="optimizer steps; 0: the stage copies the SFT model")
    beta: float = spec(0.1, gt=0, doc="strength of the pull towards the reference")
    nll_coef: float = spec(1.0, ge=0, doc="weight of the chosen replies' NLL per token (RPO); "
                                         "0: plain DPO")
    lr: float = with_default(OptimConfig, "lr", 1e-4)
    min_lr: float = with_default(OptimConfig, "min_lr", 1e-5)
    warmup_steps: int = with_default(OptimConfig, "warmup_steps", 10)
    optimizer: str = with_default(OptimConfig, "optimizer", "adamw")
    weight_decay: float = with_default(OptimConfig, "weight_decay", 0.0)
    log_every: int = with_default(OptimConfig, "log_every", 10)
    checkpoint_every: int = with_default(OptimConfig, "checkpoint_every", 30)
    batch_size: int = spec(16, ge=1, doc="preference pairs per step (split over grad_accum)")
    eval_every: int = spec(30, ge=1)
    pairs_per_task: int = spec(100, ge=0, doc="builtin on-policy pairs per synthetic task, "
                                              "from training conversations")
    val_pairs_per_task: int = spec(25, ge=0, doc="held-out pairs per task (val conversations)")
    max_new_tokens: int = spec(96, ge=1, doc="length of the SFT model's own answers")
    corpus_pairs: bool = spec(True, doc="also train on the pairs of fetch.preference_paths")
    method: str = spec("full", choices=("full", "lora"))
    lora: LoRAConfig = spec(default_factory=LoRAConfig)

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.batch_size % self.grad_accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of "
                            f"grad_accum ({self.grad_accum})")
        return problems
