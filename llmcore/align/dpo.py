"""Direct Preference Optimisation (Rafailov et al., 2023) against a frozen reference.

For a prompt x with a preferred reply y_w and a rejected one y_l, with the policy pi and the
reference pi_ref (the SFT model, frozen):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x))
                                - (log pi(y_l|x) - log pi_ref(y_l|x))])

The log-probabilities are sums over the reply's tokens only (the prompt is context, not
judged). The reference's log-probs never change, so they are computed once before training
and cached: the reference model is not kept in memory while the policy trains. The implicit
rewards ``beta * (log pi - log pi_ref)`` give the metrics: reward accuracy (chosen above
rejected) and margin on held-out pairs.

Builtin pairs come from the checkable tasks and are on-policy: :func:`task_pairs` asks the SFT
model itself and, where its greedy answer is wrong, prefers the right answer to *that* answer;
where it is right, the rejected reply is a plausible wrong one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmcore.align.replies import batched_sequence_logprobs, reply_rows, sequence_logprobs
from llmcore.data.tasks import is_correct, wrong_answer
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.infer.generate import Sampling, generate
from llmcore.train.optim import lr_at


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, nll_coef: float = 0.0,
             chosen_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over pairs, and per-pair implicit rewards (B,) for the metrics.

    ``nll_coef`` > 0 adds that times the chosen replies' negative log-likelihood per token
    (RPO; TRL's ``rpo_alpha``): DPO alone can lower the probability of the chosen reply too,
    as long as the rejected one falls faster, which on exact-answer tasks loses right answers.
    """
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    if nll_coef:
        tokens = chosen_tokens if chosen_tokens is not None else torch.ones_like(pi_chosen)
        loss = loss + nll_coef * (-pi_chosen / tokens).mean()
    return loss, {"chosen": chosen_reward.detach(), "rejected": rejected_reward.detach()}


@dataclass
class PairBatch:
    """Chosen and rejected rows of the same pairs, stacked: rows i and i + n are pair i."""

    ids: torch.Tensor
    mask: torch.Tensor
    ref: torch.Tensor  # (2n,) reference log-probs of the rows
    n: int


