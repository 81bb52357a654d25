import dataclasses
import math

import pytest
import torch

from llmcore.config.base import parse_section
from llmcore.config.model import parse_model
from llmcore.config.sft import SFTConfig
from llmcore.config.train import TrainConfig
from llmcore.data.shards import Batch, ShardDataset, ShardLoader
from llmcore.data.tokenizer import token_bytes
from llmcore.model.loss import heldout_loss, loss_sums, unigram_bpb
from llmcore.model.modeldir import load_model_dir, save_model_dir, state_dict_for_save
from llmcore.model.transformer import Transformer
from llmcore.schema import ConfigError, UserError
from llmcore.train.checkpoint import CheckpointManager
from llmcore.train.fit import FitSpec, fit
from llmcore.train.loop import RunContext, Trainer
from llmcore.train.muon import Muon
from llmcore.train.optim import lr_at, make_optimizer, param_groups

MODEL = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 64,
                                "d_model": 32, "n_heads": 2, "n_kv_heads": 1})
CFG = TrainConfig(max_steps=24, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=4,
                  eval_every=8, eval_batches=2, log_every=8, checkpoint_every=8,
                  peak_flops=1e12, optimizer="adamw")


def run_fit(shards, tmp_path, cfg=CFG, model=MODEL, log=lambda m: None, **kw):
    shard_dir, tok = shards
    args = dict(model=model, train=cfg, seed=1, device="cpu", dtype="float32",
                shard_dir=shard_dir, train_split="pretrain_train", val_split="pretrain_val",
                token_bytes=tuple(token_bytes(tok)), checkpoint_dir=tmp_path / "ckpt",
                data={"test": 1})
    args.update(kw)
    return fit(FitSpec(**args), log=log)


def test_schedule_warmup_cosine_and_wsd():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    wsd = dataclasses.replace(cfg, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, wsd) == pytest.approx(1.0) and lr_at(90, wsd) == pytest.approx(0.55)
    assert lr_at(50, dataclasses.replace(cfg, schedule="constant")) == 1.0


def test_train_config_cross_checks():
    with pytest.raises(ConfigError, match=r"pretrain.warmup_steps \(10\) must be < max_steps"):
        parse_section("pretrain", {"warmup_steps": 10, "max_steps": 10}, TrainConfig)
    with pytest.raises(ConfigError, match=r"sft.min_lr"):
        parse_section("sft", {"lr": 1e-4, "min_lr": 1e-3}, SFTConfig)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = Transformer(dataclasses.replace(MODEL, bias=True, tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.embed_tokens.weight) not in decay_ids
    assert id(model.layers[0].input_layernorm.weight) not in decay_ids
    assert id(model.layers[0].self_attn.q_proj.bias) not in decay_ids
    assert id(model.layers[0].self_attn.q_proj.weight) in decay_ids
    assert id(model.lm_head.weight) in decay_ids
    assert len(decay_ids) + len(no_decay["params"]) == len(list(model.parameters()))


def test_masked_loss_ignores_unmasked_targets():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    total, count = loss_sums(logits, targets, mask)
    changed = targets.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 11  # an unmasked target
    assert torch.equal(loss_sums(logits, changed, mask)[0], total)
    changed[0, 2] = (changed[0, 2] + 1) % 11  # a masked target
    assert not torch.equal(loss_sums(logits, changed, mask)[0], total)
    assert count == 4


def _step_grads(model, batches, cfg, shards):
    ds = ShardDataset(shards[0], "pretrain_train")
    ctx = RunContext(torch.device("cpu"), torch.float32, torch.ones(300, dtype=torch.long),
                     log=lambda m: None)
    t = Trainer(model, cfg, ShardLoader(ds, 2), None, ctx)
    loss, _ = t.train_step(model, batches)
    return loss, [p.detach().clone() for p in model.parameters()]


def test_grad_accumulation_equals_one_big_batch_with_masks(tiny_shards):
    torch.manual_seed(0)
    x = torch.randint(0, 300, (4, 9))
    mask = torch.tensor([[1] * 8, [0] * 7 + [1], [1, 0] * 4, [0, 0, 1, 1, 1, 1, 0, 0]],
                        dtype=torch.float32)
    big = [Batch(x[:, :-1], x[:, 1:], mask)]
    small = [Batch(x[:2, :-1], x[:2, 1:], mask[:2]), Batch(x[2:, :-1], x[2:, 1:], mask[2:])]
    cfg = dataclasses.replace(CFG, grad_clip=0.0)
    torch.manual_seed(1)
    m1 = Transformer(MODEL)
    m2 = Transformer(MODEL)
    m2.load_state_dict(m1.state_dict())
    l1, w1 = _step_grads(m1, big, cfg, tiny_shards)
    l2, w2 = _step_grads(m2, small, dataclasses.replace(cfg, grad_accum=2), tiny_shards)
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w1, w2, strict=True))


