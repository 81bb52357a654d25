import dataclasses

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.infer.generate import (
    Detokenizer,
    KVCache,
    Sampling,
    generate,
    generate_no_cache,
    sample_next,
    stream,
)
from llmcore.model.transformer import Transformer

CFG = parse_model({"preset": "tiny", "vocab_size": 50, "max_seq_len": 128})


@pytest.fixture(scope="module")
def model():
    """A tiny model trained briefly on a repeating pattern, so greedy decoding is not flat."""
    torch.manual_seed(0)
    m = Transformer(CFG)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    data = torch.tensor([[(i * 7 + j) % 47 + 3 for j in range(40)] for i in range(8)])
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(m(data[:, :-1]).reshape(-1, 50),
                                                 data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("positions", ["rope", "learned", "none"])
def test_cache_equals_recompute(positions):
    torch.manual_seed(1)
    m = Transformer(dataclasses.replace(CFG, positions=positions)).eval()
    prompt = [5, 9, 11, 3, 7]
    cached = generate(m, [prompt], Sampling(max_new_tokens=30))[0]
    assert cached == generate_no_cache(m, prompt, 30)


def test_cached_logits_match_full_forward(model):
    ids = torch.randint(3, 50, (2, 12))
    full = model(ids)
    cache = KVCache.for_model(model, 2, 12)
    pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache)
                                                 for i in range(5, 12)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    assert cache.offset == 12
    with pytest.raises(ValueError, match="KV cache holds 12 positions"):
        model(ids[:, :1], cache=cache)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_batched_equals_one_by_one(positions):
    torch.manual_seed(2)
    m = Transformer(dataclasses.replace(CFG, positions=positions)).eval()
    prompts = [[4, 8, 15], [16, 23, 42, 7, 9, 10, 11], [5]]
    batched = generate(m, prompts, Sampling(max_new_tokens=12))
    single = [generate(m, [p], Sampling(max_new_tokens=12))[0] for p in prompts]
    assert batched == single


def test_stop_tokens_end_each_row_separately(model):
    prompts = [[3, 10, 17], [20, 27]]
    free = generate(model, prompts, Sampling(max_new_tokens=10))
    stop = free[0][2]
    out = generate(model, prompts, Sampling(max_new_tokens=10), stop_ids=[stop])
    assert out[0] == free[0][: free[0].index(stop)]
    assert stop not in out[1] and (out[1] == free[1] or free[1][len(out[1])] == stop)
    kept = generate(model, prompts, Sampling(max_new_tokens=10), stop_ids=[stop], keep_stop=True)
    assert kept[0][-1] == stop


def test_seeded_sampling_is_reproducible_and_varies_with_seed(model):
    s = Sampling(max_new_tokens=20, temperature=1.5, seed=7)
    a = generate(model, [[3, 4, 5]], s)
    assert a == generate(model, [[3, 4, 5]], s)
    others = {tuple(generate(model, [[3, 4, 5]], dataclasses.replace(s, seed=k))[0])
              for k in range(8, 14)}
    assert len(others | {tuple(a[0])}) > 1


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next(logits, Sampling(temperature=5.0, top_k=2), g)) for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {int(sample_next(logits, Sampling(temperature=1.0, top_p=0.5), g))
              for _ in range(200)}
    assert seen_p == {0}  # token 0 alone holds more than half the mass
    seen_all = {int(sample_next(logits, Sampling(temperature=5.0), g)) for _ in range(300)}
    assert len(seen_all) >= 4


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert sample_next(logits, Sampling(), None).tolist() == [1, 0]


def test_sampling_validation():
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1)


def test_stream_yields_the_same_tokens(model):
    prompt = [3, 10, 17]
    assert list(stream(model, prompt, Sampling(max_new_tokens=15))) == \
        generate(model, [prompt], Sampling(max_new_tokens=15))[0]


def test_the_detokenizer_holds_back_partial_characters(tiny_tokenizer):
    """The one decoder of the CLI's stream and the server's replies: pieces with no partial
    character, and at every step the text of one decode of every id so far."""
    text = "héllo 🎉 wörld"
    ids = tiny_tokenizer.encode_text(text)
    detok = Detokenizer(tiny_tokenizer)
    pieces = []
    for n, i in enumerate(ids, 1):
        pieces.append(detok.stream(i))
        assert detok.text == tiny_tokenizer.decode(ids[:n])
    assert "".join(pieces) == text
    assert "" in pieces  # a part of a character was held back
    assert all("\ufffd" not in p for p in pieces)
