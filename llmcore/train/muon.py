"""Muon: momentum, then an orthogonalised update, for the 2-D weights inside the blocks.

Each step keeps a momentum buffer ``B = mu B + (1 - mu) g`` (Nesterov: the update is
``g + mu (B - g)``), replaces the update by the nearest semi-orthogonal matrix (all its
singular values pushed towards 1, so every direction of the matrix moves at a similar rate),
decays the weight and adds the update scaled to AdamW's RMS (``0.2 sqrt(max(rows, cols))``),
so one learning rate drives Muon and AdamW alike.

The orthogonalisation is a quintic Newton-Schulz iteration (coefficients of Keller Jordan's
Muon): five steps of ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, on ``X`` normalised to
spectral norm <= 1. It does not reach ``U V^T`` exactly (singular values end in about
[0.7, 1.2]), which does not hurt training and costs 15 matrix products per weight.

Why not ``torch.optim.Muon`` as is: it always iterates in bf16. That is the fast choice where
bf16 is native, and a cliff where it is emulated (measured: one iteration on a 256 x 704 matrix
0.49 s in bf16 against ~10 ms in fp32 on an AVX2 CPU). Here the dtype is a parameter, decided by
:func:`llmcore.device.precision`; in bf16 this class computes exactly what torch's does (same
operations in the same order; a test holds them bit-equal), and it keeps torch's state layout
(``momentum_buffer``), so checkpoints of either load into the other.

Under FSDP each parameter is a shard (a ``DTensor``): the momentum stays sharded, and the
update is gathered whole for the iteration (:meth:`Muon._orthogonalise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5,
                  coefficients: tuple[float, float, float] = COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(m, n) -> (m, n) near-orthogonal, in ``dtype``: ``U S' V^T`` with S' around 1."""
    if g.ndim != 2:
        raise ValueError(f"Newton-Schulz takes a matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype, copy=True)  # a copy: the in-place steps must not touch the momentum
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide side: A = X X^T is then the smaller Gram matrix
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # Frobenius >= spectral norm: now spectral <= 1
    for _ in range(steps):
        gram = x @ x.T                                     # (m, m), m = min(rows, cols)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)                # a X + (b A + c A^2) X
    return x.T if tall else x


def rms_matched_lr(lr: float, shape: torch.Size) -> float:
    """The learning rate that gives an orthogonal update AdamW's typical RMS (~0.2)."""
    return lr * 0.2 * math.sqrt(max(shape[0], shape[1]))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; ``ns_dtype`` is the dtype of the Newton-Schulz iteration."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, eps: float = 1e-7,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("Muon: lr, momentum and weight_decay must be >= 0")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "nesterov": nesterov, "ns_steps": ns_steps, "eps": eps}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # not state: a resume on other hardware may pick another
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got {tuple(p.shape)}")

    def _orthogonalise(self, update: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        if not isinstance(update, DTensor):
            return newton_schulz(update, group["ns_steps"], COEFFICIENTS, group["eps"],
                                 self.ns_dtype)
        # an FSDP shard: the iteration needs the whole matrix. Every rank gathers it, runs the
        # same iteration and keeps its own rows (no second communication). The trade-off: the
        # Newton-Schulz flops are repeated on every rank instead of split among them
        whole = newton_schulz(update.full_tensor(), group["ns_steps"], COEFFICIENTS,
                              group["eps"], self.ns_dtype)
        return distribute_tensor(whole, update.device_mesh, update.placements,
                                 src_data_rank=None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)                  # B = mu B + (1 - mu) g
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = self._orthogonalise(update, group)
                p.mul_(1 - lr * group["weight_decay"])    # decoupled weight decay
                p.add_(update, alpha=-rms_matched_lr(lr, p.shape))
        return loss
