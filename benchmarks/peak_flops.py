"""The MFU denominator of this machine: the best matmul FLOP/s at each dtype, to store.

    python benchmarks/peak_flops.py [--trials 20] [--size 1024]

Training divides model FLOP/s by a peak. Without ``pretrain.peak_flops`` / ``sft.peak_flops``
the trainer measures one at start (best of a few products), which a busy shared machine
under-estimates, so MFU reads too high. Run this on a quiet machine, then put the printed
value into params.yaml: the figures then use a fixed, stated peak (``<stage>/peak_source`` in
the metrics says which one a run used). Writes reports/peak_flops.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.device import measure_peak_flops, native_bf16, pick_device, precision  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    # bf16 is measured also where it is emulated, to show the cliff training avoids there
    result = {"machine": precision("auto", device).describe(), "size": args.size,
              "trials": args.trials, "bfloat16_native": native_bf16(device)}
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        runs = sorted(measure_peak_flops(device, dtype, args.size, trials=1)
                      for _ in range(args.trials))
        result[name] = {"best": runs[-1], "median": runs[len(runs) // 2], "worst": runs[0]}
        print(f"{name}: best {runs[-1] / 1e9:.1f} GFLOP/s (median {runs[len(runs) // 2] / 1e9:.1f},"
              f" worst {runs[0] / 1e9:.1f}); params.yaml: peak_flops: {runs[-1]:.4g}")
    (REPO / "reports").mkdir(exist_ok=True)
    (REPO / "reports" / "peak_flops.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
