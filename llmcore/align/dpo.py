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

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmcore.align.replies import batched_sequence_logprobs, reply_rows, sequence_logprobs
from llmcore.align.run import rng_from_json, rng_to_json
from llmcore.config.dpo import DPOConfig
from llmcore.data.corpus import ConversationRow, Preference, expected_answer
from llmcore.data.tasks import is_correct, wrong_reply
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.infer.generate import Sampling, generate
from llmcore.model.protocols import LanguageModel
from llmcore.model.transformer import Transformer
from llmcore.train.checkpoint import Loaded
from llmcore.train.step import OptimizerStep, RunContext, StepLoop


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


def encode_pairs(tok: LLMTokenizer, pairs: Sequence[Preference], max_len: int,
                 device: torch.device | str = "cpu") -> tuple[list[Preference], Rows]:
    """Pairs whose both replies fit ``max_len``, and a function giving a batch's rows."""
    chosen = [(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [(p["prompt"], p["rejected"]) for p in pairs]
    fits = set(reply_rows(tok, chosen, max_len)[2]) & set(reply_rows(tok, rejected, max_len)[2])
    kept = [p for i, p in enumerate(pairs) if i in fits]

    def rows(batch: Sequence[Preference]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [(p["prompt"], p["chosen"]) for p in batch] + \
                [(p["prompt"], p["rejected"]) for p in batch]
        ids, mask, _ = reply_rows(tok, items, max_len, device)
        return ids, mask

    return kept, rows


def reference_logprobs(ref_model: LanguageModel, pairs: Sequence[Preference], rows: Rows,
                       batch_size: int = 32) -> list[tuple[float, float]]:
    """(log pi_ref(chosen), log pi_ref(rejected)) per pair, computed once."""
    out: list[tuple[float, float]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        ids, mask = rows(chunk)
        lp = batched_sequence_logprobs(ref_model, ids, mask).tolist()
        out += list(zip(lp[: len(chunk)], lp[len(chunk) :], strict=True))
    return out


Rows = Callable[[Sequence[Preference]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DPOResult:
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training time over every session of the run
    resumed_from: int | None = None


@torch.no_grad()
def pair_metrics(model: LanguageModel, pairs: Sequence[Preference],
                 refs: Sequence[tuple[float, float]],
                 rows: Rows, beta: float, batch_size: int = 32) -> dict[str, float]:
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


def _pair_loss(model: Transformer, stepper: OptimizerStep, batch: list[Preference],
               refs: list[tuple[float, float]], rows: Rows, cfg: DPOConfig, step_pairs: int,
               parts: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """One micro-batch's DPO loss, weighted by its share of the step's pairs."""
    x, mask = rows(batch)
    ref = torch.tensor(refs, device=x.device)
    with stepper.autocast():
        lp = sequence_logprobs(model, x, mask)
    n_chosen = mask[: len(batch)].sum(dim=1).clamp(min=1)
    loss, r = dpo_loss(lp[: len(batch)], lp[len(batch) :], ref[:, 0], ref[:, 1], cfg.beta,
                       cfg.nll_coef, n_chosen)
    weight = len(batch) / step_pairs  # the micro-batches' means add up to the step's mean
    parts.append((float(loss.detach()) * weight, (r["chosen"] > r["rejected"]).float()))
    return loss * weight if weight != 1 else loss


def train_dpo(model: Transformer, train: Sequence[Preference],
              train_ref: Sequence[tuple[float, float]], val: Sequence[Preference],
              val_ref: Sequence[tuple[float, float]], rows: Rows, cfg: DPOConfig,
              ctx: RunContext, seed: int) -> DPOResult:
    """DPO on the trainable parameters of ``model`` through the shared optimizer step.

    Each step takes ``cfg.batch_size`` pairs from a seeded shuffle (reshuffled when it runs
    out), split into ``cfg.grad_accum`` micro-batches weighted by their share of the pairs.
    With ``ctx.checkpoints`` the run checkpoints every ``cfg.checkpoint_every`` steps and
    resumes from the newest one of the same configuration.
    """
    stepper = OptimizerStep(model, cfg, ctx)
    loop = StepLoop(ctx, cfg, cfg.eval_every)
    rng = random.Random(seed)
    order: list[int] = []
    result, start = DPOResult(), 0

    def load(loaded: Loaded) -> None:
        nonlocal order, start
        rng_from_json(rng, loaded.state["rng"])
        order = [int(i) for i in loaded.state["order"]]
        result.history = list(loaded.state["history"])
        result.evals = list(loaded.state["evals"])
        result.seconds = float(loaded.state["train_seconds"])
        start = loaded.step

    loaded = stepper.restore(load)
    result.resumed_from = loaded.step if loaded is not None else None
    loop.start(result.seconds)
    for step in range(start, cfg.max_steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        take, order = order[: cfg.batch_size], order[cfg.batch_size :]
        lr = stepper.set_lr(step)
        model.train()
        chunk = cfg.batch_size // cfg.grad_accum
        parts: list[tuple[float, torch.Tensor]] = []  # (weighted loss, chosen > rejected)
        micro = [functools.partial(_pair_loss, model, stepper, [train[i] for i in ids],
                                   [train_ref[i] for i in ids], rows, cfg, len(take), parts)
                 for ids in (take[i : i + chunk] for i in range(0, len(take), chunk))]
        stepper.backward(model, micro)
        loss = sum(p[0] for p in parts)
        norm = stepper.update(loss, step + 1)
        acc = float(torch.cat([p[1] for p in parts]).mean())
        result.history.append({"step": step + 1, "loss": round(loss, 5),
                               "reward_accuracy": round(acc, 4), "grad_norm": norm, "lr": lr})
        loop.curve(result.history[-1])
        if loop.progress.due(step + 1):
            loop.progress.report(step + 1, [f"loss {loss:.4f}", f"reward accuracy {acc:.3f}",
                                            f"lr {lr:.2e}", f"grad {norm:.2f}"],
                                 *loop.progress.lap())
        if loop.eval_due(step + 1):
            m = pair_metrics(model, val, val_ref, rows, cfg.beta) if val else {}
            result.evals.append({"step": step + 1, **{k: round(v, 5) for k, v in m.items()}})
            loop.curve(result.evals[-1], "val_")
            ctx.log(f"{ctx.name} step {step + 1}: held-out reward accuracy "
                    f"{m.get('reward_accuracy', float('nan')):.3f} margin "
                    f"{m.get('reward_margin', float('nan')):.3f}")
        if loop.checkpoint_due(step + 1):
            result.seconds = loop.clock()
            stepper.save(step + 1, {"rng": rng_to_json(rng), "order": order,
                                    "history": result.history, "evals": result.evals,
                                    "train_seconds": result.seconds})
    result.seconds = loop.clock()
    return result


@torch.no_grad()
def task_pairs(model: LanguageModel, tok: LLMTokenizer, conversations: Sequence[ConversationRow],
               max_new_tokens: int, seed: int, batch_size: int = 64
               ) -> tuple[list[Preference], int]:
    """On-policy preference pairs from task conversations (with an ``answer``): the reference
    reply against the model's own greedy reply when that ends wrong, else against the
    reference with a plausible wrong final answer. Returns the pairs and how many rejected replies are the model's own."""
    rng = random.Random(seed)
    stops = [tok.im_end_id, tok.eot_id]
    pairs: list[Preference] = []
    own = 0
    convs = [c for c in conversations if c.get("answer") and c["task"] != "doc"]
    for i in range(0, len(convs), batch_size):
        chunk = convs[i : i + batch_size]
        prompts = [tok.encode_prompt(c["messages"][:-1]) for c in chunk]
        outs = generate(model, prompts, Sampling(max_new_tokens=max_new_tokens), stops,
                        pad_id=tok.pad_id)
        for conv, out in zip(chunk, outs, strict=True):
            reply = tok.decode(out)  # as produced, an empty or blank one included
            wrong = not is_correct(reply, expected_answer(conv))
            chosen = conv["messages"][-1]["content"]  # the reference reply, working included
            rejected = reply if wrong else wrong_reply(conv["task"], chosen,
                                                       expected_answer(conv), rng)
            own += wrong
            pairs.append({"prompt": conv["messages"][:-1], "chosen": chosen,
                          "rejected": rejected, "task": conv["task"],
                          "source": "builtin:on-policy" if wrong else "builtin:corrupted"})
    return pairs, own
