"""Export a model directory to GGUF, the file llama.cpp, Ollama and LM Studio load.

    llmcore export data/models/sft exports/sft.gguf --format gguf --gguf-type q8_0
    llama-cli -m exports/sft.gguf -cnv        # or: ollama create, LM Studio's import

The file is written with ``gguf.GGUFWriter``, llama.cpp's own writer, as the ``llama``
architecture: a Llama-style model directory (rope, RMSNorm, SwiGLU, no biases, the same
switches :mod:`llmcore.export.hf` requires) maps onto it tensor for tensor. Two conversions are
needed and are the whole of what can go wrong:

- RoPE layout. This decoder, like Hugging Face's Llama, rotates the two *halves* of each head
  (rotate-half); llama.cpp's ``llama`` rotates adjacent *pairs*. Reordering the rows of the
  query and key projections inside each head (pair ``(i, i + d/2)`` -> rows ``2i, 2i + 1``)
  makes the two compute the same attention scores, so ``attn_q``/``attn_k`` are permuted.
- Tokenizer. The vocabulary is byte-level BPE (``tokenizer.ggml.model = gpt2``) with its
  merges. llama.cpp does not read the pre-tokenizer from the file, it selects a built-in one by
  name: ``smollm`` is "split every digit, then the GPT-2 regex", which is exactly this
  tokenizer's ``Digits(individual) + ByteLevel`` (``gpt2`` is chosen when digits are not split).
  The four special tokens are control tokens; no BOS is added (llmcore's generation adds none);
  ``<|im_end|>`` is the end-of-turn token and the ChatML template is embedded.

Types: ``f32`` (exact), ``f16``, ``q8_0`` (llama.cpp's 8-bit blocks of 32: one scale per 32
weights), ``q4_0`` (4-bit blocks of 32, one scale each: a quarter of f16's bytes, coarser; every
matrix, as ``llama-quantize`` writes it with ``--pure``). Norm weights stay f32 and so does any
tensor whose rows do not divide into blocks of 32, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcore.data.tokenizer import CHAT_TEMPLATE
from llmcore.export.hf import llama_compatible
from llmcore.model.modeldir import load_model_dir
from llmcore.schema import UserError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered from rotate-half to llama.cpp's adjacent pairs.

    Within each head the output rows ``[0 .. d/2)`` and ``[d/2 .. d)`` are the two halves that
    rotate-half pairs up; interleaving them gives pairs ``(2i, 2i + 1)``.
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("ByteLevel", None, True)]:
        return "gpt2"
    raise UserError(f"the tokenizer's pre-tokenizer {pre} has no llama.cpp equivalent "
                    "known to this exporter; GGUF export supports llmcore's byte-level BPE")


def _add_tokenizer(writer: Any, model_dir: Path, gen: dict[str, Any]) -> None:
    import gguf

    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{model_dir}/tokenizer.json is not a BPE tokenizer")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = gen.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if eos_ids and eos_ids[0] is not None:
        writer.add_eos_token_id(int(eos_ids[0]))  # <|im_end|>: ends a chat turn
        writer.add_eot_token_id(int(eos_ids[0]))
    if gen.get("pad_token_id") is not None:
        writer.add_pad_token_id(int(gen["pad_token_id"]))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _tensor(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type (None: let the writer infer it from the dtype)."""
    import gguf

    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or gguf_type == "f32":
        return a.astype(np.float32), None
    if gguf_type == "f16":
        return a.astype(np.float16), None
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[
        gguf_type]
    if a.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return a.astype(np.float32), None
    return gguf.quants.quantize(a, kind), kind


def gguf_tensors(state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int
                 ) -> list[tuple[str, torch.Tensor]]:
    """llmcore's (Hugging Face Llama-style) tensor names -> llama.cpp's, q/k permuted."""
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = []
    for key, t in state.items():
        if key == "embed_tokens.weight":
            out.append(("token_embd.weight", t))
        elif key == "norm.weight":
            out.append(("output_norm.weight", t))
        elif key == "lm_head.weight":
            out.append(("output.weight", t))
        else:
            _, layer, rest = key.split(".", 2)
            module, param = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                t = permute_for_llama_cpp(t, n_heads)
            elif module == "self_attn.k_proj":
                t = permute_for_llama_cpp(t, n_kv_heads)
            out.append((f"blk.{layer}.{names[module]}.{param}", t))
    return out


def export_gguf(model_dir: Path, out: Path, gguf_type: str = "f32") -> Path:
    """Write ``out`` (a ``.gguf`` file) for a Llama-style model directory."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"GGUF type must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})")
    model_dir, out = Path(model_dir), Path(out)
    model, cfg = load_model_dir(model_dir, "cpu")
    problems = llama_compatible(cfg)
    if problems:
        raise UserError(f"{model_dir} cannot be exported as GGUF llama: {'; '.join(problems)}")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.d_model // cfg.n_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    _add_tokenizer(writer, model_dir, gen)
    state = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    for name, t in gguf_tensors(state, cfg.n_heads, cfg.n_kv_heads):
        array, raw_type = _tensor(t, gguf_type)
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out
