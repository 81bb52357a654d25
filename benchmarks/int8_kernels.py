"""One decode-shaped product, float against int8 weights: which runtime a quantized model gets.

    python benchmarks/int8_kernels.py                           # this machine as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/int8_kernels.py --label avx2cap       # an AVX2 machine, imitated

At decode every weight is read once per token, so a product ``(M, K) @ (K, N)`` with a few
rows ``M`` is bound by the weights' bytes. Timed here, per shape (the default model's, the
27M shape's, the 0.5B shape's projections) and rows 1, 8, 32, best of 5 interleaved rounds:
``F.linear`` in float32 and in bf16 (weights and activations), and
``torch._weight_int8pack_mm`` (int8 weights, one scale per output channel) with float32 and
with bf16 activations, the latter also with the casts a float32 model around it pays (input
to bf16, output back to float32); and torch's CPU int4 kernel (groups of 64, bf16
activations, with the casts) as :class:`llmcore.model.qlinear.Int4Linear` runs it; and
``w8a8``, :class:`llmcore.model.qlinear.W8A8Linear` (the row rounded to int8, ``torch._int_mm``,
rescaled), where ``torch._int_mm`` is exact on this CPU.
:func:`llmcore.model.qlinear.int8_runtime` and :func:`~llmcore.model.qlinear.int4_kernel_threshold`
pick from what this shows. Writes ``reports/int8_kernels[-LABEL].json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.device import cpu_kind  # noqa: E402
from llmcore.model.qlinear import (  # noqa: E402
    INT4_INNER_K_TILES,
    W8A8Linear,
    int8_runtime,
    int_mm_exact,
)

# (in, out) of a decode product: the default's MLP up-projection, the 27M shape's fused q/k/v
# and MLP, the 0.5B shape's MLP up- and down-projections
SHAPES = [(128, 352), (512, 1536), (512, 1376), (1536, 4096), (4096, 1536)]


def _time(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def measure(k: int, n: int, m: int, rounds: int) -> dict[str, float]:
    """Microseconds per product, best of ``rounds`` interleaved rounds, per side."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s32 = torch.rand(n, generator=gen) / 127
    x = torch.randn(m, k, generator=gen)
    wb, xb, sb = w.bfloat16(), x.bfloat16(), s32.bfloat16()
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
    s4 = torch.rand(k // 64, n, generator=gen) / 7
    sz = torch.stack([s4, torch.zeros_like(s4)], dim=-1).bfloat16().contiguous()
    sides: dict[str, Callable[[], object]] = {
        "float32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "int8 x float32": lambda: torch._weight_int8pack_mm(x, q, s32),
        "int8 x bf16": lambda: torch._weight_int8pack_mm(xb, q, sb),
        "int8 x bf16, casts": lambda: torch._weight_int8pack_mm(x.bfloat16(), q, sb).float(),
        "int4 x bf16, casts": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), packed, 64, sz).float(),
    }
    if int_mm_exact(torch.device("cpu")):  # elsewhere its sums are wrong: not a side
        sides["w8a8"] = functools.partial(W8A8Linear(q, s32, None), x)
    reps = max(5, int(2e7 / (k * n)))  # ~ the same bytes read per timing at every shape
    for fn in sides.values():
        _time(fn, 3)  # warm-up: kernels chosen, packs made
    best = {name: float("inf") for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            best[name] = min(best[name], _time(fn, reps))
    return {name: round(us, 2) for name, us in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    rows = []
    for k, n in SHAPES:
        for m in args.rows:
            us = measure(k, n, m, args.rounds)
            rows.append({"in": k, "out": n, "rows": m, "us": us})
            print(f"{m:>3} x {k} @ {k} x {n}: " + ", ".join(f"{s} {v:,.1f}" for s, v in
                                                           us.items()) + " us", flush=True)
    mode, act = int8_runtime(torch.device("cpu"))
    result = {"machine": cpu_kind(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "runtime_auto": f"{mode}, {act}".replace("torch.", ""),
              "rounds": args.rounds, "products": rows}
    out = REPO / "reports" / f"int8_kernels{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['machine']}, {result['threads']} threads: auto runs {result['runtime_auto']}"
          f"\nwrote {out}")


if __name__ == "__main__":
    main()