def encode_pairs(tok: LLMTokenizer, pairs: Sequence[dict[str, Any]], max_len: int,
                 device: torch.device | str = "cpu") -> tuple[list[dict[str, Any]], Any]:
    """Pairs whose both replies fit ``max_len``, and a function giving a batch's rows."""
    chosen = [(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [(p["prompt"], p["rejected"]) for p in pairs]
    fits = set(reply_rows(tok, chosen, max_len)[2]) & set(reply_rows(tok, rejected, max_len)[2])
    kept = [p for i, p in enumerate(pairs) if i in fits]

    def rows(batch: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [(p["prompt"], p["chosen"]) for p in batch] + \
                [(p["prompt"], p["rejected"]) for p in batch]
        ids, mask, _ = reply_rows(tok, items, max_len, device)
        return ids, mask

    return kept, rows


def reference_logprobs(ref_model: Any, pairs: Sequence[dict[str, Any]], rows: Callable,
                       batch_size: int = 32) -> list[tuple[float, float]]:
    """(log pi_ref(chosen), log pi_ref(rejected)) per pair, computed once."""
    out: list[tuple[float, float]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        ids, mask = rows(chunk)
        lp = batched_sequence_logprobs(ref_model, ids, mask).tolist()
        out += list(zip(lp[: len(chunk)], lp[len(chunk) :], strict=True))
    return out


@dataclass
class DPOSettings:
    beta: float = 0.1
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 10
    max_steps: int = 100
    batch_size: int = 16
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 25
    nll_coef: float = 0.0
    seed: int = 1337
    schedule: str = "cosine"  # read by llmcore.train.optim.lr_at, the training loop's schedule
    decay_fraction: float = 0.2


@dataclass
class DPOResult:
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def pair_metrics(model: Any, pairs: Sequence[dict[str, Any]], refs: Sequence[tuple[float, float]],
                 rows: Callable, beta: float, batch_size: int = 32) -> dict[str, float]:
    """Held-out DPO loss, reward accuracy (ties count half) and mean reward margin."""
    model.eval()
    losses, correct, margins = [], 0.0, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        ids, mask = rows(chunk)
        lp = sequence_logprobs(model, ids, mask)
        ref = torch.tensor(refs[i : i + len(chunk)], device=lp.device)
        loss, r = dpo_loss(lp[: len(chunk)], lp[len(chunk) :], ref[:, 0], ref[:, 1], beta)
        losses.append(loss.item() * len(chunk))
        diff = r["chosen"] - r["rejected"]
        correct += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        margins += diff.tolist()
    n = max(1, len(pairs))
    return {"loss": sum(losses) / n, "reward_accuracy": correct / n,
            "reward_margin": sum(margins) / n}


def train_dpo(model: Any, train: Sequence[dict[str, Any]], train_ref: Sequence[tuple[float, float]],
              val: Sequence[dict[str, Any]], val_ref: Sequence[tuple[float, float]],
              rows: Callable, s: DPOSettings, log: Callable[[str], None] = print) -> DPOResult:
    """AdamW on the trainable parameters of ``model``; warmup + cosine; clipped gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    rng = random.Random(s.seed)
    order: list[int] = []
    result, start = DPOResult(), time.perf_counter()
    for step in range(s.max_steps):
        if len(order) < s.batch_size:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        take, order = order[: s.batch_size], order[s.batch_size :]
        batch = [train[i] for i in take]
        ids, mask = rows(batch)
        ref = torch.tensor([train_ref[i] for i in take], device=ids.device)
        model.train()
        lp = sequence_logprobs(model, ids, mask)
        n_chosen = mask[: len(batch)].sum(dim=1).clamp(min=1)
        loss, r = dpo_loss(lp[: len(batch)], lp[len(batch) :], ref[:, 0], ref[:, 1], s.beta,
                           s.nll_coef, n_chosen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else 1e9)
        opt.step()
        acc = float((r["chosen"] > r["rejected"]).float().mean())
        result.history.append({"step": step + 1, "loss": round(loss.item(), 5),
                               "reward_accuracy": round(acc, 4), "grad_norm": float(norm),
                               "lr": lr_at(step, s)})
        if (step + 1) % s.eval_every == 0 or step + 1 == s.max_steps:
            m = pair_metrics(model, val, val_ref, rows, s.beta) if val else {}
            result.evals.append({"step": step + 1, **{k: round(v, 5) for k, v in m.items()}})
            elapsed = time.perf_counter() - start
            log(f"dpo: step {step + 1}/{s.max_steps} loss {loss.item():.4f} held-out reward "
                f"accuracy {m.get('reward_accuracy', float('nan')):.3f} margin "
                f"{m.get('reward_margin', float('nan')):.3f} ({elapsed:.0f} s, ETA "
                f"{elapsed / (step + 1) * (s.max_steps - step - 1):.0f} s)")
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def task_pairs(model: Any, tok: LLMTokenizer, conversations: Sequence[dict[str, Any]],
               max_new_tokens: int, seed: int, batch_size: int = 64
               ) -> tuple[list[dict[str, Any]], int]:
    """On-policy preference pairs from task conversations (with an ``answer``): the right
    answer against the model's own greedy answer when that is wrong, else against a plausible
    wrong one. Returns the pairs and how many rejected replies are the model's own."""
    rng = random.Random(seed)
    stops = [tok.im_end_id, tok.eot_id]
    pairs, own = [], 0
    convs = [c for c in conversations if c.get("answer") and c["task"] != "doc"]
    for i in range(0, len(convs), batch_size):
        chunk = convs[i : i + batch_size]
        prompts = [tok.encode_prompt(c["messages"][:-1]) for c in chunk]
        outs = generate(model, prompts, Sampling(max_new_tokens=max_new_tokens), stops,
                        pad_id=tok.pad_id)
        for conv, out in zip(chunk, outs, strict=True):
            reply = tok.decode(out)  # as produced, an empty or blank one included
            wrong = not is_correct(reply, conv["answer"])
            rejected = reply if wrong else wrong_answer(conv["task"], conv["answer"], rng)
            own += wrong
            pairs.append({"prompt": conv["messages"][:-1], "chosen": conv["answer"],
                          "rejected": rejected, "task": conv["task"],
                          "source": "builtin:on-policy" if wrong else "builtin:corrupted"})
    return pairs, own
