"""The ``quantize:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.schema import spec


@dataclass(frozen=True)
class QuantizeConfig:
    """``quantize:`` weight-only quantization of the SFT model."""

    method: str = spec("int8", choices=("int8", "int4"))
    group_size: int = spec(64, ge=2, doc="int4: input columns sharing one scale")
    runtime: str = spec("auto", choices=("auto", "dequant", "int8mm", "w8a8"),
                        doc="how quantized weights run: expanded at load, the weight-only int8 "
                        "kernel, int8 products (activations rounded to int8 per row), or "
                        "auto: a kernel for large layers where it is faster (per device)")
    agreement_prompts: int = spec(32, ge=1, doc="held-out prompts for greedy agreement")
    agreement_tokens: int = spec(32, ge=1)
    decode_tokens: int = spec(64, ge=8, doc="tokens decoded to time decode speed")
    gguf: str | None = spec("q8_0", choices=(None, "f32", "f16", "q8_0", "q4_0"),
                            doc="also write the SFT model as model.gguf (llama.cpp) in the "
                                "quantized directory, of this type")
