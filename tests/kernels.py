"""What the quantized-runtime tests share: the layer class ``auto`` loads for a large layer."""

from __future__ import annotations

import pytest
import torch


def kernel_or_skip(method: str) -> type:
    """The class ``load_quantized(..., "auto")`` gives a 704 x 256 layer quantized with
    ``method`` (int8 or int4, groups of 64) on this CPU; the test is skipped, with the
    reason, where ``auto`` expands it to float instead."""
    from llmcore.model.qlinear import (
        MIN_KERNEL_WEIGHTS,
        Int4Linear,
        Int8Linear,
        W8A8Linear,
        int4_kernel_threshold,
        int8_runtime,
    )

    if method == "int8":
        mode = int8_runtime(torch.device("cpu"))[0]
        if mode == "dequant":
            pytest.skip("auto runs no int8 kernel on this CPU (AVX2 or less, or a torch build "
                        "without torch._weight_int8pack_mm or an exact torch._int_mm)")
        return W8A8Linear if mode == "w8a8" else Int8Linear
    if int4_kernel_threshold(64) != MIN_KERNEL_WEIGHTS:
        pytest.skip("auto does not run a 704 x 256 int4 layer in the kernel on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()})")
    return Int4Linear
