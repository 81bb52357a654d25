"""No bf16 where it is emulated: the device's decision, Muon's iteration, and every op issued.

A CPU without AVX-512 BF16 / AMX emulates bf16 (measured 4-50x slower than fp32), so on such
a CPU no training or inference path may issue a bf16 or fp16 op, whatever params say. The
machine kind is faked by replacing ``llmcore.device.cpu_flags``; a ``TorchDispatchMode``
records the dtype of every op that reaches a kernel.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llmcore import device as devmod
from llmcore.config.model import parse_model
from llmcore.config.train import TrainConfig
from llmcore.data.tokenizer import token_bytes
from llmcore.device import precision
from llmcore.schema import UserError
from llmcore.train.fit import FitSpec, fit
from llmcore.train.muon import COEFFICIENTS, Muon, newton_schulz

HALF = (torch.bfloat16, torch.float16)
MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "mv", "addmv",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
          "_weight_int8pack_mm"}
AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}  # AVX-512 without the BF16 extension
BF16 = AVX512 | {"avx512_bf16"}


class OpDtypes(TorchDispatchMode):
    """Counts, per op name, the dtypes of the floating tensors it reads or writes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[tuple[str, torch.dtype]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen[(name, t.dtype)] += 1
        return out

    def half_ops(self) -> set[str]:
        return {name for name, dtype in self.seen if dtype in HALF}

    def matmuls(self, dtype: torch.dtype) -> int:
        return sum(n for (name, d), n in self.seen.items() if name in MATMUL and d == dtype)


@pytest.fixture
def cpu_kind(monkeypatch):
    def use(flags: frozenset[str]) -> None:
        monkeypatch.setattr(devmod, "cpu_flags", lambda: flags)
    return use


# -- the decision --------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [AVX2, AVX512], ids=["avx2", "avx512-no-bf16"])
def test_without_native_bf16_every_part_runs_in_fp32_whatever_params_say(cpu_kind, flags):
    cpu_kind(flags)
    cpu = torch.device("cpu")
    auto = precision("auto", cpu)
    assert (auto.autocast, auto.orthogonalize, auto.native_bf16) == (torch.float32,
                                                                     torch.float32, False)
    asked = precision("bfloat16", cpu)
    assert asked.autocast == torch.float32 and asked.orthogonalize == torch.float32
    assert "base.dtype bfloat16 asked, float32 used" in asked.note
    line = asked.describe()
    assert "no native bf16" in line and "Muon orthogonalisation in float32" in line
    assert ("AVX2" if flags == AVX2 else "AVX-512,") in line
    assert asked.metrics("pretrain") == {"pretrain/native_bf16": 0,
                                         "pretrain/autocast_dtype": "float32",
                                         "pretrain/muon_dtype": "float32"}
    with pytest.raises(UserError, match="float16 is not supported on CPU"):
        precision("float16", cpu)
    with pytest.raises(UserError, match=r"base.dtype must be one of auto, float32, bfloat16"):
        precision("bf16", cpu)  # library callers (benchmarks) bypass the params schema


def test_with_native_bf16_a_cpu_uses_it_only_when_asked(cpu_kind):
    cpu_kind(BF16)
    cpu = torch.device("cpu")
    auto = precision("auto", cpu)  # measured slower than float32 at CPU sizes: not by default
    assert (auto.autocast, auto.orthogonalize, auto.note) == (torch.float32, torch.float32, "")
    assert "AVX-512 BF16" in auto.describe() and "native bf16" in auto.describe()
    asked = precision("bfloat16", cpu)
    assert (asked.autocast, asked.orthogonalize, asked.note) == (torch.bfloat16, torch.bfloat16,
                                                                 "")
    fp32 = precision("float32", cpu)
    assert (fp32.autocast, fp32.orthogonalize) == (torch.float32, torch.float32)


# -- Muon's Newton-Schulz against torch's ----------------------------------------------------------

class _KeepFloat32(TorchDispatchMode):
    """Runs torch's bf16 Newton-Schulz in fp32: its casts to bf16 become fp32 copies."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


SHAPES = [(64, 176), (176, 64), (96, 96), (256, 704)]


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_in_fp32_equals_torchs_iteration_run_in_fp32(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    with _KeepFloat32():
        reference = torch_newton_schulz(g, COEFFICIENTS, 5, 1e-7)
    assert reference.dtype == torch.float32
    ours = newton_schulz(g, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    # same operations in the same order: equal up to float32 rounding of the kernels
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    # and it orthogonalises: singular values pushed from anywhere into about [0.6, 1.25]
    s = torch.linalg.svdvals(ours.double())
    assert 0.6 < s.min() and s.max() < 1.25
    # torch's own (bf16) result differs from the fp32 one only by bf16 rounding
    torch.testing.assert_close(torch_newton_schulz(g, COEFFICIENTS, 5, 1e-7).float(), ours,
                               atol=0.03, rtol=0.05)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_newton_schulz_in_bf16_is_bit_equal_to_torchs(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(newton_schulz(g, dtype=torch.bfloat16),
                       torch_newton_schulz(g, COEFFICIENTS, 5, 1e-7))


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_in_bf16_steps_exactly_like_torch_muon_and_shares_its_state(nesterov):
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(48, 80, generator=gen), torch.randn(80, 48, generator=gen)]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    theirs = [torch.nn.Parameter(w.clone()) for w in w0]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    a = Muon(ours, ns_dtype=torch.bfloat16, **kw)
    b = torch.optim.Muon(theirs, adjust_lr_fn="match_rms_adamw", **kw)
    for _ in range(3):
        grads = [torch.randn(w.shape, generator=gen) for w in w0]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
    c = Muon([torch.nn.Parameter(w.clone()) for w in w0], ns_dtype=torch.float32, **kw)
    c.load_state_dict(b.state_dict())  # a torch.optim.Muon checkpoint resumes here
    assert all(torch.equal(c.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
               for p, q in zip(c.param_groups[0]["params"], theirs, strict=True))


def test_muon_without_nesterov_leaves_its_momentum_untouched_by_the_iteration():
    p = torch.nn.Parameter(torch.randn(16, 24))
    opt = Muon([p], lr=0.01, momentum=0.5, nesterov=False)
    p.grad = torch.randn(16, 24)
    opt.step()
    # B = 0.5 * 0 + 0.5 g: the in-place normalisation must not have scaled it
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.5 * p.grad)


# -- every op of every training path -------------------------------------------------------------

MODEL = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 64})
ONE_STEP = TrainConfig(max_steps=1, batch_size=4, warmup_steps=0, eval_every=1, eval_batches=1,
                       log_every=1, checkpoint_every=1, peak_flops=1e12)


def _fit(shards, tmp_path, optimizer, dtype="bfloat16", **kw):
    shard_dir, tok = shards
    spec = FitSpec(model=MODEL, train=dataclasses.replace(ONE_STEP, optimizer=optimizer),
                   shard_dir=shard_dir, train_split="pretrain_train", val_split="pretrain_val",
                   token_bytes=tuple(token_bytes(tok)), checkpoint_dir=tmp_path / optimizer,
                   seed=1, device="cpu", dtype=dtype, data={"t": 1}, **kw)
    return fit(spec, log=lambda m: None)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_no_half_precision_op_in_a_training_step_without_native_bf16(cpu_kind, tiny_shards,
                                                                      tmp_path, optimizer):
    cpu_kind(AVX2)
    with OpDtypes() as ops:  # base.dtype bfloat16 asked: it must not matter
        out = _fit(tiny_shards, tmp_path, optimizer)
    assert out.result.step == 1 and ops.matmuls(torch.float32) > 0
    assert ops.half_ops() == set()
    assert out.precision.metrics("pretrain")["pretrain/muon_dtype"] == "float32"


def test_no_half_precision_op_in_a_lora_step_without_native_bf16(cpu_kind, tiny_shards,
                                                                 tmp_path):
    from llmcore.model.lora import LoRASpec
    from llmcore.model.modeldir import save_model_dir, state_dict_for_save
    from llmcore.model.transformer import Transformer

    cpu_kind(AVX2)
    shard_dir, tok = tiny_shards
    tok.save(tmp_path / "tok")
    save_model_dir(tmp_path / "init", MODEL, state_dict_for_save(Transformer(MODEL)),
                   tmp_path / "tok", {}, {})
    with OpDtypes() as ops:
        out = _fit(tiny_shards, tmp_path, "muon", init_from=tmp_path / "init",
                   adapter=LoRASpec(rank=4, alpha=8))
    assert out.adapter and ops.matmuls(torch.float32) > 0
    assert ops.half_ops() == set()


def test_no_half_precision_op_in_dpo_and_grpo_steps_without_native_bf16(cpu_kind,
                                                                        tiny_tokenizer):
    from llmcore.align.dpo import encode_pairs, reference_logprobs, train_dpo
    from llmcore.align.grpo import train_grpo
    from llmcore.align.run import policy_context
    from llmcore.config.dpo import DPOConfig
    from llmcore.config.rl import RLConfig
    from llmcore.model.transformer import Transformer

    cpu_kind(AVX2)
    torch.manual_seed(0)
    cfg = dataclasses.replace(MODEL, max_seq_len=128)
    policy, ref = Transformer(cfg), Transformer(cfg)
    pairs = [{"prompt": [{"role": "user", "content": f"q {i}"}], "chosen": "yes",
              "rejected": "no"} for i in range(8)]
    tasks = [{"messages": [{"role": "user", "content": f"say yes {i}"},
                           {"role": "assistant", "content": "yes"}], "answer": "yes"}
             for i in range(4)]
    with OpDtypes() as ops:
        kept, rows = encode_pairs(tiny_tokenizer, pairs, 128)
        refs = reference_logprobs(ref, kept, rows)
        dpo = DPOConfig(max_steps=1, warmup_steps=0, batch_size=4, eval_every=1)
        rl = RLConfig(max_steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3)
        # bfloat16 asked: on this (AVX2) CPU the contexts fall back to float32
        kw = {"seed": 0, "device": torch.device("cpu"), "dtype": "bfloat16", "data": {},
              "log": lambda m: None}
        dctx = policy_context("dpo", dpo, code=["llmcore.align.dpo"], **kw)
        rctx = policy_context("rl", rl, code=["llmcore.align.grpo"], **kw)
        assert dctx.dtype == rctx.dtype == torch.float32
        train_dpo(policy, kept[:4], refs[:4], kept[4:], refs[4:], rows, dpo, dctx, seed=0)
        train_grpo(policy, ref, tiny_tokenizer, tasks, rl, rctx, seed=0)
    assert ops.matmuls(torch.float32) > 0
    assert ops.half_ops() == set()


def test_with_native_bf16_asked_muon_and_autocast_issue_bf16(cpu_kind, tiny_shards, tmp_path):
    cpu_kind(BF16)
    with OpDtypes() as ops:
        out = _fit(tiny_shards, tmp_path, "muon", dtype="bfloat16")
    assert out.precision.orthogonalize == torch.bfloat16
    assert ops.matmuls(torch.bfloat16) > 0
    assert ops.seen[("addmm", torch.bfloat16)] > 0  # the Newton-Schulz polynomial
    with OpDtypes() as ops:  # auto on a CPU: float32 throughout, Muon included
        out = _fit(tiny_shards, tmp_path / "auto", "muon", dtype="auto")
    assert out.precision.orthogonalize == torch.float32
    assert ops.half_ops() == set()


def test_auto_on_a_cpu_trains_in_what_measured_faster(cpu_kind, tiny_shards, tmp_path,
                                                       monkeypatch):
    """Unpinned, ``auto`` on a native-bf16 CPU asks the probe; the run trains (autocast and
    Muon) in its verdict, and the fingerprint holds it (a resume cannot mix the two)."""
    import llmcore.train.autocast_probe as probe

    cpu_kind(BF16)
    monkeypatch.delenv(probe.PIN_ENV)
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "step_seconds", lambda *a, **k: {"float32": 2.0, "bfloat16": 1.0})
    with OpDtypes() as ops:
        fast = _fit(tiny_shards, tmp_path / "bf16", "muon", dtype="auto")
    assert fast.precision.autocast == fast.precision.orthogonalize == torch.bfloat16
    assert ops.matmuls(torch.bfloat16) > 0 and "2.00x" in fast.precision.note
    (tmp_path / "cache" / probe.CACHE_FILE).unlink()
    monkeypatch.setattr(probe, "step_seconds", lambda *a, **k: {"float32": 1.0, "bfloat16": 2.0})
    with OpDtypes() as ops:
        slow = _fit(tiny_shards, tmp_path / "fp32", "muon", dtype="auto")
    assert slow.precision.autocast == torch.float32 and ops.half_ops() == set()
    assert slow.fingerprint != fast.fingerprint
