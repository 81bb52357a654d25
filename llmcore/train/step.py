"""One optimizer step, shared by pretraining, SFT, DPO and GRPO, and what it runs in.

The objectives differ (next-token loss with a mask, the DPO loss over pairs, the clipped GRPO
surrogate); the step does not. :class:`OptimizerStep` owns, for all of them:

* the optimizer (:func:`llmcore.train.optim.make_optimizer`: AdamW or Muon + AdamW, betas and
  eps from params) and the learning rate of each step (:func:`llmcore.train.optim.lr_at`);
* gradient accumulation: the caller gives one loss closure per micro-batch, each already
  weighted so that their sum is the step's loss; under DDP gradients are all-reduced once, on
  the last micro-batch;
* mixed precision: :meth:`OptimizerStep.autocast` is bf16 only where it is native
  (:func:`llmcore.device.precision`), fp16 with a gradient scaler, fp32 otherwise;
* clipping of the global gradient norm (``grad_clip: 0`` disables it), and a stop before the
  optimizer touches the weights when the loss or the gradient is not finite;
* its checkpoints: :meth:`OptimizerStep.save` and :meth:`OptimizerStep.restore` hold the
  weights, the optimizer and scaler state, every RNG state and the caller's own state (data
  position, history), so that a killed run resumes bit-exactly.

:class:`Progress` prints a line every ``log_every`` steps with the rate and the ETA.

Trade-off: the step knows nothing of batches, so each objective splits its own batch into
micro-batches and weighs them; the price is a few lines per objective, the gain that one
step serves token-weighted losses (pretraining, SFT) and per-example means (DPO, GRPO) alike.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from llmcore.config.train import OptimConfig
from llmcore.device import autocast
from llmcore.schema import UserError
from llmcore.tracking import Tracker
from llmcore.train.checkpoint import CheckpointManager, Loaded, set_rng_state
from llmcore.train.optim import Optimizers, lr_at, make_optimizer
from llmcore.train.parallel import as_float, set_gradient_sync

Log = Callable[[str], None]


class NonFiniteLoss(UserError):
    """Training diverged."""


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        # float64: token counts of big runs exceed float32's exact integers
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        t = torch.tensor([1 if flag else 0], device=device)
        if self.enabled:
            dist.broadcast(t, 0)
        return bool(t.item())


@dataclass
class RunContext:
    """Where and for whom a run computes: device, precision, ranks, checkpoints, reporting."""

    device: torch.device
    dtype: torch.dtype  # autocast dtype (float32: none)
    token_bytes: torch.Tensor | None = None  # (V,) UTF-8 bytes per token id, for bits per byte
    checkpoints: CheckpointManager | None = None
    tracker: Tracker | None = None
    dist: Dist = field(default_factory=Dist)
    log: Log = print
    name: str = "train"  # prefix of log lines and metric names, and of params keys in errors
    muon_dtype: torch.dtype = torch.float32  # Muon's Newton-Schulz (device.precision decides)


class OptimizerStep:
    """The optimizer, the scaler and the schedule of one run, and its checkpoints."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, ctx: RunContext) -> None:
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.optimizer: Optimizers = make_optimizer(model, cfg, ctx.muon_dtype)
        # fp16 has too few exponent bits for small gradients; bf16 and fp32 need no scaling
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)

    def autocast(self) -> AbstractContextManager[None]:
        """The forward's precision: bf16 where native, fp16 where only that exists, else fp32."""
        context: AbstractContextManager[None] = autocast(self.ctx.device, self.ctx.dtype)
        return context

    def set_lr(self, step: int) -> float:
        """The schedule's learning rate for optimizer step ``step`` (0-based), applied."""
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, wrapped: torch.nn.Module, losses: Sequence[Callable[[], torch.Tensor]]
                 ) -> None:
        """Accumulate the gradients of each micro-batch's loss (each closure runs its forward,
        under :meth:`autocast` where it wants it). Under DDP ``wrapped`` is the DDP module and
        gradients are all-reduced once, on the last micro-batch."""
        last = len(losses) - 1
        ddp = self.ctx.dist.enabled and hasattr(wrapped, "no_sync")
        for i, loss_fn in enumerate(losses):
            sync = (wrapped.no_sync() if ddp and i < last  # type: ignore[operator]
                    else contextlib.nullcontext())
            set_gradient_sync(self.model, i == last)  # FSDP's no_sync (nothing otherwise)
            with sync:
                self.scaler.scale(loss_fn()).backward()  # type: ignore[no-untyped-call]

    def update(self, loss: float, step: int) -> float:
        """Clip, check, step and clear the gradients; returns the (unclipped) gradient norm.

        ``loss`` is the step's loss (for the check); ``step`` the 1-based step it completes
        (for the message). Nothing is written to the weights when either is not finite.
        """
        for opt in self.optimizer.optimizers:  # clip the true gradient, not the scaled one
            self.scaler.unscale_(opt)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        # sharded gradients give a DTensor norm, already reduced over the ranks
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        # with fp16 the scaler skips steps with inf gradients by itself; otherwise stop here,
        # before the optimizer writes NaN into the weights
        if not math.isfinite(loss) or (not math.isfinite(grad_norm)
                                       and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(loss, grad_norm, step)
        for opt in self.optimizer.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _diverged(self, loss: float, grad_norm: float, step: int) -> None:
        name, ckpts = self.ctx.name, self.ctx.checkpoints
        steps = ckpts.steps() if ckpts is not None else []
        raise NonFiniteLoss(
            f"{name}: loss became {loss} (grad norm {grad_norm}) at step {step}; the "
            f"weights were not updated. Last good checkpoint: {steps[-1] if steps else 'none'}."
            f" Lower {name}.lr, raise {name}.warmup_steps or keep {name}.grad_clip > 0.")

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any]) -> None:
        """A checkpoint after ``step`` steps: weights, optimizer, scaler, RNGs and ``state``
        (the caller's: data position, history). Rank 0 writes; every rank waits for it."""
        ctx = self.ctx
        if ctx.checkpoints is None:
            return
        if ctx.dist.is_main or ctx.checkpoints.collective:  # sharded: each rank its shards
            scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
            ctx.checkpoints.save(step, self.model, self.optimizer, {**state, "scaler": scaler})
        ctx.dist.barrier()  # no rank runs ahead of a checkpoint it could be resumed from

    def restore(self, load_state: Callable[[Loaded], None] = lambda loaded: None
                ) -> Loaded | None:
        """Continue from the newest intact checkpoint of this configuration, as ``resume``
        says (``never``: delete them; ``must``: fail without one). ``load_state`` restores the
        caller's own state; the RNGs are restored last, so nothing it does can draw from them
        afterwards."""
        ctx, manager = self.ctx, self.ctx.checkpoints
        if manager is None:
            return None
        if self.cfg.resume == "never":
            if ctx.dist.is_main:
                for old in manager.steps():
                    shutil.rmtree(old, ignore_errors=True)
            ctx.dist.barrier()
            return None
        loaded = manager.load_latest()
        if loaded is None:
            self._fresh_start(manager)
            return None
        ctx.log(f"{ctx.name}: resuming from {loaded.path} (step {loaded.step})")
        # sharded: each rank reads the pieces it owns at this world size
        manager.restore(loaded, self.model, self.optimizer)
        if loaded.state.get("scaler"):
            self.scaler.load_state_dict(loaded.state["scaler"])
        load_state(loaded)
        set_rng_state(loaded.rng)
        return loaded

    def _fresh_start(self, manager: CheckpointManager) -> None:
        name, others = self.ctx.name, manager.other_configurations()
        if self.cfg.resume == "must":
            raise UserError(
                f"{name}.resume is must but {manager.dir} has no usable checkpoint"
                + (f" (checkpoints of {len(others)} other configuration(s) exist: the params, "
                   "data or code changed since)" if others else "")
                + f"; set {name}.resume: auto to start fresh")
        if others:
            self.ctx.log(f"{name}: the checkpoints in {manager.root} were made with other "
                         "params, data or code and cannot be resumed exactly; starting fresh "
                         f"(they stay in {[o.name for o in others]})")


