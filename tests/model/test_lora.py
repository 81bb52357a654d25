"""LoRA: exact start, merge, adapters on disk, and PEFT as the independent reference."""

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.model.lora import (
    LoRALinear,
    LoRASpec,
    apply_lora,
    load_adapter,
    merge_lora,
    merge_state_dict,
    save_adapter,
    trainable_parameters,
)
from llmcore.model.modeldir import save_model_dir, state_dict_for_save
from llmcore.model.transformer import Transformer


def base_model(seed=0):
    torch.manual_seed(seed)
    cfg = parse_model({"preset": "tiny", "vocab_size": 300})
    return Transformer(cfg).eval(), cfg


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))


def test_zero_initialised_adapters_leave_logits_bit_identical():
    model, _ = base_model()
    before = model(IDS)
    apply_lora(model, LoRASpec(rank=4))
    assert torch.equal(model(IDS), before)


def test_only_adapters_train_and_their_share_is_small():
    from llmcore.config.train import TrainConfig
    from llmcore.train.optim import make_optimizer

    model, _ = base_model()
    wrapped = apply_lora(model, LoRASpec(rank=8, targets=("q", "v")))
    assert wrapped == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                       "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    trainable, total = trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert trainable / total < 0.10
    opt = make_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    loss = model(IDS).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)


def test_merged_model_equals_the_adapter_model():
    model, cfg = base_model()
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    randomize_b(model)
    with torch.no_grad():
        adapted = model(IDS)
        merged_sd = merge_state_dict(model.state_dict(), 8 / 4)
        merged = merge_lora(model)(IDS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    plain = Transformer(cfg).eval()
    plain.load_state_dict(merged_sd)
    torch.testing.assert_close(plain(IDS), adapted, atol=1e-5, rtol=1e-5)


def test_adapter_saved_alone_and_loaded_onto_the_base(tmp_path):
    model, _ = base_model()
    spec = LoRASpec(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    apply_lora(model, spec)
    randomize_b(model)
    save_adapter(model.state_dict(), spec, tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.3 * sum(p.numel() * 4 for p in base_model()[0].parameters())
    fresh, _ = base_model()
    assert load_adapter(fresh, tmp_path / "adapter") == spec
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(base_model()[0], LoRASpec(targets=("qq",)))


def test_peft_on_the_hugging_face_export_gives_the_same_logits(tmp_path, tiny_tokenizer):
    """The independent reference: our adapter files, loaded by PEFT onto the model exported
    for transformers, compute what llmcore's LoRA model computes."""
    peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e '.[dev]')")
    from transformers import LlamaForCausalLM

    from llmcore.export.hf import export_hf

    model, cfg = base_model()
    tiny_tokenizer.save(tmp_path / "tok")
    save_model_dir(tmp_path / "m", cfg, state_dict_for_save(model), tmp_path / "tok", {},
                   {"eos_token_id": [2, 0], "pad_token_id": 3})
    spec = LoRASpec(rank=4, alpha=12, targets=("q", "k", "v", "o", "gate", "up", "down"))
    apply_lora(model, spec)
    randomize_b(model)
    save_adapter(model.state_dict(), spec, tmp_path / "adapter")
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
        ours = model(IDS)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, ours, atol=1e-4, rtol=1e-4)


def test_lora_fit_trains_adapters_only_resumes_exactly_and_exports_merged(tiny_shards,
                                                                          tmp_path):
    """fit() with LoRA: the base weights stay as loaded, the export is a plain model equal to
    the adapter model, and a resumed run gives the same weights as an uninterrupted one."""
    import dataclasses
    import shutil

    from llmcore.config.train import TrainConfig
    from llmcore.data.tokenizer import token_bytes
    from llmcore.model.modeldir import read_weights
    from llmcore.train.checkpoint import CheckpointManager
    from llmcore.train.fit import FitSpec, fit

    shard_dir, tok = tiny_shards
    cfg_model = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 64})
    torch.manual_seed(0)
    init = Transformer(cfg_model)
    tok.save(tmp_path / "tok")
    save_model_dir(tmp_path / "init", cfg_model, state_dict_for_save(init), tmp_path / "tok",
                   {}, {})
    spec = LoRASpec(rank=4, alpha=8, dropout=0.1)  # dropout: the RNG must resume too
    cfg = TrainConfig(max_steps=16, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                      eval_every=8, eval_batches=2, log_every=8, checkpoint_every=8,
                      peak_flops=1e12, optimizer="adamw", export="last")

    def run(ckpt, **kw):
        return fit(FitSpec(model=cfg_model, train=dataclasses.replace(cfg, **kw), seed=1,
                           device="cpu", dtype="float32", shard_dir=shard_dir,
                           train_split="pretrain_train", val_split="pretrain_val",
                           token_bytes=tuple(token_bytes(tok)), checkpoint_dir=ckpt,
                           data={"t": 1}, init_from=tmp_path / "init", adapter=spec),
                   log=lambda m: None)

    full = run(tmp_path / "a")
    assert full.result.history[-1]["loss"] < full.result.history[0]["loss"]
    assert 0 < full.trainable < 0.2 * full.params and full.params == init.num_parameters()
    assert set(full.export_weights) == set(state_dict_for_save(init))  # a plain model
    assert full.adapter and all(k.endswith((".lora_A", ".lora_B")) for k in full.adapter)
    base = read_weights(tmp_path / "init")
    changed = [k for k in base if not torch.equal(base[k], full.export_weights[k])]
    assert changed and all(any(t in k for t in ("proj",)) for k in changed)  # merged only
    plain = Transformer(cfg_model).eval()
    plain.load_state_dict(full.export_weights, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS % 300), full.model.eval()(IDS % 300),
                                   atol=1e-5, rtol=1e-5)

    # stop after step 8, resume: bit-identical to the uninterrupted run
    part = run(tmp_path / "b")
    shutil.rmtree(CheckpointManager(tmp_path / "b", part.fingerprint).steps()[-1])
    resumed = run(tmp_path / "b")
    assert resumed.result.resumed_from == 8
    for k, v in full.export_weights.items():
        assert torch.equal(v, resumed.export_weights[k]), k


