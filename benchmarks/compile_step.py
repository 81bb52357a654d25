"""What ``compile: true`` buys per training step: eager, each block compiled, the whole model.

Steps of the real loop (``Trainer.train_step``: forward, masked loss, backward, clip, Muon and
AdamW) on random tokens shaped as the default's two trainings:

- ``pretrain``: batch 8 x 256, every position a target (pretraining's shape);
- ``sft``: batch 16 x 256, several conversations per row (the document mask) and about half
  the positions targets (the replies), so the head runs on those rows only, except under a
  whole-model graph, which keeps static shapes and so computes the full head.

Modes: ``eager``; ``blocks`` (``compile: true`` as the loop does it: each transformer block
compiled, the embedding and head eager); ``whole`` (``torch.compile`` of the whole model, what
``compile`` meant before and still means under FSDP). Timed in interleaved rounds (one round of
every mode in turn, the median round reported), so a busy moment slows every mode alike; the
first steps, kernel building included, are timed apart as ``first_steps_s``.

    python benchmarks/compile_step.py --shapes sft pretrain --rounds 5

Writes ``reports/compile_step.json``.
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
from llmcore.device import pick_device, precision  # noqa: E402
from llmcore.model.transformer import Transformer  # noqa: E402
from llmcore.train.compiled import compiled_blocks  # noqa: E402
from llmcore.train.loop import RunContext, Trainer  # noqa: E402

SHAPES = {"pretrain": (8, 1.0, 0.0), "sft": (16, 0.53, 0.03)}  # batch, targets, new conversation


def batches(shape: str, seq_len: int, vocab: int, n: int, seed: int) -> list[Batch]:
    """``n`` random batches of ``shape``: segments start a new conversation at random."""
    size, targets, new_doc = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = torch.randint(0, vocab, (size, seq_len + 1), generator=g)
        mask = (torch.rand(size, seq_len, generator=g) < targets).float()
        seg = torch.cumsum((torch.rand(size, seq_len, generator=g) < new_doc).long(), 1)
        out.append(Batch(rows[:, :-1], rows[:, 1:], mask, seg if new_doc else None))
    return out


class _WholeTrainer(Trainer):
    _whole_compiled = True  # the loop's path under FSDP


class Mode:
    """One (shape, mode): a model of the default shape, its trainer and its timed rounds."""

    def __init__(self, shape: str, mode: str, args: argparse.Namespace) -> None:
        self.shape, self.mode = shape, mode
        device = pick_device("auto")
        prec = precision("auto", device)
        self.machine = prec.describe()
        cfg = parse_model({"preset": args.preset, "vocab_size": args.vocab_size,
                           "doc_mask": True})
        torch.manual_seed(0)
        self.model = Transformer(cfg).to(device)
        train = TrainConfig(max_steps=10**9, warmup_steps=0, optimizer="muon",
                            compile=mode != "eager", peak_flops=1.0)
        ctx = RunContext(device, prec.autocast, torch.ones(cfg.vocab_size), log=lambda m: None,
                         muon_dtype=prec.orthogonalize)
        kind = _WholeTrainer if mode == "whole" else Trainer
        self.trainer = kind(self.model, train, None, None, ctx)  # type: ignore[arg-type]
        if mode == "blocks":  # held open for the whole benchmark
            self._blocks = compiled_blocks(self.model.blocks(), device, print)
            if not self._blocks.__enter__():
                raise SystemExit("compile_step: no compiler here, nothing to compare")
        self.module = self.trainer._wrap()
        self.data = batches(shape, args.seq_len, args.vocab_size, 4, seed=1)
        self.rounds: list[float] = []
        self.first_steps_s = self.steps(args.warmup)

    @property
    def name(self) -> str:
        return f"{self.shape}/{self.mode}"

    def steps(self, n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            self.trainer.train_step(self.module, [self.data[i % len(self.data)]])
        return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["sft", "pretrain"], choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=["eager", "blocks", "whole"],
                    choices=["eager", "blocks", "whole"])
    ap.add_argument("--preset", default="cpu-mini")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "reports" / "compile_step.json"))
    args = ap.parse_args()
    modes = [Mode(s, m, args) for s in args.shapes for m in args.modes]
    print(f"compile_step: {modes[0].machine}", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for m in modes:
            m.rounds.append(m.steps(args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m.name} {m.rounds[-1]:.3f} s" for m in modes), file=sys.stderr, flush=True)
    results = [{"shape": m.shape, "mode": m.mode, "batch_size": SHAPES[m.shape][0],
                "seq_len": args.seq_len, "preset": args.preset,
                "seconds_per_step": round(statistics.median(m.rounds), 4),
                "seconds_per_step_rounds": [round(x, 4) for x in m.rounds],
                "first_steps_s": round(m.first_steps_s * args.warmup, 2)} for m in modes]
    eager = {r["shape"]: r["seconds_per_step"] for r in results if r["mode"] == "eager"}
    ratios = {f"{r['shape']}/{r['mode']}_over_eager":
              round(r["seconds_per_step"] / eager[r["shape"]], 3)
              for r in results if r["mode"] != "eager" and r["shape"] in eager}
    report = {"machine": modes[0].machine, "kernels": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "warmup_steps": args.warmup, "results": results, "step_time_ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    json.dump(ratios, sys.stdout, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
