"""Where a model runs and in what precision: device, autocast dtype, timing, peak FLOP/s.

Training, evaluation, generation and serving all pick their device and dtype here, so that
``base.device: auto`` means the same thing everywhere and no inference code has to import the
training loop to find out.

``dtype: auto`` picks bf16 autocast on GPUs that have it (fp16 on older ones); on a CPU with
native bf16 matrix instructions (AVX-512 BF16 or AMX) training measures which is faster at
its shape (:mod:`llmcore.train.autocast_probe`); elsewhere fp32. On a CPU without
them every bf16 product is emulated: measured ~50x slower than fp32 on an AVX2-only CPU and
4-8x slower on an AVX-512 one without the BF16 extension. So bf16 is a cliff there, also when
params ask for it: ``base.dtype: bfloat16`` then falls back to fp32 with a note in the log,
and Muon's Newton-Schulz iteration (bf16 wherever it is native, the faster choice there) runs
in fp32 too. :func:`precision` makes that decision once for a run; :meth:`Precision.describe`
names the machine kind and the dtype of each part for the run's log and metrics.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmcore.schema import UserError

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


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX) and torch
    may use them: ``ATEN_CPU_CAPABILITY=avx2`` (how the benchmarks imitate an AVX2 machine on
    a newer one) caps torch's kernels, and then bf16 is as emulated as on that machine."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and not kernels_capped()


def kernels_capped() -> bool:
    """Whether torch's CPU kernels are held below AVX-512 (``ATEN_CPU_CAPABILITY``)."""
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX", "AVX2")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native (not emulated) on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False  # mps and others: not assumed


def cpu_kind() -> str:
    """The vector extension that decides this CPU's speed per dtype, as a short name."""
    flags = cpu_flags()
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "basic")
    if kernels_capped() and kind not in ("AVX2", "basic"):
        return f"AVX2 (torch's kernels capped on an {kind} CPU)"
    return kind


@dataclass(frozen=True)
class Precision:
    """The dtype each part of a run computes in, decided once from the hardware and params.

    ``autocast``: training's forward and backward, and held-out losses (during training and in
    the evaluate stage; float32 means no autocast). ``orthogonalize``: Muon's Newton-Schulz
    iteration. Weights, optimizer state, gradients, the registry's ranking bpb, generation and
    serving stay in float32 (quantized models store int8/int4; their large layers run int8
    products, or torch's weight-only int8 kernel with bf16 activations, where
    :func:`llmcore.model.qlinear.int8_runtime` finds them).
    """

    device: torch.device
    autocast: torch.dtype
    orthogonalize: torch.dtype
    native_bf16: bool
    note: str = ""  # why a dtype params asked for was not used

    def describe(self) -> str:
        """One line for a run's log: the machine, its kind, the dtype of each part."""
        d = self.device
        if d.type == "cuda":
            where = torch.cuda.get_device_name(d)
        elif d.type == "cpu":
            where = f"cpu with {cpu_kind()}, {torch.get_num_threads()} threads"
        else:
            where = d.type
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        text = (f"{where}, {bf16}: training and held-out losses in {_name(self.autocast)}, "
                f"Muon orthogonalisation in {_name(self.orthogonalize)}, generation and "
                "serving in float32")
        return text + (f" ({self.note})" if self.note else "")

    def metrics(self, prefix: str) -> dict[str, str | int]:
        """Flat metrics that keep which kind a figure came from."""
        return {f"{prefix}/native_bf16": int(self.native_bf16),
                f"{prefix}/autocast_dtype": _name(self.autocast),
                f"{prefix}/muon_dtype": _name(self.orthogonalize)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision(name: str, device: torch.device) -> Precision:
    """What ``base.dtype`` (auto | float32 | bfloat16 | float16) means on ``device``.

    ``auto`` here is bf16 on a GPU that has it (fp16 on older ones) and float32 on a CPU;
    training resolves ``auto`` on a CPU with native bf16 further, by measuring both at the
    model's shape (:mod:`llmcore.train.autocast_probe`): whether bf16 pays there depends on
    the chip and the shape, not on a flag. Where bf16 is emulated it is many times slower, and
    ``bfloat16`` asked falls back to float32 with a note; asked where native, it is honoured.
    """
    native = native_bf16(device)
    fast = torch.bfloat16 if native and device.type == "cuda" else torch.float32
    if name == "auto":  # GPUs without bf16 get fp16 (with a gradient scaler in the loop)
        gpu = (torch.bfloat16 if native else torch.float16) if device.type == "cuda" else fast
        return Precision(device, gpu, fast, native)
    if name not in DTYPES:
        raise UserError(f"base.dtype must be one of auto, {', '.join(DTYPES)} (got {name!r})")
    dtype, note = DTYPES[name], ""
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("base.dtype float16 is not supported on CPU (use auto or bfloat16)")
    if dtype == torch.bfloat16 and not native:
        dtype = torch.float32
        kind = cpu_kind() if device.type == "cpu" else device.type
        note = (f"base.dtype bfloat16 asked, float32 used: this {kind} device emulates bf16, "
                "many times slower than float32")
    elif dtype == torch.bfloat16:
        fast = torch.bfloat16  # asked for, and native: Muon too
    return Precision(device, dtype, fast, native, note)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``base.dtype`` (float32 means no autocast)."""
    return precision(name, device).autocast


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for a log: the device, its kind, and the precision of a run."""
    return replace(precision("auto", device), autocast=dtype).describe()


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[None]:
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
