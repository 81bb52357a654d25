"""``compile: true``: the transformer blocks compiled one by one ("regional" compilation).

Why blocks and not the whole model: the blocks hold the small elementwise ops (norms, RoPE,
SiLU, residual adds) that a compiler fuses, and every block runs the same code, so one graph
serves them all. The embedding and the head stay eager, so SFT keeps its loss-mask head (logits
only where a loss is taken, a data-dependent shape that a whole-model graph cannot keep).
``benchmarks/compile_step.py`` measures the three ways (``reports/compile_step.json``,
docs/training.md#compile), and what building the kernels costs.

Each block is compiled in place (``nn.Module.compile``): the weights, their names and the
state dict stay those of the eager model. Leaving :func:`compiled_blocks` undoes it, so the
same model object then decodes with a KV cache eagerly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


def missing_compiler(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None if it can."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")  # the compiler TorchInductor's C++ backend calls
        return None if shutil.which(cxx) else f"no C++ compiler ({cxx!r}) on PATH"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    return f"torch.compile is not used on {device.type}"


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[nn.Module], device: torch.device,
                    log: Callable[[str], None]) -> Iterator[bool]:
    """Compile each of ``blocks`` in place for the duration of the ``with``; yields whether
    they were compiled (False, with the reason logged, where no compiler is available)."""
    if not blocks:
        yield False
        return
    reason = missing_compiler(device)
    if reason is not None:
        log(f"compile: {reason}; training eagerly")
        yield False
        return
    for block in blocks:
        block.compile()
    log(f"compile: {len(blocks)} blocks compiled (the first steps also build their kernels)")
    try:
        yield True
    finally:
        for block in blocks:
            # what nn.Module.compile set: None is the module's eager call again
            block._compiled_call_impl = None
