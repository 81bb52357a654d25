"""What DPO and GRPO share: replies as token rows and their log-probabilities.

* :func:`reply_rows` turns (prompt messages, reply text) into right-padded token rows with a
  mask on the reply's tokens and its closing ``<|im_end|>`` (the tokens a policy is judged on).
  Prompts are encoded as plain text (no control tokens from content), as at serving time.
* :func:`sequence_logprobs` sums log p(token | prefix) over the masked tokens of each row:
  the log-probability of the whole reply, differentiable when the model is.
* :func:`sampled_kl`: the policy's KL from the reference on replies it samples itself.

The tasks' answer checks (:func:`llmcore.data.tasks.is_correct`) live with the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmcore.data.tokenizer import LLMTokenizer
from llmcore.model.protocols import LanguageModel


def reply_rows(tok: LLMTokenizer, items: Sequence[tuple[Sequence[dict[str, str]], str]],
               max_len: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids (B, T), mask (B, T) on reply tokens, kept indices) for (prompt, reply) pairs.

    Items whose prompt + reply + ``<|im_end|>`` exceed ``max_len`` tokens are left out (their
    indices are not in the returned list).
    """
    rows, masks, kept = [], [], []
    for i, (prompt, reply) in enumerate(items):
        p = tok.encode_prompt(prompt)
        r = tok.encode_text(reply) + [tok.im_end_id]
        if len(p) + len(r) > max_len:
            continue
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
        kept.append(i)
    if not rows:
        return (torch.zeros(0, 1, dtype=torch.long, device=device),
                torch.zeros(0, 1, dtype=torch.bool, device=device), kept)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for j, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), mask.to(device), kept


def token_logprobs(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, shape (B, T - 1), in fp32."""
    logits = model(ids[:, :-1]).float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None])[..., 0]


def sequence_logprobs(model: LanguageModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's masked tokens of log p(token | prefix): (B,)."""
    return (token_logprobs(model, ids) * mask[:, 1:]).sum(dim=1)


@torch.no_grad()
def batched_sequence_logprobs(model: LanguageModel, ids: torch.Tensor, mask: torch.Tensor,
                              batch_size: int = 32) -> torch.Tensor:
    """:func:`sequence_logprobs` without gradients, in chunks (the reference model's pass)."""
    model.eval()
    out = [sequence_logprobs(model, ids[i : i + batch_size], mask[i : i + batch_size])
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, device=ids.device)


def prompt_reply_rows(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad: int,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of prompt + reply ids, right-padded, and a (B, T - 1) float mask over the
    :func:`token_logprobs` positions whose target is a reply token."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width - 1)
    for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r))
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sampled_kl(policy: LanguageModel, ref: LanguageModel, tok: LLMTokenizer,
               prompts: Sequence[Sequence[dict[str, str]]], max_new_tokens: int, seed: int
               ) -> float:
    """KL(policy || reference) per reply, estimated on replies the policy samples
    (temperature 1): the mean over replies of the summed ``log pi - log pi_ref``."""
    from llmcore.infer.generate import Sampling, generate

    if not prompts:
        return float("nan")
    policy.eval()
    ref.eval()
    device = next(policy.parameters()).device
    ids = [tok.encode_prompt(p) for p in prompts]
    replies = generate(policy, ids, Sampling(max_new_tokens, temperature=1.0, seed=seed),
                       [tok.im_end_id, tok.eot_id], pad_id=tok.pad_id, keep_stop=True)
    keep = [i for i, r in enumerate(replies) if r]
    if not keep:
        return 0.0
    rows, mask = prompt_reply_rows([ids[i] for i in keep], [replies[i] for i in keep],
                                   tok.pad_id, device)
    diff = (token_logprobs(policy, rows) - token_logprobs(ref, rows)) * mask
    return float(diff.sum(dim=1).mean())
