import dataclasses
import itertools

import pytest
import torch

from llmcore.config.model import PRESETS, ModelConfig, parse_model
from llmcore.model.transformer import Transformer, count_parameters, flops_per_token

TINY = parse_model({"preset": "tiny", "vocab_size": 97, "max_seq_len": 64})


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(TINY, **overrides)).eval()


def test_shapes():
    model = build()
    x = torch.randint(0, 97, (3, 17))
    assert model(x).shape == (3, 17, 97)


SWITCHES = list(itertools.product(("rope", "learned", "none"), ("rmsnorm", "layernorm"),
                                  ("swiglu", "gelu"), (True, False), (1, 2, 4), (True, False)))


@pytest.mark.parametrize("positions,norm,mlp,tie,kv,bias", SWITCHES)
def test_parameter_formula_matches_module(positions, norm, mlp, tie, kv, bias):
    cfg = dataclasses.replace(TINY, positions=positions, norm=norm, mlp=mlp, tie_embeddings=tie,
                              n_kv_heads=kv, bias=bias)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == count_parameters(cfg)


@pytest.mark.parametrize("positions,norm,mlp", [(p, n, m) for p, n, m, *_ in SWITCHES[::8]])
def test_each_switch_runs_forward_and_backward(positions, norm, mlp):
    model = build(positions=positions, norm=norm, mlp=mlp, dropout=0.1).train()
    x = torch.randint(0, 97, (2, 9))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_formula_on_meta_device(preset):
    cfg = parse_model({"preset": preset})
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == count_parameters(cfg)
    assert flops_per_token(cfg, 256) > 6 * (count_parameters(cfg) - cfg.vocab_size * cfg.d_model)


def test_llama_preset_is_half_a_billion():
    cfg = parse_model({"preset": "llama-0.5b", "vocab_size": 6400})
    assert 400e6 <= count_parameters(cfg) <= 600e6
    assert cfg.n_kv_heads < cfg.n_heads and cfg.positions == "rope" and cfg.mlp == "swiglu"


def test_gpt2_mini_is_gpt2_shaped():
    cfg = parse_model({"preset": "gpt2-mini"})
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model) == (6, 6, 384)
    assert (cfg.norm, cfg.mlp, cfg.positions) == ("layernorm", "gelu", "learned")


@pytest.mark.parametrize("positions", ["rope", "learned", "none"])
def test_causality(positions):
    model = build(positions=positions)
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


