"""The optimizer step's knobs (:class:`OptimConfig`, the base of every training section) and
the ``pretrain:`` section (:class:`TrainConfig`, the base of ``sft:``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from llmcore.schema import spec

T = TypeVar("T")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer step's knobs, shared by every training section (pretrain, sft, dpo, rl).

    Each section is a subclass with its own defaults (params.yaml's), and the step
    (:class:`llmcore.train.step.OptimizerStep`) takes any of them: one set of fields, one
    meaning, whichever objective trains.
    """

    max_steps: int = spec(600, ge=1, doc="optimizer steps")
    grad_accum: int = spec(1, ge=1, doc="micro-batches per optimizer step")
    lr: float = spec(3e-3, gt=0)
    min_lr: float = spec(3e-4, ge=0)
    schedule: str = spec("cosine", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = spec(50, ge=0)
    decay_fraction: float = spec(0.2, gt=0, le=1, doc="wsd: share of steps spent decaying")
    optimizer: str = spec("muon", choices=("adamw", "muon"),
                          doc="muon: Muon for the blocks' matrices, AdamW for the rest")
    muon_momentum: float = spec(0.95, ge=0, lt=1)
    weight_decay: float = spec(0.1, ge=0)
    beta1: float = spec(0.9, ge=0, lt=1)
    beta2: float = spec(0.95, ge=0, lt=1)
    eps: float = spec(1e-8, gt=0)
    grad_clip: float = spec(1.0, ge=0, doc="max global grad norm; 0 disables")
    log_every: int = spec(20, ge=1, doc="steps between progress lines")
    checkpoint_every: int = spec(100, ge=1)
    keep_checkpoints: int = spec(2, ge=1)
    resume: str = spec("auto", choices=("auto", "never", "must"))

    def validate(self) -> list[str]:
        problems = []
        if self.min_lr > self.lr:
            problems.append(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if getattr(self, "epochs", None) is None and self.max_steps > 0 \
                and self.warmup_steps >= self.max_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be < max_steps "
                            f"({self.max_steps})")
        return problems


def with_default(cls: type, name: str, value: T, **bounds: float | str) -> T:
    """Field ``name`` of ``cls`` with another default (same doc; bounds as given, or same)."""
    meta = dict({f.name: f for f in dataclasses.fields(cls)}[name].metadata)
    meta.update(bounds)
    return field(default=value, metadata=meta)


# the fields of a section that change no number of its run (left out of its fingerprint)
NON_SHAPING = ("log_every", "checkpoint_every", "keep_checkpoints", "resume", "compile",
               "threads", "peak_flops", "nproc_per_node", "require_val", "dist_timeout")


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """``pretrain:`` the training loop; its defaults are params.yaml's ``pretrain:``."""

    max_steps: int = with_default(OptimConfig, "max_steps", 400,
                              doc="optimizer steps (ignored when epochs is set)")
    epochs: float | None = spec(None, gt=0, doc="passes over the training rows; sets max_steps")
    # a sweep at 4e12 FLOPs on a 0.8M model (docs/scaling.md): lr 0.015 gave 1.847 bpb
    # against 1.956 at 0.003, and 8 rows per step 1.847 against 1.902 at 16 (lr 0.02)
    lr: float = with_default(OptimConfig, "lr", 1.5e-2)
    min_lr: float = with_default(OptimConfig, "min_lr", 1.5e-3)
    batch_size: int = spec(8, ge=1, doc="rows per micro-batch per process")
    eval_every: int = spec(200, ge=1)
    eval_batches: int = spec(20, ge=1)
    require_val: bool = spec(True, doc="false: train without validation when the val split "
                                       "has no rows (exports the last weights)")
    early_stopping_patience: int | None = spec(None, ge=1, doc="evals without improvement")
    export: str = spec("best", choices=("best", "last"), doc="which weights become the model")
    compile: bool = spec(False, doc="torch.compile each transformer block (eager where no "
                                    "compiler is found, said in the log)")
    nproc_per_node: int = spec(1, ge=1, doc="> 1: run under torchrun (DDP or FSDP)")
    parallel: str = spec("ddp", choices=("ddp", "fsdp"),
                         doc="under torchrun: ddp (every rank holds the whole model) | fsdp "
                             "(parameters, gradients and optimizer state sharded per block)")
    dist_timeout: int = spec(900, ge=10, doc="seconds a rank waits for the others before the "
                                             "run stops (a lost node ends it, not hangs it)")
    threads: int | None = spec(None, ge=1, doc="CPU threads per process; None: torch default")
    peak_flops: float | None = spec(None, gt=0, doc="device peak FLOP/s for MFU; None: measure")
