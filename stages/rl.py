"""DVC stage ``rl``: GRPO on the checkable tasks, from the DPO model (``data/models/rl/``).

Rewards are verifiable: 1 for the exact answer of an arithmetic / spell / count / reverse
question, 0 otherwise, minus ``rl.no_end_penalty`` for a reply that does not end with
``<|im_end|>``. The reference (KL penalty) is the starting model, frozen. Metrics: mean reward
per step (``metrics/rl_train.tsv``) and held-out exact match before and after.

``rl.words: compounds`` asks the word tasks about compounds of vocabulary pieces instead of
the training words (``llmcore.data.curriculum.compound_task_rows``: why).
"""

from __future__ import annotations

import collections
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from llmcore.align.grpo import train_grpo
from llmcore.align.run import data_hash, policy_context
from llmcore.config.base import BaseConfig
from llmcore.config.rl import RLConfig
from llmcore.data.corpus import read_conversations, task_subset
from llmcore.data.curriculum import compound_task_rows, held_out_words
from llmcore.data.tasks import WORD_TASKS
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.files import sha256_file
from llmcore.model.modeldir import load_model_dir
from llmcore.schema import UserError
from llmcore.tracking import Tracker
from stages import chain, paths
from stages._align import copy_model, exact_match, load_policy, save_policy
from stages._common import StageParams, log, repo_root, run_stage, write_tsv

STAGE = "rl"
CURVES = {"rl_train.tsv": ["step", "reward", "exact", "kl", "loss", "useful_groups"]}


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    rl: RLConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, base, root = p.rl, p.base, repo_root()
    if cfg.max_steps == 0:
        return copy_model(STAGE, chain.source(STAGE, root), CURVES)
    src = root / chain.source(STAGE, root)
    tok = LLMTokenizer.load(src)
    policy, model_cfg, adapter, trainable = load_policy(src, base, cfg.method, cfg.lora)
    ref, _ = load_model_dir(src, next(policy.parameters()).device)
    ref = ref.float().eval()
    convs = {s: read_conversations(root / paths.CORPUS, s) for s in ("train", "val", "test")}
    train = task_subset(convs["train"], cfg.tasks, 10**9)
    val = task_subset(convs["val"], cfg.tasks, cfg.eval_per_task)
    if cfg.words == "compounds":  # as many questions per word task, about compounds instead
        counts = collections.Counter(c["task"] for c in train if c["task"] in WORD_TASKS)
        compounds = compound_task_rows(
            counts, (tok.decode([i]) for i in range(tok.vocab_size)), held_out_words(convs),
            base.seed)
        if counts and not compounds:
            raise UserError("rl: no compound of two or three vocabulary pieces can be made "
                            "here (too few lowercase pieces, or all too close to held-out "
                            "words): set rl.words: train")
        log(f"rl: the word tasks ask about compounds of vocabulary pieces ({len(compounds)} "
            f"questions in place of {sum(counts.values())} about training words)")
        train = [c for c in train if c["task"] not in WORD_TASKS] + compounds
    if not train:
        raise FileNotFoundError(f"rl: the corpus has no training conversations of the tasks "
                                f"{cfg.tasks} (fetch.synthetic_per_task is 0?); set "
                                "rl.max_steps: 0 to skip")
    random.Random(f"{base.seed}:rl").shuffle(train)
    before = exact_match(policy, tok, val, cfg.eval_per_task, cfg.max_new_tokens)
    log(f"rl: held-out exact match before: {before}")
    ctx = policy_context(
        "rl", cfg, seed=base.seed, device=next(policy.parameters()).device, dtype=base.dtype,
        data={"init_sha256": sha256_file(src / "model.safetensors"),
              "tasks": data_hash(train)},
        code=["llmcore.align.grpo", *(["llmcore.model.lora"] if adapter else [])],
        checkpoint_dir=root / paths.checkpoint_dir(STAGE), log=log, tracker=tracker,
        model_cfg=model_cfg)
    result = train_grpo(policy, ref, tok, train, cfg, ctx, base.seed)
    after = exact_match(policy, tok, val, cfg.eval_per_task, cfg.max_new_tokens)
    log(f"rl: held-out exact match after: {after}")
    write_tsv(root / paths.METRICS / "rl_train.tsv", result.history, CURVES["rl_train.tsv"])
    h = result.history
    metrics = {"rl/steps": len(h), "rl/train_seconds": round(result.seconds, 2),
               "rl/resumed_from": -1 if result.resumed_from is None else result.resumed_from,
               "rl/reward_first10": round(sum(r["reward"] for r in h[:10]) / len(h[:10]), 5),
               "rl/reward_last10": round(sum(r["reward"] for r in h[-10:]) / len(h[-10:]), 5),
               "rl/kl_last": h[-1]["kl"],
               **{f"rl/{t}_exact_before": v for t, v in before.items()},
               **{f"rl/{t}_exact_after": v for t, v in after.items()},
               **{f"rl/{k}": v for k, v in trainable.items()}}
    meta = {"params": {"rl": dataclasses.asdict(cfg)}}
    metrics.update(save_policy(STAGE, policy, model_cfg, src, adapter, p.sections(), tracker,
                               meta))
    return metrics


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
