"""DPO and GRPO variants on the pipeline's SFT model, scored by greedy exact match per task.

    python benchmarks/align_variants.py dpo --lr 1e-4 --beta 0.1 --nll 1.0 --steps 150
    python benchmarks/align_variants.py dpo --lr 3e-5 --nll 0            # plain DPO
    python benchmarks/align_variants.py rl --lr 5e-5 --steps 60 [--model data/models/dpo]
    python benchmarks/align_variants.py base                             # the start model

Uses the library as the stages do (on-policy task pairs / sampled groups from the corpus's
training conversations), trains in memory, writes nothing under data/, and scores greedy
exact match on ``--per-task`` held-out conversations of each task (48 new tokens). Appends one
JSON line per run to reports/align_variants.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.align.dpo import encode_pairs, reference_logprobs, task_pairs, train_dpo  # noqa: E402
from llmcore.align.grpo import train_grpo  # noqa: E402
from llmcore.config.dpo import DPOConfig  # noqa: E402
from llmcore.config.rl import RLConfig  # noqa: E402
from llmcore.config.tasks import SYNTHETIC_TASKS  # noqa: E402
from llmcore.data.corpus import read_conversations, task_subset  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer  # noqa: E402
from llmcore.eval.evaluate import task_accuracy  # noqa: E402
from llmcore.model.modeldir import load_model_dir  # noqa: E402
from llmcore.train.step import RunContext  # noqa: E402

TASKS = SYNTHETIC_TASKS


def given(cfg: Any, **overrides: Any) -> Any:
    """``cfg`` with the overrides that were given (None: keep the section's default)."""
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def quiet(name: str) -> RunContext:
    return RunContext(torch.device("cpu"), torch.float32, log=lambda m: None, name=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("base", "dpo", "rl"))
    ap.add_argument("--model", type=Path, default=REPO / "data/models/sft")
    # None: the value params.yaml's section (= the schema) gives, the pipeline's default
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--beta", type=float, default=None, help="dpo.beta")
    ap.add_argument("--nll", type=float, default=None, help="dpo.nll_coef")
    ap.add_argument("--kl", type=float, default=None, help="rl.kl_coef")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--pairs-per-task", type=int, default=400)
    ap.add_argument("--per-task", type=int, default=150, help="held-out questions per task")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    corpus = REPO / "data/corpus"
    tok = LLMTokenizer.load(args.model)
    ref, cfg = load_model_dir(args.model, torch.device("cpu"))
    ref = ref.float().eval()
    val = task_subset(read_conversations(corpus, "val"), TASKS, args.per_task)

    def exact(model) -> dict[str, float]:
        model.eval()
        return {t: round(v["exact_match"], 3)
                for t, v in task_accuracy(model, tok, val, args.per_task, 48).items()}

    start, extra = time.perf_counter(), {}
    policy = ref
    if args.kind != "base":
        policy, _ = load_model_dir(args.model, torch.device("cpu"))
        policy = policy.float()
        train = read_conversations(corpus, "train")
        random.Random(f"{args.seed}:{args.kind}:train").shuffle(train)
    if args.kind == "dpo":
        pairs, own = task_pairs(ref, tok, task_subset(train, TASKS, args.pairs_per_task), 32,
                                args.seed)
        pairs, rows = encode_pairs(tok, pairs, cfg.max_seq_len)
        refs = reference_logprobs(ref, pairs, rows)
        dpo = given(DPOConfig(), lr=args.lr, beta=args.beta, nll_coef=args.nll,
                    max_steps=args.steps, eval_every=10**9)
        dpo = dataclasses.replace(dpo, min_lr=min(dpo.min_lr, dpo.lr))
        r = train_dpo(policy, pairs, refs, [], [], rows, dpo, quiet("dpo"), args.seed)
        extra = {"pairs": len(pairs), "own_rejected": own,
                 "final_train_loss": r.history[-1]["loss"]}
    elif args.kind == "rl":
        rl = given(RLConfig(), lr=args.lr, kl_coef=args.kl, max_steps=args.steps)
        rl = dataclasses.replace(rl, min_lr=min(rl.min_lr, rl.lr))
        r = train_grpo(policy, ref, tok, task_subset(train, TASKS, 10**9), rl, quiet("rl"),
                       args.seed)
        h = r.history
        extra = {"reward_first10": round(sum(x["reward"] for x in h[:10]) / len(h[:10]), 3),
                 "reward_last10": round(sum(x["reward"] for x in h[-10:]) / len(h[-10:]), 3)}
    row = {"kind": args.kind, "model": str(args.model), **{k: v for k, v in vars(args).items()
           if k not in ("kind", "model")}, **extra, "exact_match": exact(policy),
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(row))
    out = REPO / "reports" / "align_variants.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
