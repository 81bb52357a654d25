"""One training loop for pretraining and SFT.

A batch is ``(input_ids, targets, loss_mask)``; the loss is the mean cross-entropy over the
tokens where ``loss_mask`` is 1, taken over the whole optimizer step: the token count of all
micro-batches (and, under DDP, of all ranks) is summed first, so gradient accumulation and
DDP give the same gradient as one big batch even when SFT masks differ between rows.

AdamW with two parameter groups (weight decay on matrices only: no decay on norms, biases and
embeddings), linear warmup then cosine (or warmup-stable-decay, or constant) to ``min_lr``,
global gradient-norm clipping, bf16 autocast where the hardware has it, fp16 with a gradient
scaler where only that exists, fp32 otherwise; optional ``torch.compile``.

Every ``eval_every`` steps: validation loss and bits per byte on the first ``eval_batches``
batches of the held-out rows (the same rows every time); the best weights are kept; optional
early stopping. Checkpoints every ``checkpoint_every`` steps hold everything needed to resume
bit-exactly (see ``llmcore.checkpoint``). A non-finite loss or gradient stops the run before
the optimizer touches the weights, with the last good checkpoint kept.

Trade-off: evaluation and checkpointing run on rank 0 while the other ranks wait at a barrier;
simple and deterministic, but idle time on big clusters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmcore.checkpoint import CheckpointManager, Loaded, load_weights, set_rng_state
from llmcore.config import TrainConfig, UserError
from llmcore.model import flops_per_token
from llmcore.shards import Batch, ShardDataset, ShardLoader

LN2 = math.log(2.0)


class NonFiniteLoss(UserError):
    """Training diverged."""


# --------------------------------------------------------------------------------------------
# Devices, precision, optimizer, schedule
# --------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"base.device is {name!r} but no CUDA device is available "
                        "(use auto or cpu)")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 = no autocast)."""
    if name != "auto":
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[name]
        if dtype == torch.float16 and device.type == "cpu":
            raise UserError("base.dtype float16 is not supported on CPU (use bfloat16)")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the matrices of Linear layers; not norms, biases or embeddings."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
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
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(frac, 1.0)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Achieved FLOP/s of a large matrix product at ``dtype`` (the MFU denominator)."""
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    sync(device)
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------------------------


def loss_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of masked token losses (nats) and the number of masked tokens."""
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                             reduction="none")  # (B*T,)
    m = mask.reshape(-1).to(losses.dtype)
    return (losses * m).sum(), m.sum()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ShardDataset, batch_size: int, max_batches: int,
             token_bytes: torch.Tensor, device: torch.device, dtype: torch.dtype,
             seq_len: int | None = None) -> dict[str, float]:
    """Mean loss (nats/token) and bits per byte over the first rows of ``dataset``.

    Bits per byte counts only targets that stand for text (special tokens have 0 bytes and
    are left out of both sums), so it compares models with different tokenizers. With
    ``seq_len`` the rows are re-cut into windows of that length (rows are concatenated), which
    is how longer-context evaluation is done on the same data.
    """
    was_training = model.training
    model.eval()
    rows = dataset.gather(range(min(len(dataset), batch_size * max_batches)))
    ids = torch.from_numpy(rows[0].astype("int64"))
    mask = (torch.ones_like(ids) if rows[1] is None
            else torch.from_numpy(rows[1].astype("int64")))
    if seq_len is not None:
        # rows overlap by one token: drop it and re-cut the stream
        stream = torch.cat([ids[0], ids[1:, 1:].reshape(-1)])
        mstream = torch.cat([mask[0], mask[1:, 1:].reshape(-1)])
        n = (len(stream) - 1) // seq_len
        idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None]
        ids, mask = stream[idx], mstream[idx]
    tb = token_bytes.to(device)
    total_loss = total_tokens = total_bits_loss = total_bytes = 0.0
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size].to(device)
        m = mask[start : start + batch_size, 1:].to(device)
        with autocast(device, dtype):
            logits = model(x[:, :-1])
        targets = x[:, 1:]
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                 targets.reshape(-1), reduction="none").view_as(targets)
        nbytes = tb[targets] * m
        total_loss += float((losses * m).sum())
        total_tokens += float(m.sum())
        total_bits_loss += float((losses * (nbytes > 0)).sum())
        total_bytes += float(nbytes.sum())
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1.0)
    bpb = total_bits_loss / LN2 / max(total_bytes, 1.0)
    return {"loss": loss, "bpb": bpb, "tokens": total_tokens, "bytes": total_bytes}


