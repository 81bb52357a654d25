import pytest
import torch

from llmcore.config import UserError, parse_section
from llmcore.export import export_hf
from llmcore.model import Transformer
from llmcore.modeldir import save_model_dir, state_dict_for_save
from llmcore.quantize import QuantSpec, quantize_model


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_gives_the_same_logits(tmp_path, tiny_tokenizer, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_section("model", {"preset": "tiny", "vocab_size": 300, "tie_embeddings": tie})
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
    cfg = parse_section("model", {"preset": "tiny", "vocab_size": 300})
    model = Transformer(cfg).eval()
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    save_model_dir(tmp_path / "q", cfg, tensors, tmp_path / "tok", {}, {},
                   QuantSpec("int8").to_json())
    out = export_hf(tmp_path / "q", tmp_path / "hf")
    from llmcore.model import count_parameters

    size = (out / "model.safetensors").stat().st_size
    assert size == pytest.approx(4 * count_parameters(cfg), rel=0.02)  # float32 again


def test_non_llama_models_are_refused(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok")
    cfg = parse_section("model", {"preset": "gpt2-mini", "vocab_size": 300, "n_layers": 1})
    save_model_dir(tmp_path / "g", cfg, state_dict_for_save(Transformer(cfg)), tmp_path / "tok",
                   {}, {})
    with pytest.raises(UserError, match="positions is learned.*norm is layernorm.*mlp is gelu"):
        export_hf(tmp_path / "g", tmp_path / "hf")
