"""The layers quantized weights run in at inference, and which one a device gets.

* :class:`Int8Linear`: int8 weights, float activations, torch's weight-only kernel
  (``torch._weight_int8pack_mm``).
* :class:`W8A8Linear`: int8 weights and int8 activations (each row rounded on the fly), the
  product in int32 (``torch._int_mm``).
* :class:`Int4Linear`: int4 weights in torch's CPU int4 kernel.

At decode a product reads every weight once per token, so a quarter of the bytes is the gain;
on CPUs with int8 dot products (VNNI, AMX) ``w8a8`` also does the arithmetic in int8 and
decodes fastest; the weight-only kernel delivers the bytes with bf16 activations (it widens
them to float32 itself) where torch's kernels are AVX-512, while with float32 activations it
is several times slower than a float product; under AVX2 whole-model decode did not gain, so
there int8 is expanded. A layer too small for the bytes to matter
(:data:`MIN_KERNEL_WEIGHTS`) stays float: there the casts around the kernel cost more than it
saves. int4 weights run in their kernel in layers large enough for it to pay on the CPU, and
are expanded to float everywhere else.

:func:`int8_runtime` and :func:`int4_kernel_threshold` say what a device runs, from checks of
what its kernels do (exact sums, availability) and from measured speed
(``benchmarks/int8_kernels.py``, ``benchmarks/decode_speed.py``). :func:`fuse_quantized`
stacks layers that share their input (q/k/v, gate/up), as
:meth:`llmcore.model.transformer.Transformer.prepare_inference` does for float ones. The
stored format and the loader are :mod:`llmcore.model.quant`'s.
"""

from __future__ import annotations

import collections
import functools
import typing
from collections.abc import Callable, Sequence

import torch
from torch import nn


class _Int8Layer(nn.Module):
    """What the int8 layers share: int8 weights (out, in) with one scale per output channel
    (``qweight``, ``scales``), an optional bias, and stacking."""

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: nn.Parameter | None
    in_features: int
    out_features: int

    @classmethod
    def stacked(cls, layers: Sequence[_Int8Layer]) -> _Int8Layer:
        """One layer computing ``layers`` (which share their input) side by side: weights,
        scales and biases concatenated along the outputs. Each output channel keeps its own
        scale, so the stacked layer computes exactly what the separate ones do."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.register_buffer("qweight", torch.cat([m.qweight for m in layers]))
        fused.register_buffer("scales", torch.cat([m.scales for m in layers]))
        biases = [m.bias for m in layers]
        fused.bias = (None if biases[0] is None else nn.Parameter(
            torch.cat([b for b in biases if b is not None]), requires_grad=False))
        fused.in_features = layers[0].in_features
        fused.out_features = sum(m.out_features for m in layers)
        return fused


def fuse_quantized(layers: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One product for int8 layers that share their input (q/k/v, gate/up), as
    :meth:`~llmcore.model.transformer.Transformer.prepare_inference` fuses float ones: fewer
    kernel calls per step, and for :class:`W8A8Linear` one rounding of the input instead of
    one per layer. Each layer's weights become a view of the stacked ones where the view
    starts on a 64-byte boundary (no extra memory; the weight-only kernel's vector loads
    crashed on unaligned weights), a copy elsewhere. None unless the layers are all
    :class:`W8A8Linear`, or all :class:`Int8Linear` of one activation dtype, with biases
    alike (int4's packing is the kernel's own tiling: not stacked)."""
    kinds = {type(m) for m in layers}
    if len(kinds) != 1 or not issubclass(cls := kinds.pop(), _Int8Layer):
        return None
    int8 = typing.cast(list[_Int8Layer], list(layers))
    if len({m.scales.dtype for m in int8}) != 1 or len({m.bias is None for m in int8}) != 1:
        return None
    fused = cls.stacked(int8)
    at = 0
    for m in int8:
        if at * m.in_features % 64 == 0:
            m.qweight = fused.qweight[at : at + m.out_features]
        at += m.out_features
    return fused.forward