@pytest.mark.slow  # torch.compile: seconds of kernel building
def test_lora_fit_with_compiled_blocks_trains_like_eager(tiny_shards, tmp_path):
    """SFT's default ``compile: true`` with ``method: lora``: the blocks holding the adapters
    compile, and the run's losses are the eager run's up to float rounding."""
    import dataclasses

    from llmcore.config.train import TrainConfig
    from llmcore.data.tokenizer import token_bytes
    from llmcore.train.fit import FitSpec, fit

    shard_dir, tok = tiny_shards
    cfg_model = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 64})
    torch.manual_seed(0)
    tok.save(tmp_path / "tok")
    save_model_dir(tmp_path / "init", cfg_model, state_dict_for_save(Transformer(cfg_model)),
                   tmp_path / "tok", {}, {})
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=6,
                      eval_batches=1, log_every=6, checkpoint_every=6, peak_flops=1e12,
                      optimizer="adamw")
    logs: list[str] = []

    def run(name, **kw):
        return fit(FitSpec(model=cfg_model, train=dataclasses.replace(cfg, **kw), seed=1,
                           device="cpu", dtype="float32", shard_dir=shard_dir,
                           train_split="pretrain_train", val_split="pretrain_val",
                           token_bytes=tuple(token_bytes(tok)), checkpoint_dir=tmp_path / name,
                           data={"t": 1}, init_from=tmp_path / "init",
                           adapter=LoRASpec(rank=4, alpha=8)), log=logs.append)

    eager, compiled = run("e"), run("c", compile=True)
    assert any("blocks compiled" in m for m in logs), logs
    assert [h["loss"] for h in compiled.result.history] == pytest.approx(
        [h["loss"] for h in eager.result.history], rel=1e-4)
