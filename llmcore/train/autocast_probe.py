"""``base.dtype: auto`` on a CPU with native bf16: measured, not read from the CPU's flags.

Whether bf16 autocast trains faster than float32 on a CPU depends on the chip, the torch build
and the shape, not on a flag: on one 2-core AVX-512 BF16 machine bf16 trained 1.6-1.8x slower
than float32 at every shape from 4x128 to 8x768 (casts and non-matmul work cost more than the
faster products saved); on another (AMD EPYC, AVX-512 BF16, torch 2.13) the default 4x128
model's bare step ran 1.2-1.3x faster in bf16 (the whole loop, with its data, masks and
reply-only head, gained less: about 5% in pretraining, 10% in SFT). So where bf16 is native (AVX-512 BF16 or AMX; where it
is emulated it is many times slower and never tried), the first run of a model shape on a
machine times a few training steps of a throwaway model of that shape and batch in each dtype,
interleaved, and keeps bf16 only if it is at least :data:`MARGIN` times faster.

The verdict is written to ``autocast.json`` in the cache folder (``$LLMCORE_CACHE_DIR``, else
``$XDG_CACHE_HOME/llmcore``, else ``~/.cache/llmcore``), keyed by the CPU's name, torch's
version, the thread count, the model's shape, the batch and the optimizer: every later run of
that shape on that machine reuses it, so a noisy moment cannot flip a run's precision between a run and
its resume (the checkpoint fingerprint holds the dtype). Delete the file to measure again.
``LLMCORE_AUTO_DTYPE=float32`` (or ``bfloat16``) pins what ``auto`` means on a CPU without
measuring, e.g. to compare machines at one precision; the test suite pins float32.

Distributed CPU runs keep float32 under ``auto``: every rank must agree, and one rank's timing
is not every rank's. Generation and serving stay in float32 whatever the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TypeGuard

import torch
import torch.nn.functional as F

from llmcore.config.model import ModelConfig
from llmcore.config.train import OptimConfig
from llmcore.device import Precision, autocast, cpu_kind, precision
from llmcore.model.transformer import Transformer
from llmcore.schema import UserError
from llmcore.train.optim import Optimizers, make_optimizer

MARGIN = 1.1  # bf16 must be this much faster: a tie is not worth its rounding
PIN_ENV = "LLMCORE_AUTO_DTYPE"
CACHE_ENV = "LLMCORE_CACHE_DIR"
CACHE_FILE = "autocast.json"


def cache_path() -> Path:
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        xdg = os.environ.get("XDG_CACHE_HOME")
        folder = str(Path(xdg) / "llmcore") if xdg else str(Path.home() / ".cache" / "llmcore")
    return Path(folder) / CACHE_FILE


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu_kind()


def machine_key(model: ModelConfig, optim: OptimConfig, batch_size: int, seq_len: int) -> str:
    """What the verdict depends on: machine, torch, threads, the model's shape, the batch
    (bf16 measured 1.08x float32's speed at 8 rows of the default model and 1.2x at 16 on one
    machine: its products gain with size, its casts do not), the optimizer."""
    shape = (f"{model.n_layers}x{model.d_model} heads {model.n_heads}/{model.n_kv_heads} "
             f"ff {model.d_ff} vocab {model.vocab_size} {model.mlp} {model.norm} "
             f"{model.positions}")
    return (f"{cpu_name()} ({cpu_kind()}) | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | {shape} | {batch_size} x {seq_len} | "
            f"{optim.optimizer}")


def step_seconds(model_cfg: ModelConfig, optim: OptimConfig, batch_size: int, seq_len: int,
                 rounds: int = 3) -> dict[str, float]:
    """Seconds per training step (forward, backward, clipping, optimizer) of a random model of
    this shape in float32 and in bf16 autocast (Muon's iteration in the same dtype), the best
    of ``rounds`` interleaved steps each after one warm-up; the global RNG is left untouched."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1), generator=gen)
    sides: dict[str, tuple[Transformer, Optimizers]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = Transformer(dataclasses.replace(model_cfg, dropout=0.0))
            sides[name] = (model, make_optimizer(model, optim, dtype))
    device = torch.device("cpu")

    def step(name: str) -> float:
        model, opt = sides[name]
        dtype = torch.bfloat16 if name == "bfloat16" else torch.float32
        start = time.perf_counter()
        with autocast(device, dtype):
            logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    best = {name: float("inf") for name in sides}
    for name in sides:
        step(name)  # warm-up: first calls allocate and pick kernels
    for _ in range(rounds):
        for name in sides:  # interleaved: a busy moment slows both, not one
            best[name] = min(best[name], step(name))
    return best


def auto_precision(name: str, device: torch.device, model_cfg: ModelConfig,
                   optim: OptimConfig, batch_size: int, seq_len: int, *,
                   distributed: bool = False) -> Precision:
    """``precision(name, device)``, with ``auto`` on a CPU with native bf16 resolved by
    measurement (see the module docstring); the note says what was measured or reused."""
    prec = precision(name, device)
    if name != "auto" or device.type != "cpu" or not prec.native_bf16:
        return prec
    pinned = os.environ.get(PIN_ENV, "")
    if pinned:
        if pinned not in ("float32", "bfloat16"):
            raise UserError(f"{PIN_ENV} must be float32 or bfloat16 (got {pinned!r})")
        return _resolved(prec, pinned, f"auto pinned to {pinned} by {PIN_ENV}")
    if distributed:
        return dataclasses.replace(prec, note="auto: float32 on a distributed CPU run")
    key, path = machine_key(model_cfg, optim, batch_size, seq_len), cache_path()
    cache = _read(path)
    verdict = cache.get(key)
    if not _valid(verdict):  # absent, or an entry edited by hand into something else
        secs = step_seconds(model_cfg, optim, batch_size, seq_len)
        speedup = secs["float32"] / secs["bfloat16"]
        verdict = {"choice": "bfloat16" if speedup >= MARGIN else "float32",
                   "speedup": round(speedup, 3),
                   "float32_s": round(secs["float32"], 5),
                   "bfloat16_s": round(secs["bfloat16"], 5),
                   "batch": [batch_size, seq_len],
                   "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        cache[key] = verdict
        _write(path, cache)
        how = "measured now"
    else:
        how = "measured before"
    # no path in the note: it goes into metrics and the README, which name no machine's paths
    note = (f"auto: bf16 autocast {verdict['speedup']:.2f}x float32's training speed at this "
            f"shape and batch on this machine ({how}, cached), so {verdict['choice']}")
    return _resolved(prec, str(verdict["choice"]), note)


def _valid(verdict: object) -> TypeGuard[dict[str, object]]:
    """A cache entry this code wrote: a choice it knows and a measured ratio."""
    return (isinstance(verdict, dict) and verdict.get("choice") in ("float32", "bfloat16")
            and isinstance(verdict.get("speedup"), (int, float)))


def _resolved(prec: Precision, choice: str, note: str) -> Precision:
    dtype = torch.bfloat16 if choice == "bfloat16" else torch.float32
    return dataclasses.replace(prec, autocast=dtype, orthogonalize=dtype, note=note)


def _read(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again (the file is a cache, nothing more)
    return data if isinstance(data, dict) else {}


def _write(path: Path, cache: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only home: the verdict holds for this run only
