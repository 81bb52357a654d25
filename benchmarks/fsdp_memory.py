"""Memory per rank under DDP and FSDP: computed for a preset, measured at world size 2.

    python benchmarks/fsdp_memory.py [--preset llama-0.5b] [--vocab 6400] [--worlds 2 8 64]
                                     [--measure-layers 8 --measure-d-model 512] [--no-measure]

The computed part (:func:`llmcore.train.parallel.memory_per_rank`) counts, from the model's
shapes on the meta device, the bytes one rank holds of parameters, gradients and optimizer
state, for ``ddp`` and ``fsdp`` at each world size and with each optimizer (Muon + AdamW, or
AdamW alone). The measured part starts 2 CPU processes (torchrun, gloo) for a mid-size shape,
takes one optimizer step under each strategy, and reads what each rank really holds: the
bytes of its local tensors (the shards under FSDP) and its peak resident memory. The two
must agree on the tensors; resident memory adds the Python process, torch and the
activations. Writes reports/fsdp_memory.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.config.model import parse_model  # noqa: E402
from llmcore.config.train import OptimConfig  # noqa: E402
from llmcore.device import cpu_kind  # noqa: E402
from llmcore.train.parallel import local_bytes, memory_per_rank  # noqa: E402

GB = 1024**3
MB = 1024**2


def computed(preset: str, vocab: int, worlds: list[int]) -> dict:
    cfg = parse_model({"preset": preset, "vocab_size": vocab})
    rows = []
    for world in worlds:
        for opt in ("muon", "adamw"):
            for par in ("ddp", "fsdp"):
                b = memory_per_rank(cfg, world, par, opt)
                rows.append({"world": world, "opt": opt, "parallel": par, **b,
                             "total": sum(b.values())})
    return {"preset": preset, "vocab": vocab, "rows": rows}


def worker(parallel: str, layers: int, d_model: int, vocab: int, optimizer: str,
           out: Path) -> None:
    """One rank: build, shard or wrap, one step; write what this rank holds."""
    import torch.distributed as dist

    from llmcore.model.transformer import Transformer
    from llmcore.train.optim import make_optimizer
    from llmcore.train.parallel import shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = parse_model({"preset": "cpu-small", "n_layers": layers, "d_model": d_model,
                       "n_heads": max(1, d_model // 64), "n_kv_heads": max(1, d_model // 64),
                       "vocab_size": vocab, "max_seq_len": 256})
    model = Transformer(cfg)
    wrapped: torch.nn.Module = model
    if parallel == "fsdp":
        shard_model(model, torch.device("cpu"), world)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model, OptimConfig(optimizer=optimizer, lr=1e-3))
    x = torch.randint(0, vocab, (2, 129))
    logits = wrapped(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1)).backward()
    with_grads = local_bytes(model, opt)
    opt.step()
    after = local_bytes(model, opt)
    held = {"params": after["params"], "grads": with_grads["grads"],
            "optimizer": after["optimizer"]}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, **held, "total": sum(held.values()),
                                  "peak_rss": peak_rss})
    if rank == 0:
        expected = memory_per_rank(cfg, world, parallel, optimizer)
        out.write_text(json.dumps({"parallel": parallel, "ranks": rows, "computed": expected,
                                   "params": model.num_parameters(),
                                   "shape": f"{layers} x {d_model}, vocab {vocab}"}))
    dist.destroy_process_group()


def measure(layers: int, d_model: int, vocab: int, optimizer: str,
            strategies: tuple[str, ...] = ("ddp", "fsdp")) -> list[dict]:
    results = []
    for parallel in strategies:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", __file__, "--worker", parallel, "--out", str(out),
                   "--measure-layers", str(layers), "--measure-d-model", str(d_model),
                   "--vocab", str(vocab), "--optimizer", optimizer]
            print(f"measuring {parallel} at world size 2 ...", flush=True)
            subprocess.run(cmd, check=True, env=env, timeout=900)
            results.append(json.loads(out.read_text()))
    return results


def print_tables(comp: dict, meas: list[dict]) -> None:
    print(f"\nComputed per-rank bytes, {comp['preset']} (vocab {comp['vocab']}), fp32:")
    print("| world | optimizer | ddp params+grads+state | fsdp params+grads+state | ratio |")
    print("|---|---|---|---|---|")
    rows = comp["rows"]
    for r in rows:
        if r["parallel"] != "ddp":
            continue
        f = next(x for x in rows if x["world"] == r["world"] and x["opt"] == r["opt"]
                 and x["parallel"] == "fsdp")
        print(f"| {r['world']} | {r['opt']} | {r['total'] / GB:.2f} GiB | "
              f"{f['total'] / GB:.3f} GiB | {r['total'] / f['total']:.1f}x |")
    if not meas:
        return
    print(f"\nMeasured at world size 2 ({meas[0]['shape']}, {meas[0]['params']:,} parameters):")
    print("| parallel | rank | params | grads | optimizer | tensors (computed) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for m in meas:
        for r in m["ranks"]:
            c = m["computed"]
            print(f"| {m['parallel']} | {r['rank']} | {r['params'] / MB:.1f} MB | "
                  f"{r['grads'] / MB:.1f} MB | {r['optimizer'] / MB:.1f} MB | "
                  f"{r['total'] / MB:.1f} MB ({sum(c.values()) / MB:.1f}) | "
                  f"{r['peak_rss'] / MB:.0f} MB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-0.5b")
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 8, 64])
    ap.add_argument("--measure-layers", type=int, default=8)
    ap.add_argument("--measure-d-model", type=int, default=512)
    ap.add_argument("--optimizer", default="adamw", help="of the measured runs")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"],
                    choices=["ddp", "fsdp"], help="of the measured runs")
    ap.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "fsdp_memory.json")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.measure_layers, a.measure_d_model, a.vocab, a.optimizer, a.out)
        return
    comp = computed(a.preset, a.vocab, a.worlds)
    meas = [] if a.no_measure else measure(a.measure_layers, a.measure_d_model, a.vocab,
                                           a.optimizer, tuple(a.strategies))
    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(json.dumps({"machine": cpu_kind(), "computed": comp, "measured": meas},
                                   indent=1) + "\n")
    print_tables(comp, meas)
    print(f"\nwrote {a.report}")


if __name__ == "__main__":
    main()
