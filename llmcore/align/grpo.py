"""GRPO: reinforcement learning with verifiable rewards (Shao et al., 2024, DeepSeekMath).

Each step takes a few task prompts, samples a *group* of G replies per prompt from the current
policy (batched, with the KV cache), and scores each reply: 1 for the exact answer, 0
otherwise, minus a small penalty when it does not end with ``<|im_end|>``. A reply's advantage
is its reward normalised within its group, ``(r - mean) / (std + eps)``: no value network, the
group is the baseline. A group whose replies all score the same teaches nothing and gets zero
advantage. The loss per token is PPO's clipped surrogate with the probability ratio against
the policy that sampled (``old``), plus ``beta`` times the k3 estimate of the KL divergence to
the frozen reference, ``exp(ref - pi) - (ref - pi) - 1``; tokens are averaged per reply, replies
averaged over the batch.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcore.align.replies import prompt_reply_rows, token_logprobs
from llmcore.data.tasks import is_correct
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.infer.generate import Sampling, generate


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
class GRPOSettings:
    max_steps: int = 30
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 24
    lr: float = 1e-5
    clip: float = 0.2
    beta: float = 0.04  # KL coefficient
    inner_epochs: int = 1  # optimisation passes over each sampled batch
    no_end_penalty: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337


@dataclass
class GRPOResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def train_grpo(model: Any, ref_model: Any, tok: LLMTokenizer, tasks: Sequence[dict[str, Any]],
               s: GRPOSettings, log: Callable[[str], None] = print) -> GRPOResult:
    """GRPO on task conversations (``messages`` ending in the reference reply, ``answer``)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(s.seed)
    stops = [tok.im_end_id, tok.eot_id]
    result, start = GRPOResult(), time.perf_counter()
    ref_model.eval()
    for step in range(s.max_steps):
        batch = rng.sample(list(tasks), min(s.prompts_per_step, len(tasks)))
        prompts = [tok.encode_prompt(c["messages"][:-1]) for c in batch]
        expanded = [p for p in prompts for _ in range(s.group_size)]
        sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            seed=s.seed * 100_003 + step)
        model.eval()
        replies = generate(model, expanded, sampling, stops, pad_id=tok.pad_id, keep_stop=True)
        rewards = torch.tensor([[reward(replies[i * s.group_size + g], c["answer"], tok,
                                        s.no_end_penalty) for g in range(s.group_size)]
                                for i, c in enumerate(batch)])
        adv = group_advantages(rewards).flatten().to(device)
        keep = [i for i, r in enumerate(replies) if r]  # an empty reply has no token to score
        ids, mask = prompt_reply_rows([expanded[i] for i in keep], [replies[i] for i in keep], tok.pad_id,
                          device)
        with torch.no_grad():
            old = token_logprobs(model, ids)
            ref = token_logprobs(ref_model, ids)
        stats: dict[str, float] = {}
        model.train()
        for _ in range(s.inner_epochs):
            logp = token_logprobs(model, ids)
            loss, stats = grpo_loss(logp, old, ref, adv[keep], mask, s.clip, s.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else 1e9)
            opt.step()
        correct = float((rewards > 0.5).float().mean())
        row = {"step": step + 1, "reward": round(float(rewards.mean()), 5),
               "exact": round(correct, 5), "loss": round(loss.item(), 6),
               "kl": round(stats["kl"], 6),
               "useful_groups": int((rewards.std(dim=1) > 0).sum())}
        result.history.append(row)
        elapsed = time.perf_counter() - start
        log(f"rl: step {step + 1}/{s.max_steps} mean reward {row['reward']:.3f} exact "
            f"{correct:.3f} kl {row['kl']:.4f} groups with signal {row['useful_groups']}/"
            f"{len(batch)} ({elapsed:.0f} s, ETA "
            f"{elapsed / (step + 1) * (s.max_steps - step - 1):.0f} s)")
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"rl: the loss is {loss.item()} at step {step + 1}; "
                                     "lower rl.lr")
    result.seconds = time.perf_counter() - start
    return result
