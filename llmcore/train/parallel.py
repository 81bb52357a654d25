"""Sharded data parallelism (FSDP2): every rank holds 1/world of each weight, its gradient
and its optimizer state.

``parallel: fsdp`` applies :func:`torch.distributed.fsdp.fully_shard` to each block and then
to the whole model (which takes the embeddings, the final norm and the head). Each parameter
becomes a ``DTensor`` sharded on its first dimension; before a block's forward (and again for
its backward) its weights are all-gathered, and after the backward its gradients are
reduce-scattered, so a rank only ever holds the full weights of one block at a time, plus the
shards of everything. Optimizers see the shards: AdamW's moments are sharded for free; Muon
gathers each matrix's update to orthogonalise it (:mod:`llmcore.train.muon`).

What is given up against DDP: each block's weights travel twice per step (all-gather in
forward and backward) instead of the gradients once, so on a small model that fits a rank
easily DDP is faster; FSDP is for the model that does not fit. Evaluation runs its forward
on every rank (the weights must be gathered by all of them); rank 0 alone keeps the books.

Everything here is PyTorch's own machinery (``fully_shard``, ``DeviceMesh``, the
``torch.distributed.checkpoint.state_dict`` helpers); this module only decides what is
sharded and turns the sharded state into the plain tensors a model directory holds.
"""

from __future__ import annotations

import typing

import torch
from torch.distributed.tensor import DTensor

from llmcore.model.modeldir import state_dict_for_save
from llmcore.model.quant import tied_names

if typing.TYPE_CHECKING:
    from llmcore.config.model import ModelConfig
    from llmcore.train.optim import Optimizers


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int) -> None:
    """``fully_shard`` each block, then the root (embeddings, final norm, head), in place.

    Must run before the optimizer is built: it replaces the parameters by their shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    blocks: list[torch.nn.Module] = list(getattr(model, "blocks", list)())
    for block in blocks:  # one all-gather per block: the unit that is whole at a time
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Under FSDP, whether this backward reduce-scatters its gradients (False: accumulate
    unsharded until the last micro-batch, as DDP's ``no_sync``)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)


def as_float(value: torch.Tensor | float) -> float:
    """A scalar that may be a DTensor (the gradient norm of sharded gradients)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights as plain CPU tensors, in the layout of a model directory.

    Under FSDP this is a collective (every rank must call it); rank 0 gets the weights,
    the others an empty dict. Without sharding it is :func:`state_dict_for_save`.
    """
    if not is_sharded(model):
        return state_dict_for_save(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    tied = tied_names(model)  # one tensor per tied matrix, as state_dict_for_save writes
    return {k: typing.cast(torch.Tensor, v).detach().contiguous() for k, v in full.items()
            if k not in tied}


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | Optimizers
                ) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards)."""

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    params = {id(p): p for p in model.parameters()}.values()
    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer": 0}
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        for state in opt.state.values():
            out["optimizer"] += sum(nbytes(v) for v in state.values()
                                    if isinstance(v, torch.Tensor) and v.ndim > 0)
    return out


def memory_per_rank(cfg: ModelConfig, world_size: int, parallel: str, optimizer: str,
                    bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state one rank holds, from the model's
    shapes alone (built on the meta device: nothing is allocated).

    ``ddp``: every rank holds everything. ``fsdp``: each parameter is cut into ``world_size``
    chunks along its first dimension (``torch.chunk``'s sizes; rank 0 holds the largest).
    Optimizer state: AdamW two moments per value, Muon one momentum (``optimizer: muon`` puts
    the blocks' matrices under Muon, the rest under AdamW). Left out: activations, the one
    block FSDP gathers at a time, DDP's gradient buckets (see docs/distributed.md).
    """
    from llmcore.model.transformer import Transformer
    from llmcore.train.optim import muon_params

    with torch.device("meta"):
        model = Transformer(cfg)
    muon = {id(p) for p in muon_params(model)} if optimizer == "muon" else set()
    out = {"params": 0, "grads": 0, "optimizer": 0}
    for p in {id(p): p for p in model.parameters()}.values():
        n = p.numel()
        if parallel == "fsdp":
            rows = -(-p.shape[0] // world_size)  # ceil: torch.chunk's first (largest) chunk
            n = rows * (p.numel() // p.shape[0])
        out["params"] += n * bytes_per_value
        out["grads"] += n * bytes_per_value
        out["optimizer"] += n * bytes_per_value * (1 if id(p) in muon else 2)
    return out
