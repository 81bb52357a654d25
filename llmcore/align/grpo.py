"""GRPO: reinforcement learning with verifiable rewards (Shao et al., 2024, DeepSeekMath).

Each step takes a few task prompts, samples a *group* of G replies per prompt from the current
policy (batched, with the KV cache), and scores each reply: 1 for the exact answer, 0
otherwise, minus a small penalty when it does not end with ``<|im_end|>``. A reply's advantage
is its reward normalised within its group, ``(r - mean) / (std + eps)``: no value network, the
group is the baseline. A group whose replies all score the same teaches nothing and gets zero
advantage. The loss per token is PPO's clipped surrogate with the probability ratio against
the policy that sampled (``old``), plus ``kl_coef`` times the k3 estimate of the KL divergence to
the frozen reference, ``exp(ref - pi) - (ref - pi) - 1``; tokens are averaged per reply, replies
averaged over the batch.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmcore.align.replies import prompt_reply_rows, token_logprobs
from llmcore.align.run import rng_from_json, rng_to_json
from llmcore.config.rl import RLConfig
from llmcore.data.corpus import ConversationRow, expected_answer
from llmcore.data.tasks import is_correct
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.infer.generate import Sampling, generate
from llmcore.model.transformer import Transformer
from llmcore.train.checkpoint import Loaded
from llmcore.train.step import OptimizerStep, RunContext, StepLoop


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> advantages normalised within each group (row)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float, beta: float
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + beta * KL(k3), per token (B, T), mean over each reply's tokens."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1
    per_token = -(surrogate - beta * kl)
    counts = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / counts).mean()
    with torch.no_grad():
        kl_mean = float(((kl * mask).sum(dim=1) / counts).mean())
        policy = float((-(surrogate * mask).sum(dim=1) / counts).mean())
    return loss, {"kl": kl_mean, "policy_loss": policy}


def reward(reply_ids: Sequence[int], answer: str, tok: LLMTokenizer,
           no_end_penalty: float) -> float:
    ended = bool(reply_ids) and reply_ids[-1] == tok.im_end_id
    text = tok.decode([t for t in reply_ids if t not in (tok.im_end_id, tok.eot_id)])
    return float(is_correct(text, answer)) - (0.0 if ended else no_end_penalty)


@dataclass
class GRPOResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training time over every session of the run
    resumed_from: int | None = None


def _sample(model: Transformer, tok: LLMTokenizer, batch: Sequence[ConversationRow],
            cfg: RLConfig, seed: int, step: int
            ) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """(prompts repeated per reply, the G replies per prompt, (P, G) rewards)."""
    prompts = [tok.encode_prompt(c["messages"][:-1]) for c in batch]
    expanded = [p for p in prompts for _ in range(cfg.group_size)]
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        seed=seed * 100_003 + step)
    model.eval()
    replies = generate(model, expanded, sampling, [tok.im_end_id, tok.eot_id],
                       pad_id=tok.pad_id, keep_stop=True)
    rewards = torch.tensor([[reward(replies[i * cfg.group_size + g], expected_answer(c), tok,
                                    cfg.no_end_penalty) for g in range(cfg.group_size)]
                            for i, c in enumerate(batch)])
    return expanded, replies, rewards


def _surrogate(model: Transformer, stepper: OptimizerStep, ids: torch.Tensor,
               mask: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor,
               cfg: RLConfig, weight: float, stats: list[dict[str, float]]) -> torch.Tensor:
    """One micro-batch's GRPO loss, weighted by its share of the step's replies."""
    with stepper.autocast():
        logp = token_logprobs(model, ids)
    loss, s = grpo_loss(logp, old, ref, adv, mask, cfg.clip, cfg.kl_coef)
    stats.append({"loss": float(loss.detach()) * weight, "kl": s["kl"] * weight})
    return loss * weight if weight != 1 else loss


def _update(model: Transformer, ref_model: Transformer, stepper: OptimizerStep, cfg: RLConfig,
            pad_id: int, expanded: list[list[int]], replies: list[list[int]],
            rewards: torch.Tensor, step: int) -> tuple[float, float]:
    """``cfg.inner_epochs`` optimizer updates on one sampled batch; (loss, KL) of the last."""
    device = next(model.parameters()).device
    adv = group_advantages(rewards).flatten().to(device)
    keep = [i for i, r in enumerate(replies) if r]  # an empty reply has no token to score
    ids, mask = prompt_reply_rows([expanded[i] for i in keep], [replies[i] for i in keep],
                                  pad_id, device)
    with torch.no_grad(), stepper.autocast():  # the sampling policy's and the reference's
        old = token_logprobs(model, ids)
        ref = token_logprobs(ref_model, ids)
    model.train()
    chunk = max(1, -(-len(keep) // cfg.grad_accum))
    loss, stats = 0.0, list[dict[str, float]]()
    for _ in range(cfg.inner_epochs):
        stats = []
        micro = [functools.partial(_surrogate, model, stepper, ids[i : i + chunk],
                                   mask[i : i + chunk], old[i : i + chunk], ref[i : i + chunk],
                                   adv[keep][i : i + chunk], cfg,
                                   len(ids[i : i + chunk]) / len(keep), stats)
                 for i in range(0, len(keep), chunk)]
        stepper.backward(model, micro)
        loss = sum(s["loss"] for s in stats)
        stepper.update(loss, step + 1)
    return loss, sum(s["kl"] for s in stats)


def train_grpo(model: Transformer, ref_model: Transformer, tok: LLMTokenizer,
               tasks: Sequence[ConversationRow], cfg: RLConfig, ctx: RunContext, seed: int
               ) -> GRPOResult:
    """GRPO on task conversations (``messages`` ending in the reference reply, ``answer``).

    Each of ``cfg.max_steps`` steps samples a group of replies per prompt, then makes
    ``cfg.inner_epochs`` optimizer updates through the shared step (the replies split into
    ``cfg.grad_accum`` micro-batches). With ``ctx.checkpoints`` the run checkpoints every
    ``cfg.checkpoint_every`` steps and resumes from the newest one of its configuration.
    """
    stepper = OptimizerStep(model, cfg, ctx)
    loop = StepLoop(ctx, cfg)
    rng = random.Random(seed)
    result, start = GRPOResult(), 0

    def load(loaded: Loaded) -> None:
        nonlocal start
        rng_from_json(rng, loaded.state["rng"])
        result.history = list(loaded.state["history"])
        result.seconds = float(loaded.state["train_seconds"])
        start = loaded.step

    loaded = stepper.restore(load)
    result.resumed_from = loaded.step if loaded is not None else None
    ref_model.eval()
    loop.start(result.seconds)
    for step in range(start, cfg.max_steps):
        batch = rng.sample(list(tasks), min(cfg.prompts_per_step, len(tasks)))
        expanded, replies, rewards = _sample(model, tok, batch, cfg, seed, step)
        lr = stepper.set_lr(step)
        loss, kl = _update(model, ref_model, stepper, cfg, tok.pad_id, expanded, replies,
                           rewards, step)
        correct = float((rewards > 0.5).float().mean())
        row = {"step": step + 1, "reward": round(float(rewards.mean()), 5),
               "exact": round(correct, 5), "loss": round(loss, 6),
               "kl": round(kl, 6),
               "useful_groups": int((rewards.std(dim=1) > 0).sum())}
        result.history.append(row)
        loop.curve(row)
        if loop.progress.due(step + 1):
            loop.progress.report(step + 1, [
                f"mean reward {row['reward']:.3f}", f"exact {correct:.3f}",
                f"kl {row['kl']:.4f}", f"groups with signal {row['useful_groups']}/{len(batch)}",
                f"lr {lr:.2e}"], *loop.progress.lap())
        if loop.checkpoint_due(step + 1):
            result.seconds = loop.clock()
            stepper.save(step + 1, {"rng": rng_to_json(rng), "history": result.history,
                                    "train_seconds": result.seconds})
    result.seconds = loop.clock()
    return result
