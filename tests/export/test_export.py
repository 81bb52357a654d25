import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.export.hf import export_hf
from llmcore.export.quantize import QuantSpec, quantize_model
from llmcore.model.modeldir import save_model_dir, state_dict_for_save
from llmcore.model.transformer import Transformer
from llmcore.schema import UserError


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_gives_the_same_logits(tmp_path, tiny_tokenizer, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": 300, "tie_embeddings": tie})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_model_dir(tmp_path / "m", cfg, state_dict_for_save(model), tmp_path / "tok", {},
                   {"eos_token_id": [2, 0], "pad_token_id": 3})
    out = export_hf(tmp_path / "m", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, model(x), atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_quantized_directories_export_expanded(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": 300})
    model = Transformer(cfg).eval()
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    save_model_dir(tmp_path / "q", cfg, tensors, tmp_path / "tok", {}, {},
                   QuantSpec("int8").to_json())
    out = export_hf(tmp_path / "q", tmp_path / "hf")
    from llmcore.model.transformer import count_parameters

    size = (out / "model.safetensors").stat().st_size
    assert size == pytest.approx(4 * count_parameters(cfg), rel=0.02)  # float32 again


def test_non_llama_models_are_refused(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_model({"preset": "gpt2-mini", "vocab_size": 300, "n_layers": 1})
    save_model_dir(tmp_path / "g", cfg, state_dict_for_save(Transformer(cfg)), tmp_path / "tok",
                   {}, {})
    with pytest.raises(UserError, match="positions is learned.*norm is layernorm.*mlp is gelu"):
        export_hf(tmp_path / "g", tmp_path / "hf")


def _tiny_model_dir(tmp_path, tiny_tokenizer, **overrides):
    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": tiny_tokenizer.vocab_size,
                                  **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_model_dir(tmp_path / "m", cfg, state_dict_for_save(model), tmp_path / "tok", {},
                   {"eos_token_id": [2, 0], "pad_token_id": 3})
    return tmp_path / "m", model, cfg


def test_hf_config_carries_every_key_transformers_4_reads(tmp_path, tiny_tokenizer):
    """transformers 4.x takes the rotary base from ``rope_theta`` only (5.x from
    ``rope_parameters``); a missing key silently becomes 10000 there."""
    import json

    m, _, cfg = _tiny_model_dir(tmp_path, tiny_tokenizer, rope_theta=123456.0, n_kv_heads=1)
    config = json.loads((export_hf(m, tmp_path / "hf") / "config.json").read_text())
    assert config["rope_theta"] == 123456.0
    assert config["rope_parameters"]["rope_theta"] == 123456.0
    expected = {"model_type": "llama", "hidden_size": cfg.d_model,
                "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1,
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    assert {k: config.get(k) for k in expected} == expected
    assert config.get("rope_scaling") is None


def test_gguf_permutation_turns_rotate_half_into_adjacent_pairs():
    from llmcore.export.gguf import permute_for_llama_cpp
    from llmcore.model.transformer import apply_rope, rope_cache

    torch.manual_seed(0)
    n_heads, head_dim, d = 2, 8, 16
    w_q, w_k, x = torch.randn(d, d), torch.randn(d, d), torch.randn(5, d)
    cos, sin = rope_cache(head_dim, torch.arange(5), 10000.0)

    def ours(w):  # (T, H, Hd) rotate-half
        return apply_rope((x @ w.T).view(5, n_heads, head_dim).transpose(0, 1), cos, sin)

    def llama_cpp(w):  # adjacent pairs (2i, 2i+1) rotated by angle i, as ggml's rope does
        y = (x @ permute_for_llama_cpp(w, n_heads).T).view(5, n_heads, head_dim // 2, 2)
        c, s = cos[:, None, : head_dim // 2], sin[:, None, : head_dim // 2]
        a, b = y[..., 0], y[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(5, n_heads, head_dim
                                                                    ).transpose(0, 1)

    scores = ours(w_q) @ ours(w_k).transpose(-1, -2)
    assert torch.allclose(scores, llama_cpp(w_q) @ llama_cpp(w_k).transpose(-1, -2), atol=1e-4)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_export_reads_back(tmp_path, tiny_tokenizer, gguf_type):
    import numpy as np
    from gguf import GGUFReader

    from llmcore.export.gguf import export_gguf, permute_for_llama_cpp

    m, model, cfg = _tiny_model_dir(tmp_path, tiny_tokenizer, d_ff=64)
    out = export_gguf(m, tmp_path / f"m-{gguf_type}.gguf", gguf_type)
    reader = GGUFReader(str(out))

    def field(name):
        f = reader.fields[name]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg.n_layers
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field("tokenizer.ggml.pre") == "smollm"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tiny_tokenizer.vocab_size
    assert tokens[:4] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert field("tokenizer.ggml.token_type")[:4] == [3, 3, 3, 3]  # control tokens
    assert field("tokenizer.ggml.eos_token_id") == 2
    assert "<|im_start|>" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 9 * cfg.n_layers
    q = tensors["blk.0.attn_q.weight"]
    expected = permute_for_llama_cpp(model.layers[0].self_attn.q_proj.weight, cfg.n_heads)
    if gguf_type in ("q8_0", "q4_0"):  # gguf's own dequantizer: an independent reading
        assert q.tensor_type.name == gguf_type.upper()
        from gguf.quants import dequantize
        got = dequantize(q.data, q.tensor_type).reshape(expected.shape)
        w = expected.detach().numpy()
        steps = 127 if gguf_type == "q8_0" else 7  # levels each side of zero per block of 32
        block_max = np.abs(w.reshape(w.shape[0], -1, 32)).max(axis=-1, keepdims=True)
        err = np.abs(got - w).reshape(block_max.shape[0], -1, 32)
        assert (err <= block_max / steps + 1e-3).all()  # within a step of its block's scale
    else:
        got = np.asarray(q.data).reshape(expected.shape)
        tol = 0 if gguf_type == "f32" else 1e-3
        assert np.abs(got - expected.detach().numpy()).max() <= tol
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_gguf_export_refuses_what_llama_cpp_cannot_run(tmp_path, tiny_tokenizer):
    from llmcore.export.gguf import export_gguf

    m, _, _ = _tiny_model_dir(tmp_path, tiny_tokenizer, mlp="gelu")
    with pytest.raises(UserError, match="mlp is gelu"):
        export_gguf(m, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="GGUF type must be one of"):
        export_gguf(m, tmp_path / "x.gguf", "q4_k")
