"""``lora:`` inside the ``sft:``, ``dpo:`` and ``rl:`` sections: the adapters trained when a
section's ``method`` is lora."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.schema import spec

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # llmcore.model.lora.TARGETS' keys


@dataclass(frozen=True)
class LoRAConfig:
    """``sft.lora:`` the adapters trained when ``sft.method`` is lora."""

    rank: int = spec(8, ge=1, doc="rank of each adapter")
    alpha: float = spec(16.0, gt=0, doc="the update is scaled by alpha / rank")
    dropout: float = spec(0.0, ge=0, lt=1, doc="dropout on the adapters' input")
    targets: list[str] = spec(default_factory=lambda: list(LORA_TARGETS),
                              doc="q k v o (attention), gate up down (MLP)")

    def validate(self) -> list[str]:
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            return [f"targets must be a non-empty list from {', '.join(LORA_TARGETS)} "
                    f"(got {self.targets})"]
        return []
