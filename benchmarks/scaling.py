"""Scaling study: which model shape and vocabulary a fixed compute budget wants, on this data.

    python benchmarks/scaling.py                  # the default grid (needs `dvc repro fetch`)
    python benchmarks/scaling.py --plan           # list the runs and their FLOPs, train nothing
    python benchmarks/scaling.py --vocab 4096 --budgets 2e12,6e12 --shapes 4x128,4x192
    python benchmarks/scaling.py --report-only    # refit and redraw from the runs on record

For every vocabulary size it trains a BPE tokenizer on ``data/corpus`` and packs shards exactly
as the tokenizer and pack stages do (into ``--work``), then trains every (shape, budget) pair
of the grid with the pretrain stage's own loop (``Trainer``: Muon + AdamW, warmup + cosine,
clipping, the params.yaml defaults), for as many steps as the budget buys. A budget is FLOPs,
not seconds (``flops_per_token`` x tokens: 6 x matmul parameters including the output head,
plus attention), so the study comes out the same on a machine of any speed; the seconds each
run took are recorded beside it.

The measure is bits per byte on the docs validation split (``pretrain_val``), which does not
depend on the tokenizer. Per budget and vocabulary, bpb against log(non-embedding parameters)
is fitted with a parabola (an isoFLOP curve, Chinchilla's approach 2); its minimum is the
compute-optimal size, and the tokens a run of that size gets at that budget are the
compute-optimal tokens. A power law through the optima extrapolates them to other budgets.

Repetition: the corpus is small, so large budgets read it several times. Every run is
evaluated four times; a run whose last evaluation is worse than its best has started to pay
for repeating the data (``val_turned_up``), and its epochs over the training rows are recorded.

A sweep of the recipe at one point (``--tag lr-0.01 --pretrain lr=0.01``) is recorded in the
same file under its tag and left out of the fits: that is how the pretraining defaults (lr,
batch) the grid runs with were chosen.

Each finished run is appended to ``<out>/runs.jsonl`` at once, so a killed study resumes where
it stopped (runs already on record are skipped). Writes ``<out>/scaling.json`` (runs, fits,
optima) and ``<out>/isoflop.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.config.base import parse_section  # noqa: E402
from llmcore.config.model import parse_model  # noqa: E402
from llmcore.config.train import TrainConfig  # noqa: E402
from llmcore.data.corpus import read_conversations, read_texts  # noqa: E402
from llmcore.data.packing import pack_all  # noqa: E402
from llmcore.data.shards import ShardDataset, ShardLoader, read_manifest  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, token_bytes, train_bpe, training_texts  # noqa: E402
from llmcore.device import measure_peak_flops, pick_device, precision  # noqa: E402
from llmcore.model.transformer import Transformer, count_parameters, flops_per_token  # noqa: E402
from llmcore.schema import UserError  # noqa: E402
from llmcore.train.loop import RunContext, Trainer  # noqa: E402

# (layers, width): ~0.05M to ~6M non-embedding parameters (swiglu MLP, as the presets)
SHAPES = ("1x64", "2x48", "2x64", "4x64", "3x96", "4x96", "4x128", "6x128", "4x160", "4x192",
          "6x192", "4x256", "6x256", "8x256")
# The default grid: per budget, the shapes around its optimum (a shape far from it costs as
# much as one near it and only confirms the curve's slope). Vocabulary 4096 gets three budgets
# and ~0.1M to ~3M non-embedding parameters; 2048 and 6400 the budget nearest the pipeline's
# own pretraining budget, on the small shapes where the optimum lies. The budgets stop at
# 1e13: a pipeline meant to finish in minutes cannot spend more than that on pretraining.
# Listed in the order they run (about 80 minutes on 2 cores), the most telling first.
_OTHER = ("4x64", "4x96", "4x128")
GRID: tuple[tuple[tuple[int, ...], float, tuple[str, ...]], ...] = (
    ((4096,), 1e13, ("2x64", "4x64", "4x96", "4x128", "6x128", "4x192", "4x256")),
    ((4096,), 5e12, ("1x64", "2x48", "2x64", "4x64", "4x96", "4x128", "4x192")),
    ((2048, 6400), 1e13, _OTHER),
    ((4096,), 2.5e12, ("1x64", "2x48", "2x64", "4x64", "4x96", "4x128")),
)


def parse_shape(text: str) -> tuple[int, int]:
    layers, _, width = text.partition("x")
    if not (layers.isdigit() and width.isdigit()):
        raise SystemExit(f"a shape is LAYERSxWIDTH, e.g. 4x128 (got {text!r})")
    return int(layers), int(width)


def parse_overrides(text: str) -> dict[str, Any]:
    """``lr=0.01,warmup_steps=20`` -> {"lr": 0.01, "warmup_steps": 20} (YAML values)."""
    import yaml

    out = {}
    for pair in filter(None, text.split(",")):
        key, eq, raw = pair.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def model_config(layers: int, width: int, vocab: int) -> Any:
    """The cpu-small preset at another depth and width; heads of 32 up to width 160, then 64."""
    head = 32 if width <= 160 else 64
    return parse_model({"preset": "cpu-small", "n_layers": layers, "d_model": width,
                                   "n_heads": width // head, "n_kv_heads": width // head,
                                   "vocab_size": vocab})


def non_embedding(cfg: Any) -> int:
    """Parameters outside the token embedding (and the tied head): what Chinchilla counts."""
    return count_parameters(cfg) - cfg.vocab_size * cfg.d_model


def build_data(corpus: Path, work: Path, vocab: int, seq_len: int, chat_share: float
               ) -> Path:
    """Tokenizer and shards for one vocabulary size, as the stages build them (cached)."""
    out = work / f"vocab{vocab}"
    tok_dir, shard_dir = out / "tokenizer", out / "shards"
    if (shard_dir / "manifest.json").exists() and \
            read_manifest(shard_dir)["seq_len"] == seq_len:
        return out
    convs = read_conversations(corpus, "train")
    texts = training_texts(read_texts(corpus, "train"), convs, None)
    tok = LLMTokenizer(train_bpe(texts, vocab, 2, True))
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(tok_dir)
    pretrain = {s: read_texts(corpus, s) for s in ("train", "val")}
    sft = {s: [c["messages"] for c in read_conversations(corpus, s)] for s in ("train", "val")}
    pack_all(tok, pretrain, sft, shard_dir, seq_len, chat_share=chat_share)
    print(f"scaling: vocab {vocab}: tokenizer and shards in {out}", file=sys.stderr, flush=True)
    return out


class Run(NamedTuple):
    vocab: int
    shape: str
    budget: float
    tag: str = ""  # a sweep's name: kept apart from the isoFLOP fits

    @property
    def key(self) -> str:
        return f"{self.tag + ':' if self.tag else ''}v{self.vocab}-{self.shape}-{self.budget:.3g}"


def plan_run(run: Run, seq_len: int, batch: int) -> dict[str, Any]:
    cfg = model_config(*parse_shape(run.shape), run.vocab)
    fpt = flops_per_token(cfg, seq_len)
    steps = int(run.budget // (fpt * batch * seq_len))
    return {"cfg": cfg, "flops_per_token": fpt, "steps": steps,
            "non_embedding_params": non_embedding(cfg)}


def train_run(run: Run, data: Path, plan: dict[str, Any], args: argparse.Namespace,
              ctx: RunContext, peak: float) -> dict[str, Any]:
    cfg, steps = plan["cfg"], plan["steps"]
    shards = data / "shards"
    train, val = ShardDataset(shards, "pretrain_train"), ShardDataset(shards, "pretrain_val")
    tcfg = parse_section("pretrain", {
        "max_steps": steps, "batch_size": args.batch_size,
        "warmup_steps": max(1, min(50, steps // 10)), "eval_every": max(1, steps // 4),
        "eval_batches": -(-len(val) // args.batch_size), "log_every": max(1, steps // 4),
        "checkpoint_every": steps + 1, "peak_flops": peak, **args.pretrain}, TrainConfig)
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(ctx.device)
    loader = ShardLoader(train, args.batch_size, seed=args.seed)
    start = time.perf_counter()
    result = Trainer(model, tcfg, loader, val, ctx).run()
    seconds = time.perf_counter() - start
    tokens = steps * args.batch_size * args.seq_len
    evals = [{"step": e["step"], "val_bpb": round(e["val_bpb"], 5)} for e in result.evals]
    best = min(e["val_bpb"] for e in evals)
    final = evals[-1]["val_bpb"]
    return {
        "key": run.key, "tag": run.tag, "overrides": args.pretrain,
        "batch_size": args.batch_size, "lr": tcfg.lr,
        "vocab": run.vocab, "shape": run.shape, "budget": run.budget,
        "layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
        "non_embedding_params": plan["non_embedding_params"],
        "params": count_parameters(cfg), "flops_per_token": plan["flops_per_token"],
        "steps": steps, "tokens": tokens, "epochs": round(tokens / (len(train) * args.seq_len), 3),
        "final_val_bpb": final, "best_val_bpb": best,
        "val_turned_up": final > best + 1e-4, "evals": evals,
        "final_train_loss": round(result.history[-1]["loss"], 5),
        "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "achieved_gflops": round(run.budget / seconds / 1e9, 2),
    }


# -- fits ---------------------------------------------------------------------------------------

def isoflop_fit(points: list[dict[str, Any]], window: int = 2) -> dict[str, Any] | None:
    """Parabola of bpb in log10(N) through one budget's runs nearest its best one (``window``
    on each side: an isoFLOP curve is a parabola only near its minimum, and the grid's far
    points would pull the vertex away); its minimum is the optimum."""
    pts = sorted(points, key=lambda r: r["non_embedding_params"])
    if len(pts) < 3:
        return None
    i = int(np.argmin([r["final_val_bpb"] for r in pts]))
    lo = max(0, min(i - window, len(pts) - 3))
    best, pts = pts[i], pts[lo:max(i + window + 1, lo + 3)]
    x = np.log10([r["non_embedding_params"] for r in pts])
    y = np.array([r["final_val_bpb"] for r in pts])
    a, b, c = np.polyfit(x, y, 2)
    fit: dict[str, Any] = {"runs": len(pts), "best_run": best["shape"],
                           "best_run_bpb": best["final_val_bpb"],
                           "best_run_params": best["non_embedding_params"]}
    if a <= 0:  # no minimum inside: the optimum is at an edge of the grid
        fit.update(optimal_params=best["non_embedding_params"], optimal_bpb=float(y.min()),
                   inside_grid=False)
    else:
        x_opt = -b / (2 * a)
        fit.update(optimal_params=float(10 ** x_opt), optimal_bpb=float(c - b * b / (4 * a)),
                   inside_grid=bool(x.min() <= x_opt <= x.max()))
    # tokens at the optimum: log tokens is linear in log N along one budget
    t = np.polyfit(x, np.log10([r["tokens"] for r in pts]), 1)
    fit["optimal_tokens"] = float(10 ** np.polyval(t, math.log10(fit["optimal_params"])))
    fit["coefficients"] = [float(a), float(b), float(c)]
    return fit


def power_law(budgets: list[float], values: list[float]) -> dict[str, float] | None:
    """``value = k * budget ** exponent`` through the optima (least squares in log-log)."""
    if len(budgets) < 2:
        return None
    e, k = np.polyfit(np.log10(budgets), np.log10(values), 1)
    return {"exponent": float(e), "log10_k": float(k)}


def fits(runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in runs if not r.get("tag")]
    out: dict[str, Any] = {}
    for vocab in sorted({r["vocab"] for r in runs}):
        per_budget = {}
        for budget in sorted({r["budget"] for r in runs if r["vocab"] == vocab}):
            fit = isoflop_fit([r for r in runs if r["vocab"] == vocab and r["budget"] == budget])
            if fit:
                per_budget[f"{budget:.3g}"] = fit
        ok = [(float(b), f) for b, f in per_budget.items() if f["inside_grid"]]
        out[str(vocab)] = {
            "budgets": per_budget,
            "params_law": power_law([b for b, _ in ok], [f["optimal_params"] for _, f in ok]),
            "tokens_law": power_law([b for b, _ in ok], [f["optimal_tokens"] for _, f in ok]),
        }
    return out


def plot(runs: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["vocab"] for r in runs})
    fig, axes = plt.subplots(1, len(vocabs), figsize=(5 * len(vocabs), 4.2), sharey=True,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, vocab in zip(axes[0], vocabs, strict=True):
        budgets = sorted({r["budget"] for r in runs if r["vocab"] == vocab})
        for i, budget in enumerate(budgets):
            pts = sorted((r for r in runs if r["vocab"] == vocab and r["budget"] == budget),
                         key=lambda r: r["non_embedding_params"])
            n = [r["non_embedding_params"] for r in pts]
            color = colors[i % len(colors)]
            ax.plot(n, [r["final_val_bpb"] for r in pts], "-", color=color, alpha=0.5)
            for r in pts:  # hollow: the last evaluation was worse than the best (repetition)
                ax.plot(r["non_embedding_params"], r["final_val_bpb"], "o", color=color,
                        mfc="white" if r["val_turned_up"] else color)
            f = fit[str(vocab)]["budgets"].get(f"{budget:.3g}")
            if f and f["inside_grid"]:
                a, b, c = f["coefficients"]
                xs = np.linspace(math.log10(min(n)), math.log10(max(n)), 50)
                ax.plot(10 ** xs, a * xs * xs + b * xs + c, ":", color=color)
                ax.plot(f["optimal_params"], f["optimal_bpb"], "*", ms=12, color=color)
            ax.plot([], [], "o-", color=color, label=f"{budget:.1e} FLOPs")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_title(f"vocab {vocab}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("docs val bits per byte")
    fig.suptitle("isoFLOP curves (star: fitted optimum; hollow: val loss turned up, "
                 "repetition costs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(runs: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    fit = fits(runs)
    (out / "scaling.json").write_text(json.dumps({**meta, "fits": fit, "runs": runs},
                                                 indent=2) + "\n")
    grid = [r for r in runs if not r.get("tag")]
    if grid:
        plot(grid, fit, out / "isoflop.png")
    for vocab, f in fit.items():
        for budget, b in f["budgets"].items():
            edge = "" if b["inside_grid"] else " (at the grid's edge)"
            print(f"vocab {vocab} budget {budget}: optimum {b['optimal_params'] / 1e6:.2f}M "
                  f"params, {b['optimal_tokens'] / 1e6:.2f}M tokens, bpb {b['optimal_bpb']:.4f}"
                  f"{edge}; best run {b['best_run']} {b['best_run_bpb']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", help="comma-separated vocabulary sizes (default: GRID's)")
    ap.add_argument("--budgets", help="comma-separated FLOP budgets (with --vocab)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="LAYERSxWIDTH,... (with --vocab)")
    ap.add_argument("--min-steps", type=int, default=100,
                    help="skip a (shape, budget) that buys fewer optimizer steps")
    ap.add_argument("--max-epochs", type=float, default=20.0,
                    help="skip a (shape, budget) that would read the rows more times")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--chat-share", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default: the same numbers on every CPU) or auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--work", default="data/scaling")
    ap.add_argument("--out", default="reports/scaling")
    ap.add_argument("--pretrain", type=parse_overrides, default={}, metavar="KEY=VALUE,...",
                    help="pretrain params for every run, e.g. lr=0.01,warmup_steps=20")
    ap.add_argument("--tag", default="", help="name these runs as a sweep (e.g. lr-0.01): "
                    "recorded beside the grid, left out of its fits")
    ap.add_argument("--plan", action="store_true", help="list the runs, train nothing")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out, work, corpus = Path(args.out), Path(args.work), Path(args.corpus)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device("cpu")
    prec = precision(args.dtype, device)
    meta = {"machine": prec.describe(), "torch": torch.__version__, "seq_len": args.seq_len,
            "pretrain_overrides": args.pretrain,
            "batch_size": args.batch_size, "chat_share": args.chat_share,
            "flops": "flops_per_token x tokens (6 x matmul params incl. head + attention)"}
    runs_path = out / "runs.jsonl"
    done = {r["key"]: r for r in read_runs(runs_path)}
    if args.report_only:
        report(list(done.values()), out, meta)
        return
    if args.vocab:
        grid = [(tuple(int(v) for v in args.vocab.split(",")), float(b),
                 tuple(args.shapes.split(","))) for b in (args.budgets or "1e13").split(",")]
    else:
        grid = list(GRID)
    runs = list(dict.fromkeys(Run(v, s, b, args.tag) for vocabs, b, shapes in grid
                              for v in vocabs for s in shapes))
    vocabs = sorted({r.vocab for r in runs})
    todo, skipped = [], []
    for run in runs:  # in GRID's order: the budgets that decide the default first
        plan = plan_run(run, args.seq_len, args.batch_size)
        tokens = plan["steps"] * args.batch_size * args.seq_len
        if plan["steps"] < args.min_steps:
            skipped.append((run.key, f"{plan['steps']} steps"))
        elif run.key not in done:
            todo.append((run, plan, tokens))
    total = sum(r.budget for r, _, _ in todo)
    print(f"scaling: {len(todo)} runs to train ({total:.2e} FLOPs), {len(done)} on record, "
          f"{len(skipped)} skipped (< {args.min_steps} steps)", file=sys.stderr)
    if args.plan:
        for run, plan, tokens in todo:
            print(f"{run.key:24s} N {plan['non_embedding_params'] / 1e6:5.2f}M  "
                  f"steps {plan['steps']:6d}  tokens {tokens / 1e6:6.2f}M")
        return
    if not (corpus / "pretrain_train.parquet").exists():
        raise UserError(f"{corpus} has no corpus: run `dvc repro fetch` first")
    data = {v: build_data(corpus, work, v, args.seq_len, args.chat_share) for v in vocabs}
    peak = measure_peak_flops(device, prec.autocast)
    spent, start = 0.0, time.perf_counter()
    for i, (run, plan, _) in enumerate(todo):
        ds_train = ShardDataset(data[run.vocab] / "shards", "pretrain_train")
        epochs = plan["steps"] * args.batch_size / len(ds_train)
        if epochs > args.max_epochs:
            print(f"scaling: skip {run.key}: {epochs:.1f} epochs", file=sys.stderr)
            continue
        tok = LLMTokenizer.load(data[run.vocab] / "tokenizer")
        ctx = RunContext(device, prec.autocast, torch.tensor(token_bytes(tok)),
                         log=lambda m: None, name="scaling", muon_dtype=prec.orthogonalize)
        row = train_run(run, data[run.vocab], plan, args, ctx, peak)
        with runs_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done[run.key] = row
        spent += run.budget
        rate = spent / (time.perf_counter() - start)
        left = sum(r.budget for r, _, _ in todo[i + 1:])
        print(f"scaling [{i + 1}/{len(todo)}] {run.key}: bpb {row['final_val_bpb']:.4f} "
              f"(best {row['best_val_bpb']:.4f}), {row['epochs']:.2f} epochs, "
              f"{row['seconds']:.0f}s, {row['achieved_gflops']:.1f} GFLOP/s; "
              f"ETA {left / rate / 60:.0f} min", file=sys.stderr, flush=True)
    report(list(done.values()), out, meta)


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"scaling: {exc}")
