"""What the quantized-runtime tests share: the layer class ``auto`` loads for a large layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn


def kernel_or_skip(method: str) -> type:
    """The class ``load_quantized(..., "auto")`` gives a 704 x 256 layer quantized with
    ``method`` (int8 or int4, groups of 64) on this CPU, read from what it loads; the test
    is skipped, with the reason, where ``auto`` expands it to float instead."""
    from llmcore.config.model import parse_model
    from llmcore.export.quantize import QuantSpec, quantize_model
    from llmcore.model.quant import load_quantized
    from llmcore.model.transformer import Transformer

    cfg = dataclasses.replace(parse_model({"preset": "tiny", "vocab_size": 300}), d_model=256,
                              n_heads=4, n_kv_heads=4, d_ff=704)
    spec = QuantSpec(method, 64)
    tensors, _ = quantize_model(Transformer(cfg).eval(), spec)
    layer = load_quantized(Transformer(cfg).eval(), tensors, spec.to_json(),
                           "auto").layers[0].mlp.up_proj
    if type(layer) is nn.Linear:
        pytest.skip(f"auto runs no {method} kernel for a 704 x 256 layer on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()}; for int8: no exact "
                    "torch._int_mm and no torch._weight_int8pack_mm)")
    return type(layer)