def test_fit_learns_and_exports_best(tiny_shards, tmp_path):
    out = run_fit(tiny_shards, tmp_path)
    r = out.result
    assert r.step == 24 and len(r.evals) == 3
    assert r.history[-1]["loss"] < r.history[0]["loss"] - 0.5
    assert r.best["val_loss"] == min(e["val_loss"] for e in r.evals)
    assert out.unigram_bpb is not None and r.best["val_bpb"] < out.unigram_bpb * 1.5
    assert r.mfu is not None and r.tokens_per_second > 0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_in_process(tiny_shards, tmp_path, optimizer):
    cfg = dataclasses.replace(CFG, export="last", optimizer=optimizer)
    model = dataclasses.replace(MODEL, dropout=0.1)  # the RNG state must be restored too
    full = run_fit(tiny_shards, tmp_path / "a", cfg=cfg, model=model)
    part = run_fit(tiny_shards, tmp_path / "b", cfg=dataclasses.replace(cfg, max_steps=24),
                   model=model, checkpoint_dir=tmp_path / "b" / "ckpt")
    # same run stopped at step 16: drop its last checkpoint and resume from step 16
    manager = CheckpointManager(tmp_path / "b" / "ckpt", part.fingerprint)
    import shutil

    shutil.rmtree(manager.steps()[-1])
    resumed = run_fit(tiny_shards, tmp_path / "b", cfg=cfg, model=model,
                      checkpoint_dir=tmp_path / "b" / "ckpt")
    assert resumed.result.resumed_from == 16
    for k, v in full.export_weights.items():
        assert torch.equal(v, resumed.export_weights[k]), k
    assert [h["loss"] for h in resumed.result.history] == [h["loss"] for h in full.result.history]


def test_corrupt_checkpoint_falls_back_to_previous(tiny_shards, tmp_path):
    out = run_fit(tiny_shards, tmp_path, cfg=dataclasses.replace(CFG, keep_checkpoints=3))
    manager = CheckpointManager(tmp_path / "ckpt", out.fingerprint)
    last = manager.steps()[-1]
    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    messages = []
    manager.log = messages.append
    loaded = manager.load_latest()
    assert loaded is not None and loaded.step == 16
    assert any("does not match its checksum" in m for m in messages)


def test_changed_params_start_fresh_or_fail_with_must(tiny_shards, tmp_path):
    run_fit(tiny_shards, tmp_path)
    logs = []
    changed = dataclasses.replace(CFG, lr=1e-3, max_steps=8)
    out = run_fit(tiny_shards, tmp_path, cfg=changed, log=logs.append)
    assert out.result.resumed_from is None
    assert any("other params, data or code" in m for m in logs)
    with pytest.raises(UserError, match="resume is must but"):
        run_fit(tiny_shards, tmp_path, cfg=dataclasses.replace(changed, lr=2e-3, resume="must"))
    # unchanged params resume (here: nothing left to train)
    again = run_fit(tiny_shards, tmp_path, cfg=changed)
    assert again.result.resumed_from == 8


def test_non_finite_loss_stops_with_clear_error(tiny_shards, tmp_path):
    cfg = dataclasses.replace(CFG, lr=1e6, min_lr=1e6, warmup_steps=0, grad_clip=0.0,
                              checkpoint_every=1, max_steps=200)
    with pytest.raises(UserError, match=r"loss became .*(nan|inf).*at step \d+; the weights "
                                        r"were not updated\. Last good checkpoint: \S+step-"):
        run_fit(tiny_shards, tmp_path, cfg=cfg)
    (config_dir,) = (tmp_path / "ckpt").iterdir()
    manager = CheckpointManager(tmp_path / "ckpt", config_dir.name + "0" * 52)
    last = manager.steps()[-1]
    assert manager.verify(last) is None
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())


def test_bpb_counts_text_bytes_only(tiny_shards):
    shard_dir, tok = tiny_shards
    ds = ShardDataset(shard_dir, "pretrain_val")
    tb = torch.tensor(token_bytes(tok))
    model = Transformer(MODEL)
    ev = heldout_loss(model, ds, 4, 2, tb, torch.device("cpu"), torch.float32)
    ids, _ = ds.gather(range(8))
    expected_bytes = float(tb[torch.from_numpy(ids[:, 1:].astype("int64"))].sum())
    assert ev["bytes"] == expected_bytes
    # an untrained model is close to uniform: loss ~ ln(V)
    assert ev["loss"] == pytest.approx(math.log(300), rel=0.05)
    assert 0 < unigram_bpb(ShardDataset(shard_dir, "pretrain_train"), ds, tb, 300) < \
        ev["bpb"]


