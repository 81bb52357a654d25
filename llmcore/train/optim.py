"""The optimizer and the learning-rate schedule.

``adamw``: AdamW with two parameter groups, weight decay on the matrices of Linear layers
only. Decay pulls weights toward 0, which regularises matrices but would drag norm gains
(meant to stay near 1), biases and the embedding rows of rare tokens (seen too seldom to
recover).

``muon``: :class:`llmcore.train.muon.Muon` for the 2-D weights inside the blocks (attention and MLP
projections), AdamW as above for the rest (embeddings, the head, norms, biases), the split of
the modded-nanogpt speedruns and nanochat. Muon orthogonalises each matrix's momentum
(Newton-Schulz), so every direction of the update moves at a similar rate. Its update is
scaled to AdamW's RMS, so one learning rate and one schedule drive both. The iteration runs in
the dtype the device module picks (bf16 only where it is native). The two are stepped
together as one :class:`Optimizers`, which is also what checkpoints save.

The schedule is a pure function of the step, so a resumed run needs no scheduler state: linear
warmup (Adam's moment estimates are noise for the first steps), then cosine down to ``min_lr``,
or warmup-stable-decay (flat, then a linear cool-down; a run can be extended before the decay),
or constant.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import torch

from llmcore.config.train import OptimConfig
from llmcore.train.muon import Muon


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


class OptimizersState(TypedDict, total=False):
    """What :meth:`Optimizers.state_dict` gives (``optimizer.pt`` of a checkpoint): each
    optimizer's own ``state_dict()``, in torch's format. Empty where a sharded checkpoint
    keeps the optimizer state elsewhere (:mod:`llmcore.train.sharded`)."""

    optimizers: list[dict[str, Any]]


class Optimizers:
    """Several optimizers seen as one: their groups, their state, one zero_grad."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> OptimizersState:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: OptimizersState) -> None:
        saved = state.get("optimizers", [])
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(saved)} optimizers, this run has "
                             f"{len(self.optimizers)}")
        for o, s in zip(self.optimizers, saved, strict=True):
            o.load_state_dict(s)


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the blocks (``layers.*``): what Muon takes."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and name.startswith("layers.")]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                   muon_dtype: torch.dtype = torch.float32) -> Optimizers:
    """AdamW, or Muon + AdamW; ``muon_dtype``: of Muon's Newton-Schulz iteration."""
    hidden = muon_params(model) if cfg.optimizer == "muon" else []
    taken = {id(p) for p in hidden}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in taken]}
              for g in param_groups(model, cfg.weight_decay)]
    groups = [g for g in groups if g["params"]]
    opts: list[torch.optim.Optimizer] = []
    if groups:  # empty when Muon takes every trainable matrix (e.g. LoRA adapters alone)
        opts.append(torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      eps=cfg.eps))
    if hidden:
        opts.append(Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         momentum=cfg.muon_momentum, ns_dtype=muon_dtype))
    return Optimizers(opts)


def lr_at(step: int, cfg: OptimConfig) -> float:
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
