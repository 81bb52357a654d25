"""The training loop: one optimizer step, evaluation, checkpoints, progress.

A batch is ``(input_ids, targets, loss_mask)``; the loss is the mean cross-entropy over the
tokens where ``loss_mask`` is 1, taken over the whole optimizer step: the token count of all
micro-batches (and, under DDP, of all ranks) is summed first, so gradient accumulation and
DDP give the same gradient as one big batch even when SFT masks differ between rows.

Global gradient-norm clipping; bf16 autocast where the hardware has it, fp16 with a gradient
scaler where only that exists, fp32 otherwise; optional ``torch.compile``.

Every ``eval_every`` steps: validation loss and bits per byte on the first ``eval_batches``
batches of the held-out rows (the same rows every time); the best weights are kept; optional
early stopping. Checkpoints every ``checkpoint_every`` steps hold everything needed to resume
bit-exactly (see ``llmcore.train.checkpoint``). A non-finite loss or gradient stops the run before
the optimizer touches the weights, with the last good checkpoint kept.

Trade-off: evaluation and checkpointing run on rank 0 while the other ranks wait at a barrier;
simple and deterministic, but idle time on big clusters.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from llmcore.config import TrainConfig, UserError
from llmcore.data.shards import Batch, ShardDataset, ShardLoader
from llmcore.device import autocast, measure_peak_flops, memory_mb, sync
from llmcore.model.loss import heldout_loss, loss_sums
from llmcore.model.modeldir import load_weights
from llmcore.model.transformer import flops_per_token
from llmcore.train.checkpoint import CheckpointManager, Loaded, set_rng_state
from llmcore.train.optim import lr_at, make_optimizer

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
    dtype: torch.dtype
    token_bytes: torch.Tensor  # (V,) UTF-8 bytes per token id, for bits per byte
    checkpoints: CheckpointManager | None = None
    tracker: Any = None
    dist: Dist = field(default_factory=Dist)
    log: Log = print
    name: str = "train"  # prefix of log lines and metric names, and of params keys in errors
    muon_dtype: torch.dtype = torch.float32  # Muon's Newton-Schulz (device.precision decides)


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


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``model`` on ``loader``."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, loader: ShardLoader,
                 val: ShardDataset | None, ctx: RunContext) -> None:
        self.model, self.cfg, self.loader, self.val, self.ctx = model, cfg, loader, val, ctx
        self.optimizer = make_optimizer(model, cfg, ctx.muon_dtype)
        # fp16 has too few exponent bits for small gradients; bf16 and fp32 need no scaling
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)
        self.step = 0
        self.peak: tuple[float, str] = (0.0, "")  # MFU denominator and where it came from
        self.best: dict[str, Any] | None = None
        self.evals_without_improvement = 0
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self.train_seconds = 0.0  # across every session of this run (restored on resume)
        self._session_mark = time.perf_counter()
        self.stopped_early = False
        self._doc_mask = bool(getattr(getattr(model, "cfg", None), "doc_mask", False))
        self.last_eval: dict[str, float] | None = None

    # -- state ---------------------------------------------------------------------------------

    def restore(self, loaded: Loaded) -> None:
        load_weights(self.model, loaded.model)
        self.optimizer.load_state_dict(loaded.optimizer)
        self.loader.load_state_dict(loaded.state["loader"])
        self.step = loaded.step
        self.best = loaded.state.get("best")
        self.evals_without_improvement = int(loaded.state.get("evals_without_improvement", 0))
        # the history of the steps before the kill, so curves and averages cover the whole run
        self.history = list(loaded.state.get("history", []))
        self.evals = list(loaded.state.get("evals", []))
        self.train_seconds = float(loaded.state.get("train_seconds", 0.0))
        if loaded.state.get("scaler"):
            self.scaler.load_state_dict(loaded.state["scaler"])
        set_rng_state(loaded.rng)  # last: loading above must not draw from the RNGs after it
        self.resumed_from = loaded.step

    def _clock(self) -> None:
        """Add the time since the last mark to the run's training seconds."""
        now = time.perf_counter()
        self.train_seconds += now - self._session_mark
        self._session_mark = now

    def save_checkpoint(self) -> None:
        ctx = self.ctx
        if ctx.checkpoints is None:
            return
        if ctx.dist.is_main:
            self._clock()
            state = {"loader": self.loader.state_dict(), "best": self.best,
                     "train_seconds": self.train_seconds,
                     "evals_without_improvement": self.evals_without_improvement,
                     "history": self.history, "evals": self.evals,
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            ctx.checkpoints.save(self.step, self.model, self.optimizer, state)
        ctx.dist.barrier()  # no rank runs ahead of a checkpoint it could be resumed from

    # -- one step ------------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        """The module the loop calls: compiled and/or DDP-wrapped around the same weights."""
        model = self.model
        if self.cfg.compile:
            model = torch.compile(model)
        if self.ctx.dist.enabled:
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
        loss_total = 0.0
        for i, b in enumerate(batches):
            # gradients are all-reduced once per step, on the last micro-batch, not each one
            sync_ctx = (model.no_sync() if ctx.dist.enabled and i < len(batches) - 1
                        else contextlib.nullcontext())
            with sync_ctx:
                x, y = b.input_ids.to(ctx.device), b.targets.to(ctx.device)
                m = b.loss_mask.to(ctx.device)
                seg = b.segments.to(ctx.device) if self._doc_mask and b.segments is not None \
                    else None
                with autocast(ctx.device, ctx.dtype):
                    logits = model(x, segments=seg)
                loss_sum, _ = loss_sums(logits, y, m)
                # DDP averages gradients over ranks: scale so the result is the global mean
                loss = loss_sum * (ctx.dist.world_size / global_tokens)
                self.scaler.scale(loss).backward()
                loss_total += float(loss_sum.detach())
        (loss_global,) = ctx.dist.all_sum([loss_total], ctx.device)
        mean_loss = loss_global / global_tokens
        for opt in self.optimizer.optimizers:  # clip the true gradient, not the scaled one
            self.scaler.unscale_(opt)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        # with fp16 the scaler skips steps with inf gradients by itself; otherwise stop here,
        # before the optimizer writes NaN into the weights
        if not math.isfinite(mean_loss) or (not math.isfinite(grad_norm)
                                            and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(mean_loss, grad_norm)
        for opt in self.optimizer.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm

    def _diverged(self, loss: float, grad_norm: float) -> None:
        name, ckpts = self.ctx.name, self.ctx.checkpoints
        steps = ckpts.steps() if ckpts is not None else []
        raise NonFiniteLoss(
            f"{name}: loss became {loss} (grad norm {grad_norm}) at step {self.step + 1}; the "
            f"weights were not updated. Last good checkpoint: {steps[-1] if steps else 'none'}."
            f" Lower {name}.lr, raise {name}.warmup_steps or keep {name}.grad_clip > 0.")

    # -- evaluation and logging ----------------------------------------------------------------

    def run_eval(self) -> dict[str, float] | None:
        ctx, result = self.ctx, None
        if ctx.dist.is_main and self.val is not None:
            ev = heldout_loss(self.model, self.val, self.loader.batch_size,
                              self.cfg.eval_batches, ctx.token_bytes, ctx.device, ctx.dtype)
            result = {"step": self.step, "val_loss": ev["loss"], "val_bpb": ev["bpb"]}
            self.evals.append(result)
            improved = self.best is None or ev["loss"] < self.best["val_loss"]
            if improved:
                self.best = dict(result)
                self.evals_without_improvement = 0
                if ctx.checkpoints is not None:
                    ctx.checkpoints.save_best(self.model, self.best)
            else:
                self.evals_without_improvement += 1
            ctx.log(f"{ctx.name} step {self.step}: val loss {ev['loss']:.4f}, "
                    f"val bpb {ev['bpb']:.4f}{' (best)' if improved else ''}")
            if ctx.tracker is not None:
                ctx.tracker.log_metrics({f"{ctx.name}/val_loss": ev["loss"],
                                         f"{ctx.name}/val_bpb": ev["bpb"]}, step=self.step)
        ctx.dist.barrier()
        return result

    def _progress(self, row: dict[str, float], window: tuple[float, int], fpt: float,
                  peak: float) -> None:
        """Add throughput, MFU and memory of the last window to ``row``; print a line."""
        ctx, cfg = self.ctx, self.cfg
        sync(ctx.device)
        dt = time.perf_counter() - window[0]
        seq_len = self.loader.ds.row_len - 1
        tokens_per_step = self.loader.batch_size * seq_len * cfg.grad_accum * ctx.dist.world_size
        tps = window[1] * tokens_per_step / dt
        mfu = tps * fpt / (peak * ctx.dist.world_size)
        mem = memory_mb(ctx.device)
        row.update(tokens_per_s=tps, mfu=mfu, memory_mb=mem)
        eta = (cfg.max_steps - self.step) * dt / window[1]
        ctx.log(f"{ctx.name} step {self.step}/{cfg.max_steps} | loss {row['loss']:.4f} | "
                f"lr {row['lr']:.2e} | grad {row['grad_norm']:.2f} | {tps:,.0f} tok/s | "
                f"mfu {100 * mfu:.1f}% | mem {mem:,.0f} MB | eta {eta / 60:.1f} min")

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

    def run(self) -> TrainResult:
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
        self._session_mark = time.perf_counter()  # time before this call is not training
        window = (time.perf_counter(), 0)
        self.last_eval = self.evals[-1] if self.evals else None
        if self.step >= cfg.max_steps:
            ctx.log(f"{ctx.name}: checkpoint is at step {self.step} = max_steps; nothing to train")
        while self.step < cfg.max_steps:
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
            loss, grad_norm = self.train_step(model, batches)
            self.step += 1
            window = (window[0], window[1] + 1)
            row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or last:
                self._progress(row, window, fpt, peak)
                window = (time.perf_counter(), 0)
            self.history.append(row)
            if ctx.tracker is not None and ctx.dist.is_main:
                ctx.tracker.log_metrics({f"{ctx.name}/{k}": v for k, v in row.items()
                                         if k != "step"}, step=self.step)
            if (self.step % cfg.eval_every == 0 or last) and self._eval_and_maybe_stop():
                break
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
        self._clock()
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
