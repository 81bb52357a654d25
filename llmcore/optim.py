"""The optimizer and the learning-rate schedule.

AdamW with two parameter groups: weight decay on the matrices of Linear layers only. Decay
pulls weights toward 0, which regularises matrices but would drag norm gains (meant to stay
near 1), biases and the embedding rows of rare tokens (seen too seldom to recover).

The schedule is a pure function of the step, so a resumed run needs no scheduler state: linear
warmup (Adam's moment estimates are noise for the first steps), then cosine down to ``min_lr``,
or warmup-stable-decay (flat, then a linear cool-down; a run can be extended before the decay),
or constant.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmcore.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the matrices of Linear layers; not norms, biases or embeddings."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied matrix is one parameter
            continue
        seen.add(id(p))
        if p.ndim >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # the cool-down takes the last decay_fraction of the steps
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(frac, 1.0)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))