class Int8Linear(_Int8Layer):
    """A Linear whose int8 weights stay int8; the product runs in ``_weight_int8pack_mm`` with
    activations (and scales) in ``act_dtype``, the output back in the input's dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 act_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # fresh copies: a tensor read from a safetensors file may sit at any byte offset of
        # the mapping, and the kernel's vector loads crashed (SIGSEGV) on such weights
        self.register_buffer("qweight", q.clone(memory_format=torch.contiguous_format))
        self.register_buffer("scales", scale.to(act_dtype, copy=True).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @staticmethod
    def fits(in_features: int, act_dtype: torch.dtype) -> bool:
        """Whether the kernel takes a layer this wide: with bf16 activations torch's CPU
        kernel crashed the process (SIGSEGV) on widths that are not a multiple of 16 (8,
        24, 40, 100 measured), so such layers are expanded instead."""
        return act_dtype != torch.bfloat16 or in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype),
                                      self.qweight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class W8A8Linear(_Int8Layer):
    """A Linear whose int8 weights meet int8 activations: each row of the input is quantized
    on the fly to [-127, 127] with its own scale ``max|x_row| / 127``, the product runs in
    int32 (``torch._int_mm``, VNNI dot products on a CPU through oneDNN) and is rescaled by
    the row's scale times each output channel's, the output in the input's dtype.

    Rounding the activations adds an error of at most half a step of each row's scale to
    every input (more than bf16's, which keeps 8 bits of mantissa per value); llama.cpp's
    q8_0 does the same in blocks of 32. ``runtime: int8mm`` keeps float activations."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        # (out, in) row-major, read as its (in, out) transpose: the layout in which oneDNN's
        # product measured fastest at one row (2.5x the contiguous (in, out) copy)
        self.register_buffer("qweight", q.clone(memory_format=torch.contiguous_format))
        # each channel's scale over 127 (a row's step is its max / 127): one op fewer a call
        self.register_buffer("scales", (scale.to(torch.float32) / 127).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # few ops on purpose: at decode each is a dispatch, and at the 27M shape they are
        # what a step costs (a leaner form measured 10% faster per layer than a plain one)
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        peak = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)
        codes = (rows * (127 / peak)).round_().to(torch.int8)
        y: torch.Tensor = torch._int_mm(codes, self.qweight.t()) * peak * self.scales
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """A Linear whose int4 weights stay int4: torch's CPU int4 kernel
    (``_weight_int4pack_mm_for_cpu``), bf16 activations, the output back in the input's dtype.

    The kernel's layout is its own: the 0..15 codes (ours: ``q + 8``) repacked once at load by
    ``_convert_weight_to_int4pack_for_cpu``, and per group a (scale, zero) pair with
    ``w = (code - 8) * scale + zero``, which is this format with every zero 0."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), INT4_INNER_K_TILES))
        s = scale.t().to(act_dtype)  # (groups, out)
        self.register_buffer("scales_zeros", torch.stack([s, torch.zeros_like(s)], dim=-1)
                             .contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group_size, self.act_dtype = group_size, act_dtype
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(self.act_dtype), self.packed, self.group_size,
            self.scales_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


INT4_INNER_K_TILES = 8  # the repacking's tile of the input dimension (2, 4 or 8 for torch)


@functools.cache
def int4_kernel_threshold(group_size: int) -> int | None:
    """The fewest weights a layer needs for its int4 product to run in the kernel on this CPU
    (its width in groups of ``group_size``: 32, 64, 128 or 256), or None where the kernel is
    absent. From one product of one row against float32 (``benchmarks/int8_kernels.py``): with
    AVX-512 it is at least as fast from the 27M shape's products up, as int8's threshold; with
    AVX2 it is slower at 512 x 1536 and faster only at the 0.5B shape's (1536 x 4096 and up),
    hence 2^22 there."""
    cap = torch.backends.cpu.get_cpu_capability()
    smallest = (MIN_KERNEL_WEIGHTS if cap in AVX512_KERNELS else 1 << 22 if cap == "AVX2"
                else None)
    if smallest is None:
        return None
    try:
        codes = torch.full((16, 2 * group_size), 8, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
        sz = torch.ones(2, 16, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(
            torch.ones(1, 2 * group_size, dtype=torch.bfloat16), packed, group_size, sz)
        return smallest
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


@functools.cache
def int8mm_available(device: torch.device, act_dtype: torch.dtype = torch.float32) -> bool:
    """Whether torch has the int8 weight-only kernel on ``device`` for ``act_dtype`` (tried
    once per device and dtype)."""
    try:
        x = torch.randn(2, 32, device=device, dtype=act_dtype)
        q = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, q, torch.ones(8, device=device, dtype=act_dtype))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def int_mm_exact(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` on ``device`` gives exact int32 products of int8 codes at
    their extremes (tried once per device). Where the CPU has no int8 dot-product instruction
    (VNNI, AMX), torch's oneDNN path was measured to return wrong sums (127 * 127 * 64 came
    back as 8,160, with torch's kernels capped to AVX2 or AVX-512 without VNNI): the check
    is of the result, not of CPU flags, so no such path is ever used."""
    try:
        for k in (64, 256):
            a = torch.full((2, k), 127, dtype=torch.int8, device=device)
            a[1] = -127
            b = torch.full((k, 16), 127, dtype=torch.int8, device=device)
            b[:, 1] = -127
            b[::3, 2] = 5
            want = a.cpu().long() @ b.cpu().long()
            if not torch.equal(torch._int_mm(a, b).cpu().long(), want):
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# Fewer weights than this and a layer's product stays float under ``auto``: measured at decode
# (one row) on AVX-512 BF16, the kernel with its casts is slower at 128 x 352 (45k weights),
# even at 128 x 1024 (131k) and faster from 256 x 704 (180k) up (2.1x at 128 x 4096)
MIN_KERNEL_WEIGHTS = 1 << 17

# torch's names for CPU kernels of AVX-512 width (``torch.backends.cpu.get_cpu_capability``)
AVX512_KERNELS = ("AVX512", "AVX512_BF16", "AMX")


def weight_only_act(device: torch.device) -> torch.dtype:
    """The activation dtype torch's weight-only int8 kernel runs with on ``device``: bf16 on a
    CPU whose torch kernels are AVX-512 and whose torch has the bf16 kernel (the kernel widens
    them itself; with float32 activations it is several times slower than a float product),
    float32 elsewhere (CUDA included)."""
    if (device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in AVX512_KERNELS
            and int8mm_available(device, torch.bfloat16)):
        return torch.bfloat16
    return torch.float32


def int8_runtime(device: torch.device) -> tuple[str, torch.dtype]:
    """What ``auto`` runs int8 weights with on ``device``: (mode, activation dtype).

    CUDA: the weight-only kernel with float32 activations. A CPU whose torch kernels are
    AVX-512: int8 activations too (``w8a8``) where ``torch._int_mm`` is exact there (int8
    dot products in hardware: at the 0.5B shape's decode about twice float32's rate, the
    weight-only kernel about 1.5 times, ``reports/decode_speed-0.5b.json``), else the
    weight-only kernel with bf16 activations, where torch has it. Anywhere else, AVX2
    included, the weights are expanded to float32 at load: with torch capped to AVX2 the
    weight-only kernel decoded no faster than float32, and slower at batch 8
    (``reports/decode_speed-*-avx2cap.json``), ``_int_mm`` was wrong there, and a quantized
    model must not be slower than its float one. MPS and others: expanded.
    """
    if device.type == "cuda":
        return "int8mm", torch.float32
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in AVX512_KERNELS:
        if int_mm_exact(device):
            return "w8a8", torch.float32
        if weight_only_act(device) == torch.bfloat16:
            return "int8mm", torch.bfloat16
    return "dequant", torch.float32


# each quantized layer class by the runtime name ``quantize.runtime`` gives it
KINDS = {"W8A8Linear": "w8a8", "Int8Linear": "int8mm", "Int4Linear": "int4"}


def kernel_layers(model: object) -> dict[str, int]:
    """How many layers run in each quantized kernel, by runtime name (:data:`KINDS`; a
    stacked q/k/v counts as its separate layers); empty where every layer is float (a float
    model, or a quantized one expanded at load)."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return dict(collections.Counter(KINDS[type(m).__name__] for m in modules
                                    if type(m).__name__ in KINDS))
