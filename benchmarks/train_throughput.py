"""Training throughput per preset, dtype and optimizer: tokens/s, step time, MFU, memory.

Each measurement is a full optimizer step (forward, backward, clip, optimizer) of the real
training loop on random tokens, after warm-up steps. The configurations are timed in
interleaved rounds (A B C, A B C, ...) and each reports its median round, so a busy moment of
this shared machine slows every configuration alike instead of one. MFU divides model FLOPs/s
by the achieved FLOP/s of a large matrix product at the same dtype on the same device (or by
``--peak-flops``).

Optimizers: ``adamw``, ``muon`` (llmcore's Muon, Newton-Schulz in the dtype
:func:`llmcore.device.precision` picks: bf16 only where it is native) and ``torch-muon``
(``torch.optim.Muon`` as shipped, which always iterates in bf16: the cliff on CPUs that
emulate bf16, kept here to measure it). ``--dtypes auto`` is what ``base.dtype: auto`` gives;
an explicit ``bfloat16`` goes through the same decision and falls back to float32 where bf16
is emulated (the result's ``dtype`` says what ran).

    python benchmarks/train_throughput.py --presets cpu-small --optimizers adamw muon torch-muon

Writes ``reports/train_throughput.json``. Peak memory is the process's max RSS on CPU (it only
grows across configurations) and ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.config.model import parse_model  # noqa: E402
from llmcore.config.train import TrainConfig  # noqa: E402
from llmcore.data.shards import Batch  # noqa: E402
from llmcore.device import measure_peak_flops, memory_mb, pick_device, precision, sync  # noqa: E402
from llmcore.model.transformer import Transformer, count_parameters, flops_per_token  # noqa: E402
from llmcore.train.loop import RunContext, Trainer  # noqa: E402
from llmcore.train.muon import Muon  # noqa: E402


class _RandomLoader:
    """Stands in for a ShardLoader: random token rows, full loss mask."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int) -> None:
        self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
        self.ds = type("DS", (), {"row_len": seq_len + 1})()

    def next_batch(self) -> Batch:
        rows = torch.randint(0, self.vocab, (self.batch_size, self.seq_len + 1))
        return Batch(rows[:, :-1], rows[:, 1:], torch.ones(self.batch_size, self.seq_len))


class Config:
    """One (preset, dtype, optimizer): its model, trainer and timed rounds."""

    def __init__(self, preset: str, dtype_name: str, optimizer: str,
                 args: argparse.Namespace) -> None:
        self.preset, self.optimizer, self.args = preset, optimizer, args
        self.device = pick_device(args.device)
        self.prec = precision(dtype_name, self.device)
        self.cfg = parse_model({"preset": preset, "vocab_size": args.vocab_size})
        torch.manual_seed(0)
        self.model = Transformer(self.cfg).to(self.device)
        module = torch.compile(self.model) if args.compile else self.model
        self.loader = _RandomLoader(args.batch_size, args.seq_len, self.cfg.vocab_size)
        train_cfg = TrainConfig(max_steps=10**9, batch_size=args.batch_size, warmup_steps=0,
                                peak_flops=1.0,
                                optimizer="adamw" if optimizer == "adamw" else "muon")
        ctx = RunContext(self.device, self.prec.autocast, torch.ones(self.cfg.vocab_size),
                         log=lambda m: None, muon_dtype=self.prec.orthogonalize)
        self.trainer = Trainer(self.model, train_cfg, self.loader, None, ctx)  # type: ignore[arg-type]
        if optimizer == "torch-muon":  # the same groups, torch's bf16 iteration
            opts = self.trainer.optimizer.optimizers
            ours = next(o for o in opts if isinstance(o, Muon))
            g = ours.param_groups[0]
            opts[opts.index(ours)] = torch.optim.Muon(
                g["params"], lr=g["lr"], weight_decay=g["weight_decay"],
                momentum=g["momentum"], adjust_lr_fn="match_rms_adamw")
        self.module, self.rounds = module, []

    @property
    def name(self) -> str:
        return f"{self.preset}/{self.dtype}/{self.optimizer}"

    @property
    def dtype(self) -> str:
        return str(self.prec.autocast).removeprefix("torch.")

    def steps(self, n: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            self.trainer.train_step(self.module, [self.loader.next_batch()])
        sync(self.device)
        return (time.perf_counter() - start) / n

    def result(self) -> dict:
        a = self.args
        seconds = statistics.median(self.rounds)
        tps = a.batch_size * a.seq_len / seconds
        peak = a.peak_flops or measure_peak_flops(self.device, self.prec.autocast)
        fpt = flops_per_token(self.cfg, a.seq_len)
        return {
            "preset": self.preset, "dtype": self.dtype, "optimizer": self.optimizer,
            "muon_dtype": ("bfloat16" if self.optimizer == "torch-muon" else
                           str(self.prec.orthogonalize).removeprefix("torch.")
                           if self.optimizer == "muon" else None),
            "device": str(self.device), "params": count_parameters(self.cfg),
            "batch_size": a.batch_size, "seq_len": a.seq_len,
            "seconds_per_step": round(seconds, 4),
            "seconds_per_step_rounds": [round(r, 4) for r in self.rounds],
            "tokens_per_s": round(tps, 1), "model_tflops": round(tps * fpt / 1e12, 4),
            "peak_tflops": round(peak / 1e12, 3), "mfu": round(tps * fpt / peak, 4),
            "peak_memory_mb": round(memory_mb(self.device), 1),
        }


def ratios(results: list[dict]) -> dict[str, float]:
    """Step time of each Muon variant over AdamW's, per preset and dtype."""
    base = {(r["preset"], r["dtype"]): r["seconds_per_step"] for r in results
            if r["optimizer"] == "adamw"}
    return {f"{r['preset']}/{r['dtype']}/{r['optimizer']}_over_adamw":
            round(r["seconds_per_step"] / base[(r["preset"], r["dtype"])], 3)
            for r in results if r["optimizer"] != "adamw" and (r["preset"], r["dtype"]) in base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-small"])
    ap.add_argument("--dtypes", nargs="+", default=["auto"])
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "muon"],
                    choices=["adamw", "muon", "torch-muon"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=6400)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=str(REPO / "reports" / "train_throughput.json"))
    args = ap.parse_args()
    configs = [Config(p, d, o, args) for p in args.presets for d in args.dtypes
               for o in args.optimizers]
    machine = configs[0].prec.describe()
    print(f"train_throughput: {machine}", file=sys.stderr, flush=True)
    for c in configs:
        c.steps(args.warmup)
    for r in range(args.rounds):
        for c in configs:
            c.rounds.append(c.steps(args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{c.name} {args.batch_size * args.seq_len / c.rounds[-1]:,.0f} tok/s"
            for c in configs), file=sys.stderr, flush=True)
    results = [c.result() for c in configs]
    # torch's kernel level: lower than the CPU's flags where ATEN_CPU_CAPABILITY caps it
    report = {"machine": machine, "kernels": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__,
              "threads": torch.get_num_threads(), "results": results,
              "step_time_ratios": ratios(results)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report["step_time_ratios"], sys.stdout, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
