"""DVC stage ``dpo``: preference optimisation of the SFT model (``data/models/dpo/``).

Pairs: on-policy pairs made from the checkable tasks (the right answer against the SFT model's
own greedy answer, or a plausible wrong one where it was right) plus the pairs read by the fetch
stage from ``fetch.preference_paths``. The reference is the SFT model, frozen; its
log-probabilities are computed once. Metrics: held-out reward accuracy and margin, KL to the
reference on the policy's own samples, trainable parameters.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from llmcore.align.dpo import encode_pairs, reference_logprobs, task_pairs, train_dpo
from llmcore.align.replies import sampled_kl
from llmcore.align.run import data_hash, policy_context
from llmcore.config.base import BaseConfig
from llmcore.config.dpo import DPOConfig
from llmcore.config.tasks import SYNTHETIC_TASKS
from llmcore.data.corpus import read_conversations, read_preferences, task_subset
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.files import sha256_file
from llmcore.model.modeldir import load_model_dir
from llmcore.tracking import Tracker
from stages import chain, paths
from stages._align import copy_model, load_policy, save_policy
from stages._common import StageParams, log, repo_root, run_stage, write_tsv

STAGE = "dpo"
CURVES = {"dpo_train.tsv": ["step", "loss", "reward_accuracy", "lr", "grad_norm"],
          "dpo_val.tsv": ["step", "loss", "reward_accuracy", "reward_margin"]}


@dataclass(frozen=True)
class Params(StageParams):
    base: BaseConfig
    dpo: DPOConfig


def _pairs(root, cfg, seed, ref, tok, split, per_task):
    convs = read_conversations(root / paths.CORPUS, split)
    random.Random(f"{seed}:dpo:{split}").shuffle(convs)
    pairs, own = task_pairs(ref, tok, task_subset(convs, SYNTHETIC_TASKS, per_task), cfg.max_new_tokens,
                            seed)
    if cfg.corpus_pairs:
        pairs += read_preferences(root / paths.CORPUS, split)
    return pairs, own


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, base, root = p.dpo, p.base, repo_root()
    if cfg.max_steps == 0:
        return copy_model(STAGE, chain.source(STAGE, root), CURVES)
    src = root / chain.source(STAGE, root)
    tok = LLMTokenizer.load(src)
    policy, model_cfg, adapter, trainable = load_policy(src, base, cfg.method, cfg.lora)
    ref, _ = load_model_dir(src, next(policy.parameters()).device)
    ref = ref.float().eval()
    train, own = _pairs(root, cfg, base.seed, ref, tok, "train", cfg.pairs_per_task)
    val, val_own = _pairs(root, cfg, base.seed, ref, tok, "val", cfg.val_pairs_per_task)
    train, rows = encode_pairs(tok, train, model_cfg.max_seq_len)
    val, _ = encode_pairs(tok, val, model_cfg.max_seq_len)
    if not train:
        raise FileNotFoundError("dpo: no preference pairs (set dpo.pairs_per_task > 0, or give "
                                "fetch.preference_paths), or set dpo.max_steps: 0 to skip")
    log(f"dpo: {len(train)} training pairs ({own} rejected replies are the SFT model's own), "
        f"{len(val)} held out")
    train_ref = reference_logprobs(ref, train, rows)
    val_ref = reference_logprobs(ref, val, rows)
    ctx = policy_context(
        "dpo", cfg, seed=base.seed, device=next(policy.parameters()).device, dtype=base.dtype,
        data={"init_sha256": sha256_file(src / "model.safetensors"),
              "pairs": data_hash([train, train_ref])},
        code=["llmcore.align.dpo", *(["llmcore.model.lora"] if adapter else [])],
        checkpoint_dir=root / paths.checkpoint_dir(STAGE), log=log, tracker=tracker,
        model_cfg=model_cfg)
    result = train_dpo(policy, train, train_ref, val, val_ref, rows, cfg, ctx, base.seed)
    kl = sampled_kl(policy, ref, tok, [p["prompt"] for p in val[:64]], cfg.max_new_tokens,
                    base.seed)
    write_tsv(root / paths.METRICS / "dpo_train.tsv", result.history, CURVES["dpo_train.tsv"])
    write_tsv(root / paths.METRICS / "dpo_val.tsv", result.evals, CURVES["dpo_val.tsv"])
    last = result.evals[-1] if result.evals else {}
    metrics = {"dpo/train_pairs": len(train), "dpo/val_pairs": len(val),
               "dpo/on_policy_rejected": own, "dpo/val_on_policy_rejected": val_own,
               "dpo/val_reward_accuracy": last.get("reward_accuracy"),
               "dpo/val_reward_margin": last.get("reward_margin"),
               "dpo/val_loss": last.get("loss"), "dpo/kl_to_reference": round(kl, 5),
               "dpo/train_seconds": round(result.seconds, 2),
               "dpo/resumed_from": -1 if result.resumed_from is None else result.resumed_from,
               **{f"dpo/{k}": v for k, v in trainable.items()}}
    meta = {"params": {"dpo": dataclasses.asdict(cfg)}, "pairs": len(train)}
    metrics.update(save_policy(STAGE, policy, model_cfg, src, adapter, p.sections(), tracker,
                               meta))
    return metrics


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
