"""Losses and bits per byte, shared by training (validation), alignment and evaluation.

* :func:`loss_sums`: the sum of masked token losses and the number of masked tokens. The loop
  divides by the token count of the whole optimizer step, not of each micro-batch, so that
  accumulation and DDP weigh every target token alike.
* :func:`heldout_loss`: mean loss and bits per byte over held-out rows. Bits per byte counts
  only targets that stand for text (special tokens have 0 bytes), so models with different
  tokenizers can be compared on it; loss per token cannot. A model trained with document
  masking is scored with it too (the same attention it learned with).
* :func:`unigram_bpb`: the floor any model must beat (token frequencies of the training rows).

Trade-off: every function walks the rows in order, with no sampling; the numbers are exact and
repeatable, and the caller bounds the cost with ``max_batches``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmcore.device import autocast
from llmcore.model.protocols import LanguageModel, RowDataset

LN2 = math.log(2.0)


def loss_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of masked token losses (nats) and the number of masked tokens."""
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                             reduction="none")  # (B*T,)
    m = mask.reshape(-1).to(losses.dtype)
    return (losses * m).sum(), m.sum()


def _rows(dataset: RowDataset, n: int, seq_len: int | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` rows as (ids, mask, segments), optionally re-cut into ``seq_len + 1``
    windows (whose documents are then counted from ``<|endoftext|>``)."""
    rows = dataset.gather(range(n))
    ids = torch.from_numpy(rows[0].astype("int64"))
    mask = (torch.ones_like(ids) if rows[1] is None
            else torch.from_numpy(rows[1].astype("int64")))
    if seq_len is None:
        return ids, mask, torch.from_numpy(dataset.segments(range(n), rows[0]).astype("int64"))
    # consecutive rows share one token: drop it, join, and cut longer windows
    stream = torch.cat([ids[0], ids[1:, 1:].reshape(-1)])
    mstream = torch.cat([mask[0], mask[1:, 1:].reshape(-1)])
    count = (len(stream) - 1) // seq_len
    idx = torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)[None]
    ids, mask = stream[idx], mstream[idx]
    return ids, mask, (ids == dataset.eot_id).cumsum(dim=1)


@torch.no_grad()
def heldout_loss(model: LanguageModel, dataset: RowDataset, batch_size: int, max_batches: int,
                 token_bytes: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 seq_len: int | None = None) -> dict[str, float]:
    """Mean loss (nats/token) and bits per byte over the first rows of ``dataset``.

    With ``seq_len`` the rows are joined and re-cut into windows of that length: the same text
    read with a longer context. An empty dataset gives NaN (there is nothing to measure).
    """
    was_training = model.training
    model.eval()
    n = min(len(dataset), batch_size * max_batches)
    if n == 0:
        return {"loss": math.nan, "bpb": math.nan, "tokens": 0.0, "bytes": 0.0}
    ids, mask, segments = _rows(dataset, n, seq_len)
    doc_mask = bool(getattr(getattr(model, "cfg", None), "doc_mask", False))
    tb = token_bytes.to(device)
    total_loss = total_tokens = total_bits_loss = total_bytes = 0.0
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size].to(device)  # (B, T+1)
        m = mask[start : start + batch_size, 1:].to(device)  # (B, T)
        seg = segments[start : start + batch_size, :-1].to(device) if doc_mask else None
        with autocast(device, dtype):
            logits = model(x[:, :-1], segments=seg) if doc_mask else model(x[:, :-1])
        targets = x[:, 1:]
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                 targets.reshape(-1), reduction="none").view_as(targets)
        nbytes = tb[targets] * m
        total_loss += float((losses * m).sum())
        total_tokens += float(m.sum())
        total_bits_loss += float((losses * (nbytes > 0)).sum())
        total_bytes += float(nbytes.sum())
    model.train(was_training)
    loss = total_loss / total_tokens if total_tokens else math.nan
    bpb = total_bits_loss / LN2 / total_bytes if total_bytes else math.nan
    return {"loss": loss, "bpb": bpb, "tokens": total_tokens, "bytes": total_bytes}


def unigram_bpb(train: RowDataset, val: RowDataset, token_bytes: torch.Tensor, vocab_size: int,
                max_rows: int = 100_000) -> float:
    """Bits per byte of a unigram model (add-one token frequencies of train) on val rows."""
    def counts(ds: RowDataset) -> torch.Tensor:
        ids, mask = ds.gather(range(min(len(ds), max_rows)))
        t = torch.from_numpy(ids[:, 1:].astype("int64")).reshape(-1)
        w = (torch.ones_like(t) if mask is None
             else torch.from_numpy(mask[:, 1:].astype("int64")).reshape(-1))
        return torch.bincount(t, weights=w.double(), minlength=vocab_size)

    c_train = counts(train) + 1.0
    logp = torch.log(c_train / c_train.sum())
    c_val = counts(val)
    text = token_bytes.double() > 0
    bits = -(c_val * logp * text).sum() / LN2
    nbytes = (c_val * token_bytes.double()).sum()
    return float(bits / nbytes) if float(nbytes) else math.nan