class Progress:
    """A progress line every ``every`` steps: the caller's fields, the rate and the ETA."""

    def __init__(self, name: str, total: int, every: int, log: Log) -> None:
        self.name, self.total, self.every, self.log = name, total, every, log
        self.restart()

    def restart(self) -> None:
        """Start a new window (time before this call is not counted)."""
        self._mark, self._steps = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        """Count one step; whether ``step`` (1-based) gets a line."""
        self._steps += 1
        return step % self.every == 0 or step == self.total

    def lap(self) -> tuple[float, int]:
        """(seconds, steps) of the window since the last line; starts the next window."""
        now = time.perf_counter()
        out = (now - self._mark, self._steps)
        self._mark, self._steps = now, 0
        return out

    def report(self, step: int, fields: Sequence[str], seconds: float, steps: int) -> None:
        per_step = seconds / max(1, steps)
        eta = (self.total - step) * per_step
        self.log(f"{self.name} step {step}/{self.total} | " + " | ".join(fields)
                 + f" | {per_step:.2f} s/step | eta {eta / 60:.1f} min")


class StepLoop:
    """What every objective's loop holds around its step: pretraining and SFT
    (:class:`llmcore.train.loop.Trainer`), DPO and GRPO (:mod:`llmcore.align`).

    * the cadence: evaluate every ``eval_every`` steps and checkpoint every
      ``checkpoint_every``, and both at the last step;
    * the clock: training seconds summed over the sessions of a resumed run (a checkpoint
      carries them; time before :meth:`start` is loading, not training);
    * the progress line every ``log_every`` steps, with the rate and the ETA;
    * the curve: each step's numbers as ``<name>/<key>`` metrics of the run's tracker at that
      step (rank 0 only), what the MLflow UI plots for every stage alike.
    """

    def __init__(self, ctx: RunContext, cfg: OptimConfig, eval_every: int | None = None) -> None:
        self.ctx, self.max_steps, self.eval_every = ctx, cfg.max_steps, eval_every
        self.checkpoint_every = cfg.checkpoint_every
        self.progress = Progress(ctx.name, cfg.max_steps, cfg.log_every, ctx.log)
        self.seconds = 0.0
        self._mark = time.perf_counter()

    def start(self, seconds: float = 0.0) -> None:
        """A session starts, after ``seconds`` of training in earlier ones."""
        self.seconds, self._mark = seconds, time.perf_counter()
        self.progress.restart()

    def clock(self) -> float:
        """The training seconds so far, this session's included."""
        now = time.perf_counter()
        self.seconds, self._mark = self.seconds + now - self._mark, now
        return self.seconds

    def eval_due(self, done: int) -> bool:
        """Whether an evaluation follows step ``done`` (1-based)."""
        return self.eval_every is not None and (done % self.eval_every == 0
                                                or done == self.max_steps)

    def checkpoint_due(self, done: int) -> bool:
        """Whether a checkpoint follows step ``done`` (1-based)."""
        return done % self.checkpoint_every == 0 or done == self.max_steps

    def curve(self, row: Mapping[str, float | int | None], prefix: str = "") -> None:
        """``row`` (``step`` and its numbers) as ``<name>/<prefix><key>`` tracker metrics at
        that step."""
        if self.ctx.tracker is not None and self.ctx.dist.is_main:
            self.ctx.tracker.log_metrics({f"{self.ctx.name}/{prefix}{k}": float(v)
                                          for k, v in row.items()
                                          if k != "step" and v is not None},
                                         step=int(row["step"] or 0))
