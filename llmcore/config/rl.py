"""The ``rl:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.config.lora import LoRAConfig
from llmcore.config.tasks import SYNTHETIC_TASKS
from llmcore.config.train import OptimConfig, with_default
from llmcore.schema import spec


@dataclass(frozen=True)
class RLConfig(OptimConfig):
    """``rl:`` GRPO on the checkable tasks, starting from the DPO model."""

    algorithm: str = spec("grpo", choices=("grpo",))
    max_steps: int = with_default(OptimConfig, "max_steps", 20, ge=0,
                              doc="policy updates; 0: the stage copies the DPO model")
    lr: float = with_default(OptimConfig, "lr", 1e-4)
    min_lr: float = with_default(OptimConfig, "min_lr", 1e-5)
    schedule: str = with_default(OptimConfig, "schedule", "constant")
    warmup_steps: int = with_default(OptimConfig, "warmup_steps", 0)
    optimizer: str = with_default(OptimConfig, "optimizer", "adamw")
    weight_decay: float = with_default(OptimConfig, "weight_decay", 0.0)
    log_every: int = with_default(OptimConfig, "log_every", 1)
    checkpoint_every: int = with_default(OptimConfig, "checkpoint_every", 10)
    prompts_per_step: int = spec(8, ge=1)
    group_size: int = spec(8, ge=2, doc="replies sampled per prompt")
    temperature: float = spec(1.0, gt=0)
    max_new_tokens: int = spec(96, ge=1)
    clip: float = spec(0.2, gt=0, lt=1, doc="PPO clipping of the probability ratio")
    kl_coef: float = spec(0.04, ge=0, doc="weight of the KL penalty to the reference")
    inner_epochs: int = spec(1, ge=1, doc="optimisation passes over each sampled batch")
    no_end_penalty: float = spec(0.1, ge=0, doc="subtracted when a reply does not end with "
                                               "<|im_end|>")
    tasks: list[str] = spec(default_factory=lambda: list(SYNTHETIC_TASKS))
    words: str = spec("compounds", choices=("compounds", "train"),
                      doc="what the spell, count and reverse prompts are about: compounds (two "
                          "or three vocabulary pieces joined: strings no training stream "
                          "spelled) | train (the training words' questions)")
    eval_per_task: int = spec(100, ge=0, doc="held-out conversations per task for the "
                                             "before / after exact match")
    method: str = spec("full", choices=("full", "lora"))
    lora: LoRAConfig = spec(default_factory=LoRAConfig)

    def validate(self) -> list[str]:
        problems = super().validate()
        bad = [t for t in self.tasks if t not in SYNTHETIC_TASKS]
        if bad or not self.tasks:
            problems.append(f"tasks must be a non-empty list from {', '.join(SYNTHETIC_TASKS)} "
                            f"(got {self.tasks})")
        return problems
