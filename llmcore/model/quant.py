"""The quantized weight format: int8 per output channel, int4 group-wise, packed and unpacked.

* int8: each output row ``w[o, :]`` gets one scale ``max|w[o, :]| / 127``; ``q = round(w /
  scale)`` in [-127, 127]. Error per weight is at most ``scale / 2``.
* int4: each group of ``group_size`` input columns of a row gets its own scale
  ``max|w| / 7``; ``q`` in [-8, 7] is stored two per byte (low nibble first).

A quantized model directory stores ``<layer>.qweight`` and ``<layer>.scales`` per quantized
layer. Both directions live here, so the packer (:mod:`llmcore.export.quantize`) and the
loader (:mod:`llmcore.model.modeldir`) cannot disagree on the layout, and loading a quantized
model needs nothing of the quantizer. At load (:func:`load_quantized`) the weights are
expanded to float once (``dequant``) or kept quantized in the layers of
:mod:`llmcore.model.qlinear`, which says what runs where and why.

Trade-off: round-to-nearest with absmax scales, no calibration data (GPTQ / AWQ would lose
less at int4); it is exact to explain and needs nothing but the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

import torch
from torch import nn

from llmcore.model.qlinear import (
    MIN_KERNEL_WEIGHTS,
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    int4_kernel_threshold,
    int8_runtime,
    int8mm_available,
    int_mm_exact,
    weight_only_act,
)
from llmcore.schema import UserError


class QuantFormatError(UserError):
    """Quantized tensors that do not match the model they are loaded into."""


class QuantInfo(TypedDict):
    """``config.json``'s ``quantization`` of a quantized model directory."""

    method: str  # int8 or int4
    group_size: int | None  # int4's group of input columns; None for int8


def tied_names(model: nn.Module) -> set[str]:
    """State-dict keys stored once under another name (the LM head tied to the embedding)."""
    return {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings",
                                         False) else set()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed uint8 (out, ceil(in/g)*g/2) and fp32 scales (out, ceil(in/g)).

    An input width that is not a multiple of ``group_size`` is padded with zeros (the last
    group is partly empty); :func:`dequantize_int4` crops it back with ``in_features``.
    """
    if group_size % 2:
        raise ValueError(f"quantize.group_size must be even (got {group_size})")
    out_f, in_f = w.shape
    padded = -(-in_f // group_size) * group_size
    w = torch.nn.functional.pad(w.detach().float(), (0, padded - in_f))
    g = w.reshape(out_f, padded // group_size, group_size)
    scale = (g.abs().amax(dim=2) / 7.0).clamp(min=1e-12)  # (out, groups)
    q = torch.round(g / scale[..., None]).clamp(-8, 7).to(torch.int16).reshape(out_f, padded)
    u = (q + 8).to(torch.uint8)  # 0..15
    packed = u[:, 0::2] | (u[:, 1::2] << 4)  # (out, padded/2)
    return packed, scale



def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose weight is quantized: every Linear, and a token embedding tied to the head.

    A tied matrix is the LM head's weight, so it is quantized once, per output channel of
    the head (= per token row of the embedding), and loads back as one shared matrix.
    """
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    tied_id = None
    if isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding) \
            and head.weight is embed.weight:
        tied_id = id(head.weight)
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        linear = isinstance(m, nn.Linear) and id(m.weight) != tied_id
        if linear or (isinstance(m, nn.Embedding) and id(m.weight) == tied_id):
            out[name] = m
    return out


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    in_features: int | None = None) -> torch.Tensor:
    """packed uint8 (out, padded/2), scales (out, groups) -> float (out, in_features)."""
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    q = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).float()  # (out, padded)
    out_f, padded = q.shape
    w = (q.reshape(out_f, padded // group_size, group_size) * scale[..., None]).reshape(out_f,
                                                                                        padded)
    return w if in_features is None else w[:, :in_features]


def load_quantized(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                   quant: QuantInfo, mode: str = "auto") -> nn.Module:
    """Fill ``model`` (built from the config) from quantized tensors.

    ``mode``: ``dequant`` expands weights to float at load; ``int8mm`` keeps every int8
    Linear's weights int8 (int8 method only) in :class:`Int8Linear` (weight-only); ``w8a8``
    in :class:`W8A8Linear` (int8 activations too, where ``_int_mm`` is exact: else
    expanded); ``auto`` is :func:`int8_runtime`'s choice for the device, with layers under
    :data:`MIN_KERNEL_WEIGHTS` weights expanded, and for int4 weights on a CPU
    :class:`Int4Linear` for layers of at least :func:`int4_kernel_threshold` weights (every
    other case expands them). :class:`Int8Linear` computes in :func:`weight_only_act`'s
    dtype.
    """
    method, group = quant.get("method"), quant.get("group_size")
    if method not in ("int8", "int4"):
        raise QuantFormatError(f"config.json: unknown quantization method {method!r}")
    device = next(model.parameters()).device
    picked, _ = int8_runtime(device)
    act = weight_only_act(device)  # what an Int8Linear computes in, asked for or picked
    int4 = (int4_kernel_threshold(int(group or 0)) if method == "int4" and mode == "auto"
            and device.type == "cpu" else None)
    smallest = 0
    if mode == "auto":
        mode, smallest = picked, MIN_KERNEL_WEIGHTS
    if mode == "int8mm" and (method != "int8" or not int8mm_available(device, act)):
        mode = "dequant"
    if mode == "w8a8" and (method != "int8" or not int_mm_exact(device)):
        mode = "dequant"  # (asked for where the product is not exact: expanded instead)
    plain = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".scales"))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    layers = quantizable(model)
    expected = {f"{n}.weight" for n in layers}
    bad = [m for m in missing if m not in expected and m not in tied_names(model)]
    absent = [n for n in layers if f"{n}.qweight" not in tensors or f"{n}.scales" not in tensors]
    if bad or unexpected or absent:
        raise QuantFormatError(f"quantized weights do not match the model: missing "
                            f"{(bad + absent)[:5]}, unexpected {unexpected[:5]}")
    for name, layer in layers.items():
        q, s = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        q, s = q.to(device), s.to(device)
        kernel: nn.Module | None = None
        if (int4 is not None and isinstance(layer, nn.Linear) and 2 * q.numel() >= int4
                and 2 * q.shape[1] == layer.in_features  # a width the groups divide
                and layer.out_features % 16 == 0):  # the kernel's layout needs it
            kernel = Int4Linear(q, s, int(group or 0), layer.bias)
        elif (mode in ("int8mm", "w8a8") and isinstance(layer, nn.Linear)
              and q.numel() >= smallest
              and (mode == "w8a8" or Int8Linear.fits(layer.in_features, act))):
            kernel = (Int8Linear(q, s, layer.bias, act) if mode == "int8mm"
                      else W8A8Linear(q, s, layer.bias))
        if kernel is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, kernel)
            continue
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        w = (dequantize_int8(q, s) if method == "int8"
             else dequantize_int4(q, s, int(group or 0), weight.shape[1]))
        with torch.no_grad():
            weight.copy_(w.to(weight.dtype))
    return model
