"""Run llmcore.train.fit.fit (alone or under torchrun) and write what the tests compare.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_fit.py SHARDS OUT \\
        --batch 4 --steps 12 --parallel fsdp --checkpoint-every 4 --ckpt DIR

Rank 0 writes ``OUT.json`` (the loss of every step, the step resumed from, the evaluations)
and ``OUT.safetensors`` (the exported weights). ``--pause S`` sleeps S seconds after each
step on rank 0 (the other ranks wait for it in the next step), so that a test can kill a run
in the middle. The model is the tests' tiny one (tests/train/test_train.py).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from llmcore.data.tokenizer import LLMTokenizer, token_bytes  # noqa: E402
from llmcore.model.lora import LoRASpec  # noqa: E402
from llmcore.schema import UserError  # noqa: E402
from llmcore.train.fit import FitSpec, fit  # noqa: E402
from tests.train.test_train import CFG, MODEL  # noqa: E402


class Pause:
    """A tracker that only sleeps: it is called once per step on rank 0."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.seconds and not any(k.endswith("val_loss") for k in metrics):
            time.sleep(self.seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--parallel", default="ddp")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--pause", type=float, default=0.0)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--val", action="store_true", help="evaluate on pretrain_val")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    ap.add_argument("--skew-rank", type=int, default=None,
                    help="this rank trains at another lr (a node with other params)")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, batch_size=a.batch, max_steps=a.steps,
                              eval_every=a.eval_every, checkpoint_every=a.checkpoint_every,
                              threads=1, parallel=a.parallel, optimizer=a.optimizer,
                              warmup_steps=min(CFG.warmup_steps, a.steps - 1),
                              dist_timeout=a.timeout, log_every=1)
    if a.skew_rank is not None and int(os.environ.get("RANK", "0")) == a.skew_rank:
        cfg = dataclasses.replace(cfg, lr=cfg.lr * 2)
    tok = LLMTokenizer.load(a.shards / "tok")
    spec = FitSpec(model=MODEL, train=cfg, seed=1, device=a.device, dtype=a.dtype,
                   shard_dir=a.shards, train_split="pretrain_train",
                   val_split="pretrain_val" if a.val else None,
                   token_bytes=tuple(token_bytes(tok)),
                   checkpoint_dir=a.ckpt or a.out.parent / f"ckpt-{a.out.name}",
                   adapter=LoRASpec(rank=4) if a.lora else None)
    try:
        out = fit(spec, tracker=Pause(a.pause), log=lambda m: print(m, flush=True))
    except UserError as exc:  # as a stage reports it: one line, exit 2
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        r = out.result
        a.out.with_suffix(".json").write_text(json.dumps({
            "losses": [h["loss"] for h in r.history], "resumed_from": r.resumed_from,
            "evals": r.evals, "export_step": out.export_step,
            "fingerprint": out.fingerprint}))
        save_file(out.export_weights, str(a.out.with_suffix(".safetensors")))


if __name__ == "__main__":
    main()
