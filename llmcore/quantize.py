"""Weight-only quantization of Linear layers: int8 per output channel, int4 group-wise.

* int8: each output row ``w[o, :]`` gets one scale ``max|w[o, :]| / 127``; ``q = round(w /
  scale)`` in [-127, 127]. Error per weight is at most ``scale / 2``.
* int4: each group of ``group_size`` input columns of a row gets its own scale
  ``max|w| / 7``; ``q`` in [-8, 7] is stored two per byte (low nibble first).

Norms, biases and an untied embedding table stay in full precision. A tied embedding is the
LM head's matrix: it is quantized once, per token row (= per output channel of the head), and
loads back as one shared matrix; at vocab 6400 it is a third of the small models.

How the quantized weights are run is a separate choice (:func:`load_quantized`):

* ``dequant`` (the default on CPU): weights are expanded once at load into a float Linear.
  The file on disk is 3.5-7x smaller; decoding runs at float speed. On the 2-core CPU this was
  written on, torch's int8 kernels were measured slower than a float matrix-vector product at
  batch 1, so this is the fastest correct path there.
* ``int8mm``: int8 weights stay in memory and ``torch._weight_int8pack_mm`` does the product
  (4x less weight memory traffic; the default on CUDA, where the kernel pays off).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

METHODS = ("int8", "int4")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


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


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    in_features: int | None = None) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    q = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).float()  # (out, padded)
    out_f, padded = q.shape
    w = (q.reshape(out_f, padded // group_size, group_size) * scale[..., None]).reshape(out_f,
                                                                                        padded)
    return w if in_features is None else w[:, :in_features]


@dataclass(frozen=True)
class QuantSpec:
    method: str = "int8"
    group_size: int = 64

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method,
                "group_size": self.group_size if self.method == "int4" else None}


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
        if isinstance(m, nn.Linear) and id(m.weight) != tied_id:
            out[name] = m
        elif isinstance(m, nn.Embedding) and id(m.weight) == tied_id:
            out[name] = m  # the tied embedding / head matrix
    return out


def quantize_model(model: nn.Module, spec: QuantSpec
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Tensors for the quantized safetensors file and relative error per quantized layer.

    Quantized layers store ``<name>.qweight`` and ``<name>.scales``; every other tensor is
    stored as is (tied copies once).
    """
    if spec.method not in METHODS:
        raise ValueError(f"quantize.method must be one of {', '.join(METHODS)}")
    layers = quantizable(model)
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name, layer in layers.items():
        w = layer.weight.detach().float()
        if spec.method == "int8":
            q, s = quantize_int8(w)
            back = dequantize_int8(q, s)
        else:
            q, s = quantize_int4(w, spec.group_size)
            back = dequantize_int4(q, s, spec.group_size, w.shape[1])
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q.contiguous(), s.contiguous()
        errors[name] = float((back - w).norm() / w.norm().clamp(min=1e-12))
    seen = {layer.weight.data_ptr() for layer in layers.values()}  # stored quantized
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, errors


class Int8Linear(nn.Module):
    """A Linear whose int8 weights stay int8; the product runs in ``_weight_int8pack_mm``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype),
                                      self.qweight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def int8mm_available(device: torch.device) -> bool:
    try:
        x = torch.randn(2, 32, device=device)
        q = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, q, torch.ones(8, device=device))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def load_quantized(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                   quant: Mapping[str, Any], mode: str = "auto") -> nn.Module:
    """Fill ``model`` (built from the config) from quantized tensors.

    ``mode``: ``dequant`` expands weights to float at load; ``int8mm`` keeps int8 weights
    (int8 method only); ``auto`` picks int8mm on CUDA and dequant elsewhere.
    """
    method, group = quant["method"], quant.get("group_size")
    device = next(model.parameters()).device
    if mode == "auto":
        mode = "int8mm" if device.type == "cuda" and method == "int8" else "dequant"
    if mode == "int8mm" and (method != "int8" or not int8mm_available(device)):
        mode = "dequant"
    plain = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".scales"))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    layers = quantizable(model)
    expected = {f"{n}.weight" for n in layers}
    tied = {"lm_head.weight"} if getattr(model.cfg, "tie_embeddings", False) else set()
    bad = [m for m in missing if m not in expected and m not in tied]
    if bad or unexpected:
        raise ValueError(f"quantized weights do not match the model: missing {bad[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, layer in layers.items():
        q, s = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        if mode == "int8mm" and isinstance(layer, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Linear(q.to(device), s.to(device), layer.bias))
            continue
        w = (dequantize_int8(q, s) if method == "int8"
             else dequantize_int4(q, s, group, layer.weight.shape[1]))
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
    return model


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bits_per_weight(method: str, group_size: int) -> float:
    """Storage cost of one quantized weight including its share of the fp32 scale."""
    if method == "int8":
        return 8.0
    return 4.0 + 32.0 / group_size


def size_ratio(fp_bytes: int, q_bytes: int) -> float:
    return fp_bytes / max(q_bytes, 1) if q_bytes else math.inf
