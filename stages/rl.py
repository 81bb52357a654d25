"""DVC stage ``rl``: GRPO on the checkable tasks, from the DPO model (``data/models/rl/``).

Rewards are verifiable: 1 for the exact answer of an arithmetic / spell / count / reverse
question, 0 otherwise, minus ``rl.no_end_penalty`` for a reply that does not end with
``<|im_end|>``. The reference (KL penalty) is the starting model, frozen. Metrics: mean reward
per step (``metrics/rl_train.tsv``) and held-out exact match before and after.
"""

from __future__ import annotations

import dataclasses
import random

from llmcore.align.grpo import GRPOSettings, train_grpo
from llmcore.data.corpus import read_conversations
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.model.modeldir import load_model_dir
from stages._align import copy_model, exact_match, load_policy, save_policy, task_subset
from stages._common import log, repo_root, run_stage, write_tsv

PARAMS = ("base.seed", "base.device", "rl")
SRC, OUT = "data/models/dpo", "data/models/rl"
CURVES = {"rl_train.tsv": ["step", "reward", "exact", "kl", "loss", "useful_groups"]}


def body(cfgs, tracker):
    cfg, base, root = cfgs["rl"], cfgs["base"], repo_root()
    if cfg.max_steps == 0:
        return copy_model("rl", SRC, OUT, CURVES)
    tok = LLMTokenizer.load(root / SRC)
    policy, model_cfg, adapter, trainable = load_policy(root / SRC, base, cfg.method, cfg.lora)
    ref, _ = load_model_dir(root / SRC, next(policy.parameters()).device)
    ref = ref.float().eval()
    train = task_subset(read_conversations(root / "data/corpus", "train"), cfg.tasks, 10**9)
    val = task_subset(read_conversations(root / "data/corpus", "val"), cfg.tasks,
                      cfg.eval_per_task)
    if not train:
        raise FileNotFoundError(f"rl: the corpus has no training conversations of the tasks "
                                f"{cfg.tasks} (fetch.synthetic_per_task is 0?); set "
                                "rl.max_steps: 0 to skip")
    random.Random(f"{base.seed}:rl").shuffle(train)
    before = exact_match(policy, tok, val, cfg.eval_per_task, cfg.max_new_tokens)
    log(f"rl: held-out exact match before: {before}")
    s = GRPOSettings(max_steps=cfg.max_steps, prompts_per_step=cfg.prompts_per_step,
                     group_size=cfg.group_size, temperature=cfg.temperature,
                     max_new_tokens=cfg.max_new_tokens, lr=cfg.lr, clip=cfg.clip,
                     beta=cfg.kl_coef, inner_epochs=cfg.inner_epochs,
                     no_end_penalty=cfg.no_end_penalty, grad_clip=cfg.grad_clip,
                     seed=base.seed)
    result = train_grpo(policy, ref, tok, train, s, log=log)
    after = exact_match(policy, tok, val, cfg.eval_per_task, cfg.max_new_tokens)
    log(f"rl: held-out exact match after: {after}")
    write_tsv(root / "metrics" / "rl_train.tsv", result.history, CURVES["rl_train.tsv"])
    h = result.history
    metrics = {"rl/steps": len(h), "rl/train_seconds": round(result.seconds, 2),
               "rl/reward_first10": round(sum(r["reward"] for r in h[:10]) / len(h[:10]), 5),
               "rl/reward_last10": round(sum(r["reward"] for r in h[-10:]) / len(h[-10:]), 5),
               "rl/kl_last": h[-1]["kl"],
               **{f"rl/{t}_exact_before": v for t, v in before.items()},
               **{f"rl/{t}_exact_after": v for t, v in after.items()},
               **{f"rl/{k}": v for k, v in trainable.items()}}
    meta = {"params": {"rl": dataclasses.asdict(cfg)}}
    metrics.update(save_policy("rl", policy, model_cfg, root / SRC, adapter, cfgs, tracker,
                               meta))
    return metrics


def main() -> None:
    run_stage("rl", PARAMS, body)


if __name__ == "__main__":
    main()