def test_longer_context_eval_recuts_rows(tiny_shards):
    shard_dir, tok = tiny_shards
    ds = ShardDataset(shard_dir, "pretrain_val")
    tb = torch.tensor(token_bytes(tok))
    model = Transformer(MODEL)
    rows = min(len(ds), 16)
    short = heldout_loss(model, ds, 4, 4, tb, torch.device("cpu"), torch.float32)
    long = heldout_loss(model, ds, 4, 4, tb, torch.device("cpu"), torch.float32, seq_len=64)
    assert short["tokens"] == rows * 32
    assert long["tokens"] == (rows * 32) // 64 * 64


def test_model_dir_round_trip(tiny_shards, tmp_path):
    shard_dir, tok = tiny_shards
    tok.save(tmp_path / "tok")
    model = Transformer(MODEL)
    save_model_dir(tmp_path / "m", MODEL, state_dict_for_save(model), tmp_path / "tok",
                   {"step": 3}, {"eos_token_id": [2]})
    loaded, cfg = load_model_dir(tmp_path / "m")
    assert cfg == MODEL
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="model.safetensors is unreadable"):
        load_model_dir(tmp_path / "m")


def test_optimizer_state_round_trips_through_checkpoint(tiny_shards, tmp_path):
    model = Transformer(MODEL)
    opt = make_optimizer(model, CFG)
    model(torch.randint(0, 300, (1, 5))).sum().backward()
    opt.step()
    manager = CheckpointManager(tmp_path, "f" * 64)
    manager.save(1, model, opt, {"loader": {"epoch": 0, "step": 1}})
    loaded = manager.load_latest()
    ref = opt.state_dict()["optimizers"][0]
    for k, st in ref["state"].items():
        for name, t in st.items():
            assert torch.equal(loaded.optimizer["optimizers"][0]["state"][k][name], t)


def test_resumed_run_reports_the_throughput_of_the_whole_run(tiny_shards, tmp_path):
    first = run_fit(tiny_shards, tmp_path)
    again = run_fit(tiny_shards, tmp_path)  # finished: resumes at max_steps, trains nothing
    assert again.result.resumed_from == 24
    assert again.result.tokens_per_second == pytest.approx(first.result.tokens_per_second)
    assert again.result.mfu == pytest.approx(first.result.mfu)
    assert again.result.seconds > 0.5 * first.result.seconds  # restored, not restarted at 0


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = Transformer(dataclasses.replace(MODEL, bias=True))
    opt = make_optimizer(model, dataclasses.replace(CFG, optimizer="muon"))
    adamw, muon = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.ns_dtype == torch.float32  # make_optimizer's default: never emulated bf16
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in in_muon} == {
        n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("layers.")}
    assert id(model.embed_tokens.weight) in in_adamw and not in_muon & in_adamw
    assert len(in_muon) + len(in_adamw) == len({id(p) for p in model.parameters()})
    x = torch.randint(0, 300, (2, 9))
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    model(x).sum().backward()
    opt.step()
    assert not torch.equal(before, model.layers[0].mlp.up_proj.weight)


def test_the_step_loop_every_objective_shares():
    """Cadence (every N steps and the last), a clock that carries earlier sessions' seconds,
    and the curve as ``<name>/<prefix><key>`` at the step, rank 0 only."""
    from llmcore.train.step import Dist, StepLoop

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, metrics))

    rec = Recorder()
    ctx = RunContext(torch.device("cpu"), torch.float32, tracker=rec, name="dpo",
                     log=lambda line: None)
    loop = StepLoop(ctx, TrainConfig(max_steps=7, checkpoint_every=3, log_every=2), 5)
    assert [s for s in range(1, 8) if loop.eval_due(s)] == [5, 7]
    assert [s for s in range(1, 8) if loop.checkpoint_due(s)] == [3, 6, 7]
    assert not StepLoop(ctx, TrainConfig(max_steps=7)).eval_due(7)  # no evaluations asked
    loop.start(12.5)  # a resumed run: 12.5 s of training before this session
    assert 12.5 <= loop.clock() < 13.5 and loop.seconds >= 12.5
    loop.curve({"step": 4, "loss": 1.25, "reward_accuracy": 0.5, "mfu": None})
    loop.curve({"step": 5, "loss": 1.0}, "val_")
    assert rec.calls == [(4, {"dpo/loss": 1.25, "dpo/reward_accuracy": 0.5}),
                         (5, {"dpo/val_loss": 1.0})]
    other_rank = RunContext(torch.device("cpu"), torch.float32, tracker=rec, name="dpo",
                            dist=Dist(rank=1, world_size=2))
    StepLoop(other_rank, TrainConfig(max_steps=7)).curve({"step": 6, "loss": 0.5})
    assert len(rec.calls) == 2


