"""The GGUF export in a real llama.cpp: same tokens, same greedy continuation.

Skipped, with the reason printed, where llama-cpp-python is not installed (it builds llama.cpp
from source: ``make llama-cpp``)."""

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.data.tokenizer import LLMTokenizer, train_bpe
from llmcore.export import llama_cpp
from llmcore.infer.generate import generate_no_cache
from llmcore.model.modeldir import save_model_dir, state_dict_for_save
from llmcore.model.transformer import Transformer

OK, WHY = llama_cpp.available()
pytestmark = pytest.mark.skipif(not OK, reason=WHY)

# where llama.cpp's pre-tokenizer and the tokenizers library could disagree
TEXTS = [
    "What is 12 + 7? 1234567890 3.14159 -42 x2y3 ٣٤ ²½",
    "中文文本和表情符号 🎉🙂👍🏽 日本語のテキスト",
    "a   b\n\n\tc  \n   d    \r\n e\u00a0f\u3000g",
    "I'm sure they'd've said it's fine, DON'T you think? 'quoted' words",
    "def f(x):\n    return x**2  # comment\n\n\nprint(f(3))",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from llmcore.export.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("gguf")
    tok = LLMTokenizer(train_bpe(TEXTS * 3 + ["some more english words to merge"] * 5,
                                 vocab_size=400, min_frequency=1))
    tok.save(tmp / "tok")
    cfg = parse_model({"preset": "tiny", "vocab_size": tok.vocab_size, "d_ff": 64,
                                  "n_kv_heads": 1, "max_seq_len": 256})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper logits than the init's, so the greedy path has no ties
        model.embed_tokens.weight.mul_(8)
    save_model_dir(tmp / "m", cfg, state_dict_for_save(model), tmp / "tok", {},
                   {"eos_token_id": [2, 0], "pad_token_id": 3})
    files = {t: export_gguf(tmp / "m", tmp / f"m-{t}.gguf", t) for t in ("f32", "q8_0", "q4_0")}
    return tok, model, files


def test_llama_cpp_tokenizes_like_llmcore(exported):
    tok, _, files = exported
    llm = llama_cpp.load(files["f32"], vocab_only=True)
    for text in TEXTS:
        assert llama_cpp.tokenize(llm, text) == tok.encode(text), text


def test_llama_cpp_greedy_continuation_equals_llmcore_at_f32(exported):
    tok, model, files = exported
    llm = llama_cpp.load(files["f32"])
    prompt = tok.encode("What is 12 + 7? The quick brown")
    ours = generate_no_cache(model, prompt, 24)
    assert len(ours) == 24
    assert llama_cpp.greedy(llm, prompt, 24) == ours


def test_llama_cpp_logits_match_at_f32(exported):
    import numpy as np

    tok, model, files = exported
    llm = llama_cpp.load(files["f32"])
    prompt = tok.encode("def f(x): return 12345")
    llm.reset()
    llm.eval(prompt)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0, -1].numpy()
    assert np.abs(np.asarray(llm.scores[len(prompt) - 1]) - ours).max() < 1e-3


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_llama_cpp_computes_the_quantized_export_as_its_rounded_weights(exported, kind):
    """A q8_0 / q4_0 file in llama.cpp gives the logits of llmcore's model with every matrix
    rounded as the file stores it (``gguf``'s own quantizer and dequantizer), up to what
    llama.cpp adds by rounding the activations to 8 bits for its integer dot products; at
    q4_0 that is far closer than the unrounded model's logits are."""
    import copy

    import gguf
    import numpy as np

    tok, model, files = exported
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2 and p.shape[-1] % 32 == 0:  # what the export quantizes
                a = p.numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
                p.copy_(torch.from_numpy(np.ascontiguousarray(back).reshape(a.shape)))
    prompt = tok.encode("def f(x): return 12345")
    llm = llama_cpp.load(files[kind])
    llm.reset()
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[len(prompt) - 1])
    with torch.no_grad():
        ours = rounded(torch.tensor([prompt]))[0, -1].numpy()
        unrounded = model(torch.tensor([prompt]))[0, -1].numpy()
    err = float(np.abs(theirs - ours).max())
    assert err < 0.05 * float(ours.std())
    if kind == "q4_0":
        assert err < 0.5 * float(np.abs(theirs - unrounded).max())
