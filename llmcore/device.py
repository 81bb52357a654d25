"""Where a model runs and in what precision: device, autocast dtype, timing, peak FLOP/s.

Training, evaluation, generation and serving all pick their device and dtype here, so that
``base.device: auto`` means the same thing everywhere and no inference code has to import the
training loop to find out.

``dtype: auto`` picks bf16 autocast on GPUs that have it (fp16 on older ones) and on CPUs
with native bf16 matrix instructions (AVX-512 BF16 or AMX); elsewhere fp32, because emulated
bf16 on an AVX2-only CPU is slower than fp32. :func:`describe` names which kind of machine a
run had, for its log, since the same params run about 3x faster on the first kind.
"""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Any

import torch

from llmcore.config import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a usable device."""
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


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``base.dtype`` (float32 means no autocast)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.float16 and device.type == "cpu":
            raise UserError("base.dtype float16 is not supported on CPU (use bfloat16)")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for a run's log: the device, its kind, and the precision picked."""
    precision = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({precision})"
    if device.type != "cpu":
        return f"{device.type} ({precision})"
    flags = cpu_flags()
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "basic")
    return f"cpu with {kind}, {torch.get_num_threads()} threads ({precision})"


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated tensors on CUDA, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024,
                       trials: int = 5) -> float:
    """Achieved FLOP/s of a large matrix product at ``dtype`` (the MFU denominator).

    The best of ``trials`` timings: on a shared machine a busy moment only makes a timing
    slower, so the fastest one is nearest the machine's real peak. It still reads low when the
    machine is busy throughout, which is why a peak measured on a quiet machine can be given
    instead (``peak_flops``; ``benchmarks/peak_flops.py`` measures it).
    """
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        reps, start = 3, time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best
