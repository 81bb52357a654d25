"""Export a model directory to Hugging Face ``transformers`` (Llama architecture).

    llmcore export data/models/sft exports/sft-hf
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exports/sft-hf')"

With rope positions, RMSNorm, SwiGLU and no biases the decoder is exactly Llama, so the
weights are renamed (``model.`` prefix) and ``config.json`` becomes a ``LlamaConfig``; a test
checks that ``LlamaForCausalLM`` loaded from the export gives the same logits. Other switch
combinations (learned positions, layernorm, GELU, biases) have no exact ``transformers``
architecture and are refused with a message saying so, rather than exported approximately.
Quantized directories are expanded to float first.

The rotary base is written both as ``rope_theta`` (what transformers 4.x reads; without it
4.x silently falls back to 10000) and inside ``rope_parameters`` (what 5.x reads), so the
export is exact under every version pyproject allows. GGUF: :mod:`llmcore.export.gguf`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from llmcore.config.model import ModelConfig
from llmcore.model.modeldir import TOKENIZER_FILES, load_model_dir, state_dict_for_save
from llmcore.schema import UserError


def llama_compatible(cfg: ModelConfig) -> list[str]:
    """Why ``cfg`` is not exactly Llama (empty when it is)."""
    problems = []
    if cfg.positions != "rope":
        problems.append(f"positions is {cfg.positions} (Llama uses rope)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm is {cfg.norm} (Llama uses rmsnorm)")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp is {cfg.mlp} (Llama uses swiglu)")
    if cfg.bias:
        problems.append("bias is true (Llama has no biases)")
    return problems


def export_hf(model_dir: Path, out: Path) -> Path:
    """Write a ``LlamaForCausalLM`` directory for a Llama-style model directory."""
    from transformers import LlamaConfig

    model, cfg = load_model_dir(Path(model_dir), "cpu")
    problems = llama_compatible(cfg)
    if problems:
        raise UserError(f"{model_dir} cannot be exported as Llama: {'; '.join(problems)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                     intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                     max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
                     mlp_bias=False, eos_token_id=gen.get("eos_token_id"),
                     pad_token_id=gen.get("pad_token_id"), bos_token_id=None)
    hf.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    hf.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = cfg.rope_theta  # transformers 4.x: only this key sets the base
    config.setdefault("rope_scaling", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = {}
    for key, tensor in state_dict_for_save(model).items():
        weights[key if key == "lm_head.weight" else f"model.{key}"] = tensor
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, out / name)
    return out
