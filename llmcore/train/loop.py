"""The training loop: one optimizer step, evaluation, checkpoints, progress.

A batch is ``(input_ids, targets, loss_mask)``; the loss is the mean cross-entropy over the
tokens where ``loss_mask`` is 1, taken over the whole optimizer step: the token count of all
micro-batches (and, under DDP, of all ranks) is summed first, so gradient accumulation and
DDP give the same gradient as one big batch even when SFT masks differ between rows.

Global gradient-norm clipping; bf16 autocast where the hardware has it, fp16 with a gradient
scaler where only that exists, fp32 otherwise; ``compile``: each transformer block compiled
(``llmcore.train.compiled``; the whole model under FSDP).

Every ``eval_every`` steps: validation loss and bits per byte on the first ``eval_batches``
batches of the held-out rows (the same rows every time); the best weights are kept; optional
early stopping. Checkpoints every ``checkpoint_every`` steps hold everything needed to resume
bit-exactly (see ``llmcore.train.checkpoint``). A non-finite loss or gradient stops the run before
the optimizer touches the weights, with the last good checkpoint kept.

Trade-off: evaluation and checkpointing run on rank 0 while the other ranks wait at a barrier;
simple and deterministic, but idle time on big clusters.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import Any

import torch

from llmcore.config.train import TrainConfig
from llmcore.data.shards import Batch, ShardDataset, ShardLoader
from llmcore.device import measure_peak_flops, memory_mb, sync
from llmcore.model.loss import heldout_loss, loss_sums
from llmcore.model.transformer import Transformer, flops_per_token
from llmcore.schema import UserError
from llmcore.train.checkpoint import Loaded
from llmcore.train.compiled import compiled_blocks
from llmcore.train.optim import Optimizers
from llmcore.train.parallel import is_sharded
from llmcore.train.step import (
    Dist,
    Log,
    NonFiniteLoss,
    OptimizerStep,
    Progress,
    RunContext,
    StepLoop,
)

__all__ = ["Dist", "Log", "NonFiniteLoss", "RunContext", "TrainResult", "Trainer"]

@dataclass
class TrainResult:
    step: int
    best: dict[str, Any] | None
    last_eval: dict[str, float] | None
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    tokens_per_second: float
    mfu: float | None
    seconds: float
    stopped_early: bool
    resumed_from: int | None
    peak_memory_mb: float
    peak_flops: float = 0.0  # the MFU denominator
    peak_source: str = ""  # "param" (a stored peak) or "measured" (at the start of this run)


# Under autocast the head's products go to oneDNN (CPU) or cuBLAS kernels chosen per shape; a
# row count that changes every step made a new one every step (on a CPU, peak memory grew from
# 1.1 to 4.4 GB over 1,600 SFT steps). Rounded up to a multiple, the counts are a few dozen.
KEEP_MULTIPLE = 128


def round_up_positions(keep: torch.Tensor, multiple: int) -> torch.Tensor:
    """``keep`` (B, T) bool with the first positions it leaves out added, until the count is a
    multiple of ``multiple`` (or every position is kept). The added positions have a zero loss
    mask, so they change the work, not the loss."""
    n = int(keep.sum())
    extra = min(-n % multiple, keep.numel() - n)
    if extra == 0:
        return keep
    out = keep.clone()
    out.view(-1)[(~keep).flatten().nonzero().flatten()[:extra]] = True
    return out


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``model`` on ``loader``."""

    def __init__(self, model: Transformer, cfg: TrainConfig, loader: ShardLoader,
                 val: ShardDataset | None, ctx: RunContext) -> None:
        self.model, self.cfg, self.loader, self.val, self.ctx = model, cfg, loader, val, ctx
        self.stepper = OptimizerStep(model, cfg, ctx)
        # cadence, clock, progress line and curve: the same as DPO's and GRPO's
        self.loop = StepLoop(ctx, cfg, cfg.eval_every)
        self.step = 0
        self.peak: tuple[float, str] = (0.0, "")  # MFU denominator and where it came from
        self.best: dict[str, Any] | None = None
        self.evals_without_improvement = 0
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self.stopped_early = False
        self._doc_mask = bool(getattr(getattr(model, "cfg", None), "doc_mask", False))
        self.last_eval: dict[str, float] | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def optimizer(self) -> Optimizers:
        return self.stepper.optimizer

    def restore(self) -> Loaded | None:
        """Resume from the newest checkpoint of this configuration (as ``resume`` says)."""
        loaded = self.stepper.restore(self._load_state)
        if loaded is not None:
            self.resumed_from = loaded.step
        return loaded

    def _load_state(self, loaded: Loaded) -> None:
        self.loader.load_state_dict(loaded.state["loader"])
        self.step = loaded.step
        self.best = loaded.state.get("best")
        self.evals_without_improvement = int(loaded.state.get("evals_without_improvement", 0))
        # the history of the steps before the kill, so curves and averages cover the whole run
        self.history = list(loaded.state.get("history", []))
        self.evals = list(loaded.state.get("evals", []))
        self.loop.seconds = float(loaded.state.get("train_seconds", 0.0))

    @property
    def progress(self) -> Progress:
        return self.loop.progress

    @property
    def train_seconds(self) -> float:
        """Training seconds across every session of this run (restored on resume)."""
        return self.loop.seconds

    def save_checkpoint(self) -> None:
        if self.ctx.dist.is_main:
            self.loop.clock()
        self.stepper.save(self.step, {
            "loader": self.loader.state_dict(), "best": self.best,
            "train_seconds": self.train_seconds,
            "evals_without_improvement": self.evals_without_improvement,
            "history": self.history, "evals": self.evals})

    # -- one step ------------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        """The module the loop calls: compiled and/or DDP-wrapped around the same weights."""
        model: torch.nn.Module = self.model
        if self._whole_compiled:
            model = typing.cast(torch.nn.Module, torch.compile(model))
        if self.ctx.dist.enabled and not is_sharded(self.model):  # FSDP syncs by itself
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        return model

    def train_step(self, model: torch.nn.Module, batches: list[Batch]) -> tuple[float, float]:
        """One optimizer step over ``batches``; returns (mean loss, grad norm)."""
        ctx = self.ctx
        local_tokens = sum(float(b.loss_mask.sum()) for b in batches)
        (global_tokens,) = ctx.dist.all_sum([local_tokens], ctx.device)
        if global_tokens == 0:
            raise UserError(f"{ctx.name}: a training step has no target tokens (loss_mask is "
                            "all zero): re-run `dvc repro pack`")
        sums: list[torch.Tensor] = []

        def micro(b: Batch) -> torch.Tensor:
            x, y = b.input_ids.to(ctx.device), b.targets.to(ctx.device)
            m = b.loss_mask.to(ctx.device)
            seg = b.segments.to(ctx.device) if self._doc_mask and b.segments is not None \
                else None
            # the head only where a loss is taken (SFT's replies); a whole-model graph keeps
            # static shapes, and pretraining's mask is all ones
            keep = None if self._whole_compiled or bool(b.loss_mask.all()) else m.bool()
            if keep is not None and ctx.dtype != torch.float32:
                keep = round_up_positions(keep, KEEP_MULTIPLE)
            with self.stepper.autocast():
                if keep is None:
                    logits = model(x, segments=seg)
                else:
                    logits = model(x, segments=seg, keep=keep)
                    y, m = y[keep], m[keep]
            loss_sum, _ = loss_sums(logits, y, m)
            sums.append(loss_sum.detach())
            # DDP averages gradients over ranks: scale so the result is the global mean
            return loss_sum * (ctx.dist.world_size / global_tokens)

        self.stepper.backward(model, [functools.partial(micro, b) for b in batches])
        (loss_global,) = ctx.dist.all_sum([sum(float(s) for s in sums)], ctx.device)
        mean_loss = loss_global / global_tokens
        return mean_loss, self.stepper.update(mean_loss, self.step + 1)

    # -- evaluation and logging ----------------------------------------------------------------

    def run_eval(self) -> dict[str, float] | None:
        ctx, result = self.ctx, None
        # sharded weights are gathered by every rank: all of them run the forward
        sharded = ctx.dist.enabled and is_sharded(self.model)
        if (ctx.dist.is_main or sharded) and self.val is not None:
            assert ctx.token_bytes is not None, "evaluation needs the tokenizer's bytes per token"
            ev = heldout_loss(self.model, self.val, self.loader.batch_size,
                              self.cfg.eval_batches, ctx.token_bytes, ctx.device, ctx.dtype)
            improved = self.best is None or ev["loss"] < self.best["val_loss"]
            if sharded:  # rank 0's verdict, so that every rank joins the same gather
                improved = ctx.dist.broadcast_flag(improved, ctx.device)
            if improved and sharded and ctx.checkpoints is not None and not ctx.dist.is_main:
                ctx.checkpoints.save_best(self.model, {})  # its part of the gather
        if ctx.dist.is_main and self.val is not None:
            result = {"step": self.step, "val_loss": ev["loss"], "val_bpb": ev["bpb"]}
            self.evals.append(result)
            if improved:
                self.best = dict(result)
                self.evals_without_improvement = 0
                if ctx.checkpoints is not None:
                    ctx.checkpoints.save_best(self.model, self.best)
            else:
                self.evals_without_improvement += 1
            ctx.log(f"{ctx.name} step {self.step}: val loss {ev['loss']:.4f}, "
                    f"val bpb {ev['bpb']:.4f}{' (best)' if improved else ''}")
            self.loop.curve({"step": self.step, "loss": ev["loss"], "bpb": ev["bpb"]}, "val_")
        ctx.dist.barrier()
        return result

    def _progress(self, row: dict[str, float], fpt: float, peak: float) -> None:
        """Add throughput, MFU and memory of the last window to ``row``; print a line."""
        ctx, cfg = self.ctx, self.cfg
        sync(ctx.device)
        dt, steps = self.progress.lap()
        seq_len = self.loader.ds.row_len - 1
        tokens_per_step = self.loader.batch_size * seq_len * cfg.grad_accum * ctx.dist.world_size
        tps = steps * tokens_per_step / dt
        mfu = tps * fpt / (peak * ctx.dist.world_size)
        mem = memory_mb(ctx.device)
        row.update(tokens_per_s=tps, mfu=mfu, memory_mb=mem)
        self.progress.report(self.step, [
            f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"grad {row['grad_norm']:.2f}",
            f"{tps:,.0f} tok/s", f"mfu {100 * mfu:.1f}%", f"mem {mem:,.0f} MB"], dt, steps)

    def _eval_and_maybe_stop(self) -> bool:
        """Evaluate; True when early stopping ends the run here (every rank agrees)."""
        self.last_eval = self.run_eval() or self.last_eval
        patience = self.cfg.early_stopping_patience
        stop = patience is not None and self.evals_without_improvement >= patience
        if self.ctx.dist.broadcast_flag(stop, self.ctx.device) and self.step < self.cfg.max_steps:
            self.ctx.log(f"{self.ctx.name}: no improvement in {patience} evaluations; "
                         f"stopping early at step {self.step}")
            self.stopped_early = True
            self.save_checkpoint()
            return True
        return False

    # -- the loop ------------------------------------------------------------------------------

    @property
    def _whole_compiled(self) -> bool:
        # FSDP's per-block hooks are not traced inside a compiled block: there the whole model
        return self.cfg.compile and is_sharded(self.model)

    def run(self) -> TrainResult:
        regional = self.cfg.compile and not is_sharded(self.model)
        with compiled_blocks(self.model.blocks() if regional else [], self.ctx.device,
                             self.ctx.log):
            return self._run()

    def _run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        model = self._wrap()
        model.train()
        fpt = flops_per_token(self.model.cfg, self.loader.ds.row_len - 1)
        peak = cfg.peak_flops or measure_peak_flops(ctx.device, ctx.dtype)
        self.peak = (peak, "param" if cfg.peak_flops else "measured")
        ctx.log(f"{ctx.name}: mfu against a peak of {peak / 1e9:,.1f} GFLOP/s "
                + ("(peak_flops param)" if cfg.peak_flops else
                   "(measured now, best of 5 matmuls; a busy machine makes it read low and MFU "
                   "high: set peak_flops from benchmarks/peak_flops.py on a quiet machine)"))
        self.loop.start(self.loop.seconds)  # time before this call is not training
        self.last_eval = self.evals[-1] if self.evals else None
        if self.step >= cfg.max_steps:
            ctx.log(f"{ctx.name}: checkpoint is at step {self.step} = max_steps; nothing to train")
        while self.step < cfg.max_steps:
            lr = self.stepper.set_lr(self.step)
            batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
            loss, grad_norm = self.train_step(model, batches)
            self.step += 1
            row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            if self.progress.due(self.step):
                self._progress(row, fpt, peak)
            self.history.append(row)
            self.loop.curve(row)
            if self.loop.eval_due(self.step) and self._eval_and_maybe_stop():
                break
            if self.loop.checkpoint_due(self.step):
                self.save_checkpoint()
        self.loop.clock()
        return self._result()

    def _result(self) -> TrainResult:
        # throughput over every logged window of the run, sessions before a resume included
        tps_all = [r["tokens_per_s"] for r in self.history if r.get("tokens_per_s")]
        mfu_all = [r["mfu"] for r in self.history if r.get("mfu")]
        mem_all = [r["memory_mb"] for r in self.history if r.get("memory_mb")]
        return TrainResult(
            step=self.step, best=self.best, last_eval=self.last_eval, history=self.history,
            evals=self.evals,
            tokens_per_second=sum(tps_all) / len(tps_all) if tps_all else 0.0,
            mfu=sum(mfu_all) / len(mfu_all) if mfu_all else None,
            seconds=self.train_seconds, stopped_early=self.stopped_early,
            resumed_from=self.resumed_from,
            peak_memory_mb=max(mem_all + [memory_mb(self.ctx.device)]),
            peak_flops=self.peak[0], peak_source=self.peak[1],
        )