def test_rope_depends_only_on_relative_offsets():
    from llmcore.model.transformer import apply_rope, rope_cache

    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> float:
        cos, sin = rope_cache(16, torch.tensor([pq, pk]), 10000.0)
        rq = apply_rope(q, cos[:1], sin[:1])
        rk = apply_rope(k, cos[1:], sin[1:])
        return float((rq * rk).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) == pytest.approx(score(3, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_learned_positions_refuse_sequences_past_the_table():
    model = build(positions="learned", max_seq_len=16)
    with pytest.raises(ValueError, match=r"position 16 is past the learned position table \(model.max_seq_len = 16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, d_model=256, n_heads=4, n_kv_heads=4, n_layers=8)
    model = Transformer(cfg)
    q_std = float(model.layers[0].self_attn.q_proj.weight.detach().std())
    o_std = float(model.layers[0].self_attn.o_proj.weight.detach().std())
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)


def test_tied_embeddings_share_storage():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert build(tie_embeddings=False).lm_head.weight.data_ptr() != \
        build(tie_embeddings=False).embed_tokens.weight.data_ptr()


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = Transformer(TINY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(60):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 4.0 and losses[-1] < 0.5 * losses[0] and losses[-1] < 1.0


def test_matches_huggingface_llama_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dataclasses.replace(TINY, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96,
                              rope_theta=1e6, tie_embeddings=False, norm_eps=1e-6)
    torch.manual_seed(3)
    ours = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so that the norms are really compared
        for m in ours.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                         intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False)
    hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        a = ours(x)
        b = hf(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_model_config_validation_messages():
    from llmcore.schema import ConfigError

    with pytest.raises(ConfigError, match="model.positions must be one of rope, learned, none"):
        parse_model({"positions": "alibi"})
    with pytest.raises(ConfigError, match="unknown key model.layers"):
        parse_model({"layers": 3})
    cfg = parse_model({"preset": "tiny", "n_layers": 3})
    assert cfg.n_layers == 3 and cfg.d_model == PRESETS["tiny"]["d_model"]
    assert isinstance(cfg, ModelConfig)


def test_document_mask_keeps_packed_documents_apart():
    from llmcore.data.shards import eot_segments

    cfg = parse_model({"preset": "tiny", "vocab_size": 300, "doc_mask": True})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    a, other_a = torch.randint(4, 300, (1, 10)), torch.randint(4, 300, (1, 10))
    b, eot = torch.randint(4, 300, (1, 12)), torch.zeros(1, 1, dtype=torch.long)
    row, row2 = torch.cat([a, eot, b], 1), torch.cat([other_a, eot, b], 1)
    seg = torch.from_numpy(eot_segments(row.numpy(), 0))
    with torch.no_grad():
        out, out2 = model(row, segments=seg), model(row2, segments=seg)
        alone = model(torch.cat([eot, b], 1))  # the second document by itself
        plain = Transformer(dataclasses.replace(cfg, doc_mask=False)).eval()
        plain.load_state_dict(model.state_dict())
        leaky, leaky2 = plain(row), plain(row2)
    assert not torch.allclose(out[0, :10], out2[0, :10])
    # changing the first document leaves every logit of the second unchanged ...
    assert torch.allclose(out[0, 10:], out2[0, 10:], atol=1e-5)
    # ... which reads as if alone, positions counted from its own start
    assert torch.allclose(out[0, 10:], alone[0], atol=1e-5)
    # without the mask the second document sees the first
    assert not torch.allclose(leaky[0, 10:], leaky2[0, 10:], atol=1e-3)


def test_describe_names_the_machine_kind_and_precision():
    from llmcore.device import describe

    text = describe(torch.device("cpu"), torch.bfloat16)
    assert text.startswith("cpu with ") and "training and held-out losses in bfloat16" in text
    assert f"{torch.get_num_threads()} threads" in text


# --- prepared for inference: fused projections and a RoPE table change ops, not answers ----

PREPARE_CASES = [("rope", "rmsnorm", "swiglu", 2, False), ("rope", "rmsnorm", "swiglu", 4, True),
                 ("learned", "layernorm", "gelu", 4, True), ("none", "rmsnorm", "swiglu", 1, False)]


@pytest.mark.parametrize("positions,norm,mlp,kv,bias", PREPARE_CASES)
def test_prepared_model_computes_what_the_plain_one_does(positions, norm, mlp, kv, bias):
    from llmcore.infer.generate import KVCache, Sampling, generate

    plain = build(positions=positions, norm=norm, mlp=mlp, n_kv_heads=kv, bias=bias)
    if bias:  # zero-initialised biases would hide a bias left out of the fused matmul
        with torch.no_grad():
            for name, p in plain.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    prepared = build(positions=positions, norm=norm, mlp=mlp, n_kv_heads=kv, bias=bias)
    prepared.load_state_dict(plain.state_dict())
    prepared.prepare_inference()
    attn = prepared.layers[0].self_attn
    assert attn.qkv is not None and attn.qkv[0].shape[0] == attn.q_proj.weight.shape[0] + 2 * \
        attn.k_proj.weight.shape[0]
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), plain(x), rtol=1e-5, atol=1e-5)
        caches = [KVCache.for_model(m, 2, 16) for m in (plain, prepared)]
        for m, c in zip((plain, prepared), caches, strict=True):
            m(x[:, :8], cache=c)
        torch.testing.assert_close(prepared(x[:, 8:9], cache=caches[1]),
                                   plain(x[:, 8:9], cache=caches[0]), rtol=1e-5, atol=1e-5)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]  # left-padded: explicit positions through the table
    s = Sampling(max_new_tokens=12)
    assert generate(prepared, prompts, s) == generate(plain, prompts, s)


def test_prepared_weights_stay_one_and_training_gets_the_plain_model_back():
    from safetensors.torch import save

    model = build().prepare_inference()
    attn = model.layers[0].self_attn
    assert attn.qkv is not None
    with torch.no_grad():  # the separate weight is a view of the fused one: no stale copy
        attn.k_proj.weight.add_(1.0)
    q_rows = attn.q_proj.weight.shape[0]
    assert torch.equal(attn.qkv[0][q_rows : q_rows + attn.k_proj.weight.shape[0]],
                       attn.k_proj.weight)
    x = torch.randint(0, 97, (1, 5))


    def storage(p: torch.Tensor) -> int:
        return p.untyped_storage().data_ptr()

    assert storage(attn.q_proj.weight) == storage(attn.k_proj.weight)
    model.train()  # back to separate projections with their own storage
    assert attn.qkv is None and model.rope_table is None
    assert storage(attn.q_proj.weight) != storage(attn.k_proj.weight)
    save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})  # (tied)
    model(x).sum().backward()  # and the gradient reaches the separate weights
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    model.eval().prepare_inference()
    model.double()  # a move makes new weights: the fused views would be stale, so dropped
    assert model.layers[0].self_attn.qkv is None and model.rope_table is None


def test_rope_table_is_used_only_where_the_cache_bounds_the_positions():
    from llmcore.infer.generate import KVCache

    model = build().prepare_inference(max_len=16)
    assert model.rope_table is not None and model.rope_table[0].shape[0] == 16
    with torch.no_grad():
        model.rope_table[0].zero_()  # a poisoned table shows where it is read
        model.rope_table[1].zero_()
        x = torch.randint(0, 97, (1, 6))
        poisoned = model(x, cache=KVCache.for_model(model, 1, 16))
        computed = model(x, cache=KVCache.for_model(model, 1, 40))  # past the table: computed
        plain = build()(x)
    assert not torch.allclose(poisoned, plain, atol=1e-3)
    torch.testing.assert_close(computed, plain, rtol=1e-5, atol=1e-5)
