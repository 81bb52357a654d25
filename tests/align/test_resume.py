"""DPO and GRPO share the loop's step and checkpoints: a run cut short and resumed ends with
the weights and the history of a run never interrupted (dropout on, so the RNG state counts)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from llmcore.align.dpo import encode_pairs, reference_logprobs, train_dpo
from llmcore.align.grpo import train_grpo
from llmcore.align.run import policy_context
from llmcore.config.dpo import DPOConfig
from llmcore.config.model import parse_model
from llmcore.config.rl import RLConfig
from llmcore.model.transformer import Transformer
from llmcore.schema import UserError
from llmcore.tracking import NullTracker
from llmcore.train.checkpoint import CheckpointManager


def tiny(seed: int, dropout: float = 0.1) -> Transformer:
    torch.manual_seed(seed)
    cfg = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 128,
                                  "dropout": dropout})
    return Transformer(cfg)


def context(name, cfg, tmp_path, code, lines=None):
    return policy_context(name, cfg, seed=3, device=torch.device("cpu"), dtype="float32",
                          data={"toy": 1}, code=[code], checkpoint_dir=tmp_path / name,
                          log=(lines.append if lines is not None else lambda m: None))


def drop_last_checkpoint(ctx) -> int:
    manager: CheckpointManager = ctx.checkpoints
    last = manager.steps()[-1]
    shutil.rmtree(last)
    return int(manager.steps()[-1].name[5:])


def pairs(tok):
    raw = [{"prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": "yes indeed", "rejected": "no way"} for i in range(12)]
    kept, rows = encode_pairs(tok, raw, 128)
    return kept, rows, reference_logprobs(tiny(1), kept, rows)


def test_dpo_resumed_after_a_lost_checkpoint_equals_the_uninterrupted_run(tiny_tokenizer,
                                                                           tmp_path):
    kept, rows, refs = pairs(tiny_tokenizer)
    cfg = DPOConfig(max_steps=8, warmup_steps=2, batch_size=4, grad_accum=2, lr=3e-3,
                    min_lr=3e-4, eval_every=4, checkpoint_every=2, log_every=4)
    full_model = tiny(2)
    full = train_dpo(full_model, kept[:8], refs[:8], kept[8:], refs[8:], rows, cfg,
                     context("dpo", cfg, tmp_path / "a", "llmcore.align.dpo"), seed=3)
    # the same run, its last checkpoint lost (as if killed after step 6): resume from 6
    run_b = tiny(2)
    ctx = context("dpo", cfg, tmp_path / "b", "llmcore.align.dpo")
    train_dpo(run_b, kept[:8], refs[:8], kept[8:], refs[8:], rows, cfg, ctx, seed=3)
    assert drop_last_checkpoint(ctx) == 6
    lines: list[str] = []
    resumed_model = tiny(5)  # other initial weights: everything must come from the checkpoint
    resumed = train_dpo(resumed_model, kept[:8], refs[:8], kept[8:], refs[8:], rows, cfg,
                        context("dpo", cfg, tmp_path / "b", "llmcore.align.dpo", lines),
                        seed=3)
    assert resumed.resumed_from == 6 and full.resumed_from is None
    assert any("resuming from" in line for line in lines)
    assert resumed.history == full.history and resumed.evals == full.evals
    for (k, a), (_, b) in zip(full_model.state_dict().items(),
                              resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_dpo_accumulation_gives_the_gradient_of_the_whole_batch(tiny_tokenizer, tmp_path):
    kept, rows, refs = pairs(tiny_tokenizer)
    one = DPOConfig(max_steps=3, warmup_steps=1, batch_size=4, lr=1e-3, min_lr=1e-4,
                    eval_every=3, weight_decay=0.0)
    a, b = tiny(2, dropout=0.0), tiny(2, dropout=0.0)  # no dropout: the same function
    ctx = context("dpo", one, tmp_path / "one", "llmcore.align.dpo")
    ra = train_dpo(a, kept[:8], refs[:8], kept[8:], refs[8:], rows, one, ctx, seed=3)
    four = dataclasses.replace(one, grad_accum=4)
    ctx4 = context("dpo", four, tmp_path / "four", "llmcore.align.dpo")
    rb = train_dpo(b, kept[:8], refs[:8], kept[8:], refs[8:], rows, four, ctx4, seed=3)
    assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rb.history],
                                                             abs=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_grpo_resumed_after_a_lost_checkpoint_equals_the_uninterrupted_run(tiny_tokenizer,
                                                                           tmp_path):
    tasks = [{"messages": [{"role": "user", "content": f"say yes {i}"},
                           {"role": "assistant", "content": "yes"}], "answer": "yes"}
             for i in range(8)]
    cfg = RLConfig(max_steps=4, prompts_per_step=2, group_size=3, max_new_tokens=4,
                   lr=1e-3, checkpoint_every=2, grad_accum=2, temperature=1.5)
    full_model, ref = tiny(2), tiny(2)
    full = train_grpo(full_model, ref, tiny_tokenizer, tasks, cfg,
                      context("rl", cfg, tmp_path / "a", "llmcore.align.grpo"), seed=3)
    run_b = tiny(2)
    ctx = context("rl", cfg, tmp_path / "b", "llmcore.align.grpo")
    train_grpo(run_b, ref, tiny_tokenizer, tasks, cfg, ctx, seed=3)
    assert drop_last_checkpoint(ctx) == 2
    resumed_model = tiny(6)
    resumed = train_grpo(resumed_model, ref, tiny_tokenizer, tasks, cfg,
                         context("rl", cfg, tmp_path / "b", "llmcore.align.grpo"), seed=3)
    assert resumed.resumed_from == 2
    assert resumed.history == full.history
    for (k, a), (_, b) in zip(full_model.state_dict().items(),
                              resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_changed_params_do_not_resume_and_must_says_why(tiny_tokenizer, tmp_path):
    kept, rows, refs = pairs(tiny_tokenizer)
    cfg = DPOConfig(max_steps=2, warmup_steps=1, batch_size=4, eval_every=2, checkpoint_every=1)
    train_dpo(tiny(2), kept[:8], refs[:8], kept[8:], refs[8:], rows, cfg,
              context("dpo", cfg, tmp_path, "llmcore.align.dpo"), seed=3)
    again = train_dpo(tiny(2), kept[:8], refs[:8], kept[8:], refs[8:], rows, cfg,
                      context("dpo", cfg, tmp_path, "llmcore.align.dpo"), seed=3)
    assert again.resumed_from == 2  # finished: nothing left to train
    other = dataclasses.replace(cfg, lr=2e-4, resume="must")
    with pytest.raises(UserError, match="dpo.resume is must but"):
        train_dpo(tiny(2), kept[:8], refs[:8], kept[8:], refs[8:], rows, other,
                  context("dpo", other, tmp_path, "llmcore.align.dpo"), seed=3)


def test_dpo_and_grpo_send_their_curves_to_the_tracker(tiny_tokenizer, tmp_path):
    """Each step's row goes to the run's tracker (MLflow in the stages) at its step, as
    pretraining's and SFT's do, and DPO's held-out evaluations as val_ metrics."""
    kept, rows, refs = pairs(tiny_tokenizer)
    cfg = DPOConfig(max_steps=4, warmup_steps=1, batch_size=4, eval_every=2,
                    checkpoint_every=10, log_every=10)
    tracker = NullTracker()
    ctx = policy_context("dpo", cfg, seed=3, device=torch.device("cpu"), dtype="float32",
                         data={"toy": 1}, code=["llmcore.align.dpo"], log=lambda m: None,
                         tracker=tracker)
    result = train_dpo(tiny(2), kept[:8], refs[:8], kept[8:], refs[8:], rows, cfg, ctx, seed=3)
    train_steps = [s for s, m in tracker.metrics if "dpo/loss" in m]
    assert train_steps == [1, 2, 3, 4]
    assert [m["dpo/loss"] for s, m in tracker.metrics if "dpo/loss" in m] == \
        [r["loss"] for r in result.history]
    assert [s for s, m in tracker.metrics if "dpo/val_reward_accuracy" in m] == [2, 4]
    tasks = [{"messages": [{"role": "user", "content": f"say yes {i}"},
                           {"role": "assistant", "content": "yes"}], "answer": "yes"}
             for i in range(4)]
    rl = RLConfig(max_steps=3, prompts_per_step=2, group_size=2, max_new_tokens=3)
    tracker = NullTracker()
    ctx = policy_context("rl", rl, seed=3, device=torch.device("cpu"), dtype="float32",
                         data={"toy": 1}, code=["llmcore.align.grpo"], log=lambda m: None,
                         tracker=tracker)
    train_grpo(tiny(2), tiny(2), tiny_tokenizer, tasks, rl, ctx, seed=3)
    assert [s for s, _ in tracker.metrics] == [1, 2, 3]
    assert {"rl/reward", "rl/exact", "rl/kl", "rl/loss"} <= set(tracker.metrics[0][1])
