"""Quality per minute of compute: llmcore's pretraining recipe against the peer a user would
pick instead, Hugging Face ``LlamaForCausalLM`` with ``torch.optim.AdamW``.

    python benchmarks/speedrun.py                      # 300 s each, data/shards, params' model
    python benchmarks/speedrun.py --seconds 60 --preset tiny --shards DIR --out DIR
    python benchmarks/speedrun.py --seconds 150 \
        --variant doc_mask:model.doc_mask=true --variant muon:pretrain.optimizer=muon

``--variant NAME:KEY=VALUE[,KEY=VALUE...]`` adds an llmcore side with some ``model.*`` or
``pretrain.*`` params changed (an ablation), trained in the same interleaved run.

Both sides get the same shards (the ``pretrain_train`` rows in the same order), the same model
shape, dtype, batch and sequence length, the same peak/min learning rate and warmup, and the
same wall-clock budget. They train in alternating slices of ``--slice`` seconds so that the
noise of a shared machine hits both alike; each side's clock counts only its own slices, never
evaluation. Every ``--eval-every`` seconds of its own clock each side is scored on the same
held-out rows (bits per byte on ``pretrain_val``). The schedule is a function of the elapsed
share of the budget (linear warmup over the first steps, then cosine to ``min_lr``), so both
end their decay when their time runs out.

llmcore's side is exactly what the pretrain stage runs (``Transformer``, its optimizer and
parameter groups, ``Trainer.train_step`` with clipping and autocast). The peer is a plain loop:
AdamW on every parameter, global-norm clipping at the same value, autocast at the same dtype.

Writes ``<out>/speedrun.json`` and ``<out>/speedrun.png`` (val bpb against seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.config.base import parse_section  # noqa: E402
from llmcore.config.model import (
    ModelConfig,  # noqa: E402
    parse_model,  # noqa: E402
)
from llmcore.config.train import TrainConfig  # noqa: E402
from llmcore.data.shards import ShardDataset, ShardLoader, read_manifest  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, token_bytes  # noqa: E402
from llmcore.device import autocast, pick_device, precision, sync  # noqa: E402
from llmcore.model.loss import heldout_loss  # noqa: E402
from llmcore.model.transformer import Transformer  # noqa: E402
from llmcore.schema import UserError  # noqa: E402
from llmcore.train.loop import RunContext, Trainer  # noqa: E402


def lr_at(step: int, elapsed: float, budget: float, cfg: TrainConfig) -> float:
    """Warmup by steps, then cosine by the share of the time budget already used."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(elapsed / budget, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


class Side:
    """One contestant: a model, an optimizer step, a clock of its own, its evaluations."""

    def __init__(self, name: str, model: torch.nn.Module, loader: ShardLoader) -> None:
        self.name, self.model, self.loader = name, model, loader
        self.seconds = 0.0
        self.steps = 0
        self.tokens = 0
        self.evals: list[dict[str, float]] = []
        self.losses: list[float] = []

    def step(self, lr: float) -> float:
        raise NotImplementedError


class LLMCoreSide(Side):
    def __init__(self, name: str, model: Transformer, cfg: TrainConfig, loader: ShardLoader,
                 ctx: RunContext) -> None:
        super().__init__(name, model, loader)
        self.trainer = Trainer(model, cfg, loader, None, ctx)

    def step(self, lr: float) -> float:
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = lr
        loss, _ = self.trainer.train_step(self.model, [self.loader.next_batch()])
        return loss


class Logits(torch.nn.Module):
    """A transformers causal LM seen as ids (B, T) -> logits (B, T, V), like llmcore's."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


class PeerSide(Side):
    def __init__(self, model: Logits, cfg: TrainConfig, loader: ShardLoader,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__("peer", model, loader)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        b = self.loader.next_batch()
        x, y = b.input_ids.to(self.device), b.targets.to(self.device)
        with autocast(self.device, self.dtype):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def peer_model(cfg: Any) -> Logits:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                         intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                         attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    return Logits(LlamaForCausalLM(hf_cfg))


def warm_up(side: Side, device: torch.device, dtype: torch.dtype) -> None:
    """One untimed forward and backward on a copy: whichever side runs first would otherwise
    pay for the process's one-time kernel setup on its own clock."""
    import copy

    model = copy.deepcopy(side.model).train()
    x = side.loader.ds.gather([0])[0][:, :-1].astype("int64")
    with autocast(device, dtype):
        model(torch.from_numpy(x).to(device)).float().mean().backward()