def unigram_bpb(train: ShardDataset, val: ShardDataset, token_bytes: torch.Tensor,
                vocab_size: int, max_rows: int = 100_000) -> float:
    """Bits per byte of a unigram model (add-one token frequencies of train) on val rows."""
    def counts(ds: ShardDataset) -> torch.Tensor:
        ids, mask = ds.gather(range(min(len(ds), max_rows)))
        t = torch.from_numpy(ids[:, 1:].astype("int64")).reshape(-1)
        w = (torch.ones_like(t) if mask is None
             else torch.from_numpy(mask[:, 1:].astype("int64")).reshape(-1))
        return torch.bincount(t, weights=w.double(), minlength=vocab_size)

    c_train = counts(train) + 1.0
    logp = torch.log(c_train / c_train.sum())
    c_val = counts(val)
    text = token_bytes.double() > 0
    bits = -(c_val * logp * text).sum() / LN2
    nbytes = (c_val * token_bytes.double()).sum()
    return float(bits / nbytes)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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


@dataclass
class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``model`` on ``loader``."""

    model: torch.nn.Module
    cfg: TrainConfig
    loader: ShardLoader
    val: ShardDataset | None
    token_bytes: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    checkpoints: CheckpointManager | None = None
    tracker: Any = None
    dist: Dist = field(default_factory=Dist)
    log: Callable[[str], None] = print
    prefix: str = "train"
    seq_len: int = 0

    def __post_init__(self) -> None:
        self.raw_model = self.model
        self.optimizer = make_optimizer(self.raw_model, self.cfg)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.dtype == torch.float16)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.evals_without_improvement = 0
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self.train_seconds = 0.0  # across every session of this run (restored on resume)
        self._session_mark = time.perf_counter()
        self.params_hash_ok = True
        if self.seq_len == 0:
            self.seq_len = self.loader.ds.row_len - 1

    # -- state ---------------------------------------------------------------------------------

    def restore(self, loaded: Loaded) -> None:
        load_weights(self.raw_model, loaded.model)
        self.optimizer.load_state_dict(loaded.optimizer)
        self.loader.load_state_dict(loaded.state["loader"])
        self.step = loaded.step
        self.best = loaded.state.get("best")
        self.evals_without_improvement = int(loaded.state.get("evals_without_improvement", 0))
        self.history = list(loaded.state.get("history", []))
        self.evals = list(loaded.state.get("evals", []))
        self.train_seconds = float(loaded.state.get("train_seconds", 0.0))
        if loaded.state.get("scaler"):
            self.scaler.load_state_dict(loaded.state["scaler"])
        set_rng_state(loaded.rng)
        self.resumed_from = loaded.step

    def save_checkpoint(self) -> None:
        if self.checkpoints is None:
            return
        if self.dist.is_main:
            self.train_seconds += time.perf_counter() - self._session_mark
            self._session_mark = time.perf_counter()
            state = {"loader": self.loader.state_dict(), "best": self.best,
                     "train_seconds": self.train_seconds,
                     "evals_without_improvement": self.evals_without_improvement,
                     "history": self.history, "evals": self.evals,
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
            self.checkpoints.save(self.step, self.raw_model, self.optimizer, state)
        self.dist.barrier()

    # -- loop ----------------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        model = self.raw_model
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        return model

    def train_step(self, model: torch.nn.Module, batches: list[Batch]) -> tuple[float, float]:
        """One optimizer step over ``batches``; returns (mean loss, grad norm)."""
        local_tokens = sum(float(b.loss_mask.sum()) for b in batches)
        (global_tokens,) = self.dist.all_sum([local_tokens], self.device)
        if global_tokens == 0:
            raise UserError("a training step has no target tokens (loss_mask is all zero)")
        loss_total = 0.0
        for i, b in enumerate(batches):
            sync_ctx = (model.no_sync() if self.dist.enabled and i < len(batches) - 1
                        else contextlib.nullcontext())
            with sync_ctx:
                x, y = b.input_ids.to(self.device), b.targets.to(self.device)
                m = b.loss_mask.to(self.device)
                with autocast(self.device, self.dtype):
                    logits = model(x)
                loss_sum, _ = loss_sums(logits, y, m)
                # DDP averages gradients over ranks: scale so the result is the global mean
                loss = loss_sum * (self.dist.world_size / global_tokens)
                self.scaler.scale(loss).backward()
                loss_total += float(loss_sum.detach())
        (loss_global,) = self.dist.all_sum([loss_total], self.device)
        mean_loss = loss_global / global_tokens
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip))
        if not math.isfinite(mean_loss) or (not math.isfinite(grad_norm)
                                            and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            last = self.checkpoints.steps()[-1] if self.checkpoints and \
                self.checkpoints.steps() else None
            raise NonFiniteLoss(
                f"{self.prefix}: loss became {mean_loss} (grad norm {grad_norm}) at step "
                f"{self.step + 1}; the weights were not updated. Last good checkpoint: "
                f"{last or 'none'}. Lower {self.prefix}.lr, raise {self.prefix}.warmup_steps or "
                f"keep {self.prefix}.grad_clip > 0."
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm

    def run_eval(self) -> dict[str, float] | None:
        result = None
        if self.dist.is_main and self.val is not None:
            ev = evaluate(self.raw_model, self.val, self.loader.batch_size, self.cfg.eval_batches,
                          self.token_bytes, self.device, self.dtype)
            result = {"step": self.step, "val_loss": ev["loss"], "val_bpb": ev["bpb"]}
            self.evals.append(result)
            improved = self.best is None or ev["loss"] < self.best["val_loss"]
            if improved:
                self.best = dict(result)
                self.evals_without_improvement = 0
                if self.checkpoints is not None:
                    self.checkpoints.save_best(self.raw_model, self.best)
            else:
                self.evals_without_improvement += 1
            self.log(f"{self.prefix} step {self.step}: val loss {ev['loss']:.4f}, "
                     f"val bpb {ev['bpb']:.4f}{' (best)' if improved else ''}")
            if self.tracker is not None:
                self.tracker.log_metrics({f"{self.prefix}/val_loss": ev["loss"],
                                          f"{self.prefix}/val_bpb": ev["bpb"]}, step=self.step)
        self.dist.barrier()
        return result

    def run(self) -> TrainResult:
        cfg = self.cfg
        model = self._wrap()
        model.train()
        fpt = flops_per_token(self.raw_model.cfg, self.seq_len)
        peak = cfg.peak_flops or measure_peak_flops(self.device, self.dtype)
        tokens_per_step = (self.loader.batch_size * self.seq_len * cfg.grad_accum
                           * self.dist.world_size)
        self._session_mark = time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        stopped_early = False
        last_eval = self.evals[-1] if self.evals else None
        if self.step >= cfg.max_steps:
            self.log(f"{self.prefix}: checkpoint is at step {self.step} = max_steps; "
                     "nothing to train")
        while self.step < cfg.max_steps:
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
            loss, grad_norm = self.train_step(model, batches)
            self.step += 1
            window_steps += 1
            row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                sync(self.device)
                dt = time.perf_counter() - window_start
                tps = window_steps * tokens_per_step / dt
                mfu = tps * fpt / (peak * self.dist.world_size)
                mem = memory_mb(self.device)
                row.update(tokens_per_s=tps, mfu=mfu, memory_mb=mem)
                eta = (cfg.max_steps - self.step) * dt / window_steps
                self.log(f"{self.prefix} step {self.step}/{cfg.max_steps} | loss {loss:.4f} | "
                         f"lr {lr:.2e} | grad {grad_norm:.2f} | {tps:,.0f} tok/s | "
                         f"mfu {100 * mfu:.1f}% | mem {mem:,.0f} MB | eta {eta / 60:.1f} min")
                window_start, window_steps = time.perf_counter(), 0
            self.history.append(row)
            if self.tracker is not None and self.dist.is_main:
                self.tracker.log_metrics({f"{self.prefix}/{k}": v for k, v in row.items()
                                          if k != "step"}, step=self.step)
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                last_eval = self.run_eval() or last_eval
                patience = cfg.early_stopping_patience
                stop = patience is not None and self.evals_without_improvement >= patience
                if self.dist.broadcast_flag(stop, self.device) and self.step < cfg.max_steps:
                    self.log(f"{self.prefix}: no improvement in {patience} evaluations; "
                             f"stopping early at step {self.step}")
                    stopped_early = True
                    self.save_checkpoint()
                    break
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        self.train_seconds += time.perf_counter() - self._session_mark
        self._session_mark = time.perf_counter()
        # throughput over every logged window of the run, sessions before a resume included
        tps_all = [r["tokens_per_s"] for r in self.history if r.get("tokens_per_s")]
        mfu_all = [r["mfu"] for r in self.history if r.get("mfu")]
        mem_all = [r["memory_mb"] for r in self.history if r.get("memory_mb")]
        return TrainResult(
            step=self.step, best=self.best, last_eval=last_eval, history=self.history,
            evals=self.evals,
            tokens_per_second=sum(tps_all) / len(tps_all) if tps_all else 0.0,
            mfu=sum(mfu_all) / len(mfu_all) if mfu_all else None,
            seconds=self.train_seconds, stopped_early=stopped_early,
            resumed_from=self.resumed_from,
            peak_memory_mb=max(mem_all + [memory_mb(self.device)]),
        )


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------

# TrainConfig fields that do not change what a run computes (left out of its fingerprint)
NON_SHAPING = ("log_every", "checkpoint_every", "keep_checkpoints", "resume", "compile",
               "threads", "peak_flops", "nproc_per_node")


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (if any)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def run_fingerprint(model_cfg: Any, train_cfg: TrainConfig, extra: dict[str, Any]) -> str:
    """What shapes a run: model and loop params, seed, precision, data and code hashes."""
    import hashlib

    from llmcore.checkpoint import fingerprint

    code = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("model.py", "train.py"):
        code.update((here / name).read_bytes())
    loop = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in NON_SHAPING}
    return fingerprint({"model": dataclasses.asdict(model_cfg), "train": loop,
                        "code": code.hexdigest(), **extra})


@dataclass
class FitOutput:
    result: TrainResult
    model: torch.nn.Module
    export_weights: dict[str, torch.Tensor]
    export_step: int
    fingerprint: str
    params: int
    unigram_bpb: float | None


def fit(*, model_cfg: Any, cfg: TrainConfig, seed: int, device_name: str, dtype_name: str,
        shard_dir: Any, train_split: str, val_split: str | None, token_bytes: Sequence[int],
        checkpoint_root: Any, data_fingerprint: dict[str, Any],
        init_weights: dict[str, torch.Tensor] | None = None, tracker: Any = None,
        log: Callable[[str], None] = print, prefix: str = "train") -> FitOutput:
    """Build the model and data, resume if possible, train, and pick the weights to export."""
    from llmcore.checkpoint import state_dict_for_save
    from llmcore.model import Transformer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(device_name)
    dist_info, device = init_distributed(device)
    dtype = pick_dtype(dtype_name, device)
    train_ds = ShardDataset(shard_dir, train_split)
    val_ds = ShardDataset(shard_dir, val_split) if val_split else None
    if train_ds.row_len - 1 > model_cfg.max_seq_len:
        raise UserError(f"rows have {train_ds.row_len - 1} tokens but model.max_seq_len is "
                        f"{model_cfg.max_seq_len}: raise model.max_seq_len or lower pack.seq_len")
    fp = run_fingerprint(model_cfg, cfg, {"seed": seed, "dtype": str(dtype),
                                          "device": device.type,
                                          "world_size": dist_info.world_size,
                                          "data": data_fingerprint})
    torch.manual_seed(seed + dist_info.rank)
    model = Transformer(model_cfg)
    if init_weights is not None:
        load_weights(model, init_weights)
    model.to(device)
    loader = ShardLoader(train_ds, cfg.batch_size, seed=seed, rank=dist_info.rank,
                         world_size=dist_info.world_size)
    if cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * loader.steps_per_epoch / cfg.grad_accum))
        if cfg.warmup_steps >= steps:
            raise UserError(f"{prefix}.warmup_steps ({cfg.warmup_steps}) must be < the "
                            f"{steps} steps that {prefix}.epochs = {cfg.epochs} gives")
        cfg = dataclasses.replace(cfg, max_steps=steps)
        log(f"{prefix}: {cfg.epochs} epochs of {len(train_ds)} rows = {steps} steps")
    manager = CheckpointManager(checkpoint_root, fp, keep=cfg.keep_checkpoints, log=log)
    tb = torch.tensor(list(token_bytes), dtype=torch.int64)
    trainer = Trainer(model, cfg, loader, val_ds, tb, device, dtype, manager, tracker,
                      dist_info, log, prefix)
    if cfg.resume == "never":
        if dist_info.is_main:
            for old in manager.steps():
                import shutil

                shutil.rmtree(old, ignore_errors=True)
        dist_info.barrier()
    else:
        loaded = manager.load_latest()
        if loaded is not None:
            log(f"{prefix}: resuming from {loaded.path} (step {loaded.step})")
            trainer.restore(loaded)
            model.to(device)
        else:
            others = manager.other_configurations()
            if cfg.resume == "must":
                raise UserError(
                    f"{prefix}.resume is must but {manager.dir} has no usable checkpoint"
                    + (f" (checkpoints of {len(others)} other configuration(s) exist: the "
                       "params, data or code changed since)" if others else ""))
            if others:
                log(f"{prefix}: the checkpoints in {checkpoint_root} were made with other "
                    "params, data or code and cannot be resumed exactly; starting fresh "
                    f"(they stay in {[o.name for o in others]})")
    ug = None
    if val_ds is not None and dist_info.is_main:
        ug = unigram_bpb(train_ds, val_ds, tb, model_cfg.vocab_size)
    result = trainer.run()
    export_weights, export_step = state_dict_for_save(model), result.step
    if cfg.export == "best" and dist_info.is_main:
        best = manager.load_best()
        if best is not None:
            export_weights, export_step = best[0], int(best[1]["step"])
    if dist_info.enabled:
        dist.barrier()
    return FitOutput(result, model, export_weights, export_step, fp,
                     model.num_parameters(), ug)
