"""Training throughput per model preset and dtype: tokens/s, MFU and peak memory, as JSON.

Each measurement is a full optimizer step (forward, backward, clip, AdamW) of the real
training loop on random tokens, after warm-up steps; MFU divides model FLOPs/s by the
achieved FLOP/s of a large matrix product at the same dtype on the same device (or by
``--peak-flops``). Peak memory is the process's max RSS on CPU (so it only grows across
measurements: run one preset per process for clean memory numbers) and
``max_memory_allocated`` on CUDA.

    python benchmarks/train_throughput.py --presets tiny cpu-small gpt2-mini \\
        --dtypes float32 bfloat16 --batch-size 16 --seq-len 256 --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from llmcore.config import TrainConfig, parse_section
from llmcore.device import measure_peak_flops, memory_mb, pick_device, sync
from llmcore.model import Transformer, count_parameters, flops_per_token
from llmcore.shards import Batch
from llmcore.trainer import RunContext, Trainer


class _RandomLoader:
    """Stands in for a ShardLoader: random token rows, full loss mask."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int) -> None:
        self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
        self.ds = type("DS", (), {"row_len": seq_len + 1})()

    def next_batch(self) -> Batch:
        rows = torch.randint(0, self.vocab, (self.batch_size, self.seq_len + 1))
        return Batch(rows[:, :-1], rows[:, 1:], torch.ones(self.batch_size, self.seq_len))


def measure(preset: str, dtype_name: str, args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[dtype_name]
    cfg = parse_section("model", {"preset": preset, "vocab_size": args.vocab_size})
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if args.compile:
        model = torch.compile(model)
    loader = _RandomLoader(args.batch_size, args.seq_len, cfg.vocab_size)
    train_cfg = TrainConfig(max_steps=10**9, batch_size=args.batch_size, warmup_steps=0,
                            peak_flops=1.0)
    ctx = RunContext(device, dtype, torch.ones(cfg.vocab_size), log=lambda m: None)
    trainer = Trainer(model, train_cfg, loader, None, ctx)  # type: ignore[arg-type]
    for _ in range(args.warmup):
        trainer.train_step(model, [loader.next_batch()])
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(model, [loader.next_batch()])
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    tps = args.batch_size * args.seq_len / seconds
    peak = args.peak_flops or measure_peak_flops(device, dtype)
    return {
        "preset": preset, "dtype": dtype_name, "device": str(device),
        "params": count_parameters(cfg), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "seconds_per_step": round(seconds, 4), "tokens_per_s": round(tps, 1),
        "model_tflops": round(tps * flops_per_token(cfg, args.seq_len) / 1e12, 4),
        "peak_tflops": round(peak / 1e12, 3),
        "mfu": round(tps * flops_per_token(cfg, args.seq_len) / peak, 4),
        "peak_memory_mb": round(memory_mb(device), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "cpu-small", "gpt2-mini"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=6400)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    results = []
    for preset in args.presets:
        for dtype in args.dtypes:
            results.append(measure(preset, dtype, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
               "results": results}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