def test_kept_positions_are_rounded_up_with_zero_loss_positions_only():
    """Under autocast the head runs on a row count rounded up to a multiple (few kernel shapes
    instead of one per step); the positions added carry no loss, so the loss is the same."""
    from llmcore.train.loop import round_up_positions

    torch.manual_seed(0)
    mask = torch.rand(3, 20) < 0.3
    n = int(mask.sum())
    keep = round_up_positions(mask, 16)
    assert int(keep.sum()) % 16 == 0 and int(keep.sum()) - n < 16
    assert bool(keep[mask].all())  # every position with a loss stays
    added = (keep & ~mask).flatten().nonzero().flatten()
    absent = (~mask).flatten().nonzero().flatten()
    assert torch.equal(added, absent[: len(added)])  # the first ones left out, in order
    assert torch.equal(round_up_positions(mask, 1), mask)
    assert bool(round_up_positions(mask, 1000).all())  # at most every position
    # the loss over the rounded-up positions is the loss over the masked ones
    cfg = parse_model({"preset": "tiny", "vocab_size": 50})
    model = Transformer(cfg)
    x, y = torch.randint(0, 50, (3, 20)), torch.randint(0, 50, (3, 20))
    m = mask.long()
    exact, count = loss_sums(model(x, keep=mask), y[mask], m[mask])
    rounded, count2 = loss_sums(model(x, keep=keep), y[keep], m[keep])
    assert count == count2 == n
    assert torch.allclose(exact, rounded, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loop_rounds_the_heads_rows_up_only_under_autocast(tiny_shards, dtype):
    """SFT's head runs where a loss is taken; under autocast that row count is rounded up
    (here past every position: 32 < 128), in float32 it is the mask's own, and the step's
    loss is the masked mean either way."""
    torch.manual_seed(0)
    model = Transformer(parse_model({"preset": "tiny", "vocab_size": 300}))
    x = torch.randint(0, 300, (4, 9))
    mask = torch.tensor([[1] * 8, [0] * 7 + [1], [1, 0] * 4, [0, 0, 1, 1, 1, 1, 0, 0]],
                        dtype=torch.float32)
    rows: list[int] = []
    forward = model.forward

    def spy(*args, **kwargs):
        rows.append(int(kwargs["keep"].sum()))
        return forward(*args, **kwargs)

    model.forward = spy
    ds = ShardDataset(tiny_shards[0], "pretrain_train")
    ctx = RunContext(torch.device("cpu"), dtype, torch.ones(300, dtype=torch.long),
                     log=lambda m: None)
    cfg = TrainConfig(max_steps=1, warmup_steps=0, optimizer="adamw")
    t = Trainer(model, cfg, ShardLoader(ds, 2), None, ctx)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = forward(x[:, :-1])  # before the step moves the weights
    expected = loss_sums(logits, x[:, 1:], mask)[0] / mask.sum()
    loss, _ = t.train_step(model, [Batch(x[:, :-1], x[:, 1:], mask)])
    assert rows == ([int(mask.sum())] if dtype == torch.float32 else [32])
    assert loss == pytest.approx(float(expected), rel=2e-2)


@pytest.mark.slow  # torch.compile: seconds of kernel building
def test_compile_compiles_each_block_and_trains_like_eager(tiny_shards, tmp_path):
    """``compile: true`` compiles the blocks, not the model: the losses are eager's up to float
    rounding, the exported names are the eager model's, and after the run the model is eager
    again (for decoding)."""
    cfg = dataclasses.replace(CFG, max_steps=8, eval_every=4)
    eager = run_fit(tiny_shards, tmp_path / "e", cfg=cfg)
    logs: list[str] = []
    compiled = run_fit(tiny_shards, tmp_path / "c", cfg=dataclasses.replace(cfg, compile=True),
                       log=logs.append)
    assert any("compile: 2 blocks compiled" in m for m in logs), logs
    assert [h["loss"] for h in compiled.result.history] == pytest.approx(
        [h["loss"] for h in eager.result.history], rel=1e-4)
    assert compiled.export_weights.keys() == eager.export_weights.keys()
    blocks = compiled.model.blocks()
    assert blocks and all(b._compiled_call_impl is None for b in blocks)


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch):
    from llmcore.train.compiled import compiled_blocks, missing_compiler

    monkeypatch.setenv("CXX", "no-such-compiler-llmcore")
    assert "no C++ compiler ('no-such-compiler-llmcore')" in missing_compiler(torch.device("cpu"))
    model = Transformer(MODEL)
    logs: list[str] = []
    with compiled_blocks(model.blocks(), torch.device("cpu"), logs.append) as compiled:
        assert not compiled
        assert all(b._compiled_call_impl is None for b in model.blocks())
    assert logs == ["compile: no C++ compiler ('no-such-compiler-llmcore') on PATH; "
                    "training eagerly"]
