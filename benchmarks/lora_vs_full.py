"""SFT with LoRA against full SFT: same pretrained model, data, loop and steps.

    python benchmarks/lora_vs_full.py --method lora --rank 8 --lr 3e-3
    python benchmarks/lora_vs_full.py --method full --lr 1e-3

Builds the ``sft`` stage's run from params.yaml's ``sft:`` (with the method, rank and learning
rate given here; alpha = 2 x rank) on the pipeline's ``data/shards`` and
``data/models/pretrain``, with checkpoints in a temporary directory (nothing under data/ is
written), and prints the best held-out val bpb on the SFT replies, trainable parameters, their
share and seconds. Appends the JSON line to reports/lora_vs_full.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.config.base import parse_section  # noqa: E402
from llmcore.config.sft import SFTConfig  # noqa: E402
from llmcore.data.shards import data_fingerprint, read_manifest  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, token_bytes  # noqa: E402
from llmcore.model.lora import LoRASpec  # noqa: E402
from llmcore.model.modeldir import read_model_config  # noqa: E402
from llmcore.train.fit import FitSpec, fit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("full", "lora"), default="lora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=None, help="default: params.yaml's sft")
    args = ap.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = {**params["sft"], "method": args.method, "lr": args.lr, "min_lr": args.lr / 10,
           "lora": {**params["sft"]["lora"], "rank": args.rank, "alpha": 2.0 * args.rank}}
    if args.steps:
        raw["max_steps"] = args.steps
    sft = parse_section("sft", raw, SFTConfig)
    tok = LLMTokenizer.load(REPO / "data/tokenizer")
    manifest = read_manifest(REPO / "data/shards")
    model_cfg = dataclasses.replace(read_model_config(REPO / "data/models/pretrain"),
                                    vocab_size=tok.vocab_size)
    with tempfile.TemporaryDirectory() as ckpt:
        spec = FitSpec(model=model_cfg, train=sft, shard_dir=REPO / "data/shards",
                       train_split="sft_train", val_split="sft_val",
                       token_bytes=tuple(token_bytes(tok)), checkpoint_dir=Path(ckpt),
                       seed=params["base"]["seed"], device=params["base"]["device"],
                       dtype=params["base"]["dtype"],
                       data=data_fingerprint(manifest, ["sft_train", "sft_val"]),
                       init_from=REPO / "data/models/pretrain", name="sft",
                       adapter=LoRASpec.from_config(sft.lora) if args.method == "lora" else None)
        start = time.perf_counter()
        out = fit(spec, log=lambda m: print(m, flush=True) if "val" in m else None)
    best = out.result.best or out.result.last_eval
    row = {"method": args.method, "rank": args.rank if args.method == "lora" else None,
           "lr": args.lr, "steps": sft.max_steps, "val_bpb": round(best["val_bpb"], 5),
           "trainable": out.trainable, "params": out.params,
           "share": round(out.trainable / out.params, 5),
           "seconds": round(time.perf_counter() - start, 1), "device": out.device}
    print(json.dumps(row))
    path = REPO / "reports" / "lora_vs_full.jsonl"
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