def evaluate(side: Side, val: ShardDataset, rows: int, tb: torch.Tensor, device: torch.device,
             dtype: torch.dtype) -> None:
    ev = heldout_loss(side.model, val, 16, -(-rows // 16), tb, device, dtype)
    side.evals.append({"seconds": round(side.seconds, 2), "steps": side.steps,
                       "tokens": side.tokens, "val_loss": ev["loss"], "val_bpb": ev["bpb"]})
    print(f"{side.name:8s} {side.seconds:7.1f}s  step {side.steps:5d}  val bpb "
          f"{ev['bpb']:.4f}", file=sys.stderr, flush=True)


def run_slice(side: Side, cfg: TrainConfig, args: argparse.Namespace, tokens_per_step: int,
              next_eval: float, eval_fn: Any) -> float:
    """Train ``side`` for one slice of its own clock; evaluate when it crosses ``next_eval``."""
    end = min(side.seconds + args.slice, args.seconds)
    while side.seconds < end:
        start = time.perf_counter()
        side.losses.append(side.step(lr_at(side.steps, side.seconds, args.seconds, cfg)))
        sync(args.device_obj)
        side.seconds += time.perf_counter() - start
        side.steps += 1
        side.tokens += tokens_per_step
        if side.seconds >= next_eval:
            eval_fn(side)
            next_eval += args.eval_every
    return next_eval


def summary(sides: list[Side], args: argparse.Namespace) -> dict[str, Any]:
    a, b = sides[0], sides[-1]  # llmcore's default recipe, the peer
    pairs = list(zip(a.evals, b.evals, strict=False))
    out: dict[str, Any] = {"sides": {}}
    for s in sides:
        out["sides"][s.name] = {"steps": s.steps, "tokens": s.tokens,
                                "seconds": round(s.seconds, 2),
                                "tokens_per_s": round(s.tokens / max(s.seconds, 1e-9), 1),
                                "final_train_loss": s.losses[-1] if s.losses else None,
                                "evals": s.evals}
    out["tokens_per_s_ratio"] = round(out["sides"]["llmcore"]["tokens_per_s"]
                                      / max(out["sides"]["peer"]["tokens_per_s"], 1e-9), 3)
    out["checkpoints"] = [{"seconds": x["seconds"], "llmcore_bpb": x["val_bpb"],
                           "peer_seconds": y["seconds"], "peer_bpb": y["val_bpb"]}
                          for x, y in pairs]
    out["llmcore_lower_bpb_at_every_checkpoint"] = all(x["val_bpb"] < y["val_bpb"]
                                                       for x, y in pairs[1:])
    out["final_bpb"] = {s.name: s.evals[-1]["val_bpb"] for s in sides}
    return out


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``name:model.doc_mask=true,pretrain.lr=0.002`` -> (name, {section: {key: value}})."""
    import yaml

    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant expects NAME:KEY=VALUE[,...] (got {text!r})")
    changes: dict[str, dict[str, Any]] = {"model": {}, "pretrain": {}}
    for pair in filter(None, body.split(",")):
        key, eq, raw = pair.partition("=")
        section, _, field = key.partition(".")
        if not eq or section not in changes or not field:
            raise SystemExit(f"--variant {name}: {pair!r} must be model.KEY=VALUE or "
                             "pretrain.KEY=VALUE")
        changes[section][field] = yaml.safe_load(raw)
    return name, changes


def plot(sides: list[Side], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in sides:
        ax.plot([e["seconds"] for e in s.evals], [e["val_bpb"] for e in s.evals], "o-",
                label=f"{s.name} ({s.tokens / max(s.seconds, 1e-9):,.0f} tok/s)")
    ax.set_xlabel("training seconds (own clock)")
    ax.set_ylabel("val bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="training budget per side")
    ap.add_argument("--slice", type=float, default=5.0, help="seconds per alternating slice")
    ap.add_argument("--eval-every", type=float, default=30.0)
    ap.add_argument("--eval-rows", type=int, default=256, help="held-out rows scored")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--preset", default=ModelConfig().preset,
                    help="model preset of both sides (default: the pipeline's, %(default)s)")
    ap.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default="reports")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    shards, out = Path(args.shards), Path(args.out)
    tok = LLMTokenizer.load(Path(args.tokenizer))
    manifest = read_manifest(shards)
    device = args.device_obj = pick_device(args.device)
    prec = precision(args.dtype, device)
    dtype = prec.autocast
    cfg = dataclasses.replace(TrainConfig(), batch_size=args.batch_size)
    model_cfg = parse_model({"preset": args.preset, "vocab_size": tok.vocab_size})
    train, val = ShardDataset(shards, "pretrain_train"), ShardDataset(shards, "pretrain_val")
    rows = min(len(val), args.eval_rows)
    tb = torch.tensor(token_bytes(tok))
    tokens_per_step = args.batch_size * manifest["seq_len"]
    ctx = RunContext(device, dtype, tb, log=lambda m: None, muon_dtype=prec.orthogonalize)
    sides: list[Side] = []
    for name, changes in [("llmcore", {"model": {}, "pretrain": {}}), *variants]:
        m_cfg = parse_model({"preset": args.preset, "vocab_size": tok.vocab_size,
                                        **changes["model"]})
        t_cfg = dataclasses.replace(parse_section("pretrain", changes["pretrain"], TrainConfig),
                                    batch_size=args.batch_size)
        torch.manual_seed(args.seed)
        model = Transformer(m_cfg).to(device)
        sides.append(LLMCoreSide(name, model, t_cfg,
                                 ShardLoader(train, args.batch_size, seed=args.seed), ctx))
    ours = sides[0].model
    torch.manual_seed(args.seed)
    peer = peer_model(model_cfg).to(device)
    sides.append(PeerSide(peer, cfg, ShardLoader(train, args.batch_size, seed=args.seed),
                          device, dtype))
    machine = prec.describe()
    print(f"speedrun: {model_cfg.preset}, batch {args.batch_size} x {manifest['seq_len']}, "
          f"{args.seconds:.0f}s each on {machine}", file=sys.stderr, flush=True)

    def eval_fn(side: Side) -> None:
        evaluate(side, val, rows, tb, device, dtype)

    for s in sides:
        warm_up(s, device, dtype)
    next_eval = {}
    for s in sides:
        eval_fn(s)  # step 0: both start from the same untrained quality
        next_eval[s.name] = args.eval_every
    while any(s.seconds < args.seconds for s in sides):
        for s in sides:
            if s.seconds < args.seconds:
                s_cfg = s.trainer.cfg if isinstance(s, LLMCoreSide) else cfg
                next_eval[s.name] = run_slice(s, s_cfg, args, tokens_per_step,
                                              next_eval[s.name], eval_fn)
    for s in sides:
        if s.evals[-1]["steps"] != s.steps:
            eval_fn(s)
    result = {"machine": machine, "torch": torch.__version__, "preset": model_cfg.preset,
              "params": ours.num_parameters(), "batch_size": args.batch_size,
              "seq_len": manifest["seq_len"], "budget_seconds": args.seconds,
              "slice_seconds": args.slice, "eval_rows": rows,
              "recipe": {k: getattr(cfg, k) for k in ("lr", "min_lr", "warmup_steps",
                                                       "weight_decay", "grad_clip")},
              "variants": {name: changes for name, changes in variants},
              **summary(sides, args)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "speedrun.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(sides, out / "speedrun.png", f"{model_cfg.preset}, {machine}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("sides", "checkpoints")},
                     indent=2))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # missing shards or tokenizer, bad --variant values
        sys.exit(f"speedrun: {exc}")
