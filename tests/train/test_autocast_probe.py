"""``base.dtype: auto`` on a CPU: bf16 only where it measured faster, decided once per shape."""

from __future__ import annotations

import json

import pytest
import torch

import llmcore.device as devmod
import llmcore.train.autocast_probe as probe
from llmcore.config.model import parse_model
from llmcore.config.pretrain import PretrainConfig
from llmcore.schema import UserError

BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2"})
CPU = torch.device("cpu")
MODEL = parse_model({"preset": "tiny", "vocab_size": 128})


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A CPU of the given flags, an empty cache, nothing pinned; returns the timings the
    probe will read and the list of shapes it measured."""
    monkeypatch.delenv(probe.PIN_ENV, raising=False)
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path / "cache"))
    timings = {"float32": 0.30, "bfloat16": 0.20}
    measured: list[tuple[int, int]] = []

    def fake(model_cfg, optim, batch_size, seq_len, rounds=3):
        measured.append((batch_size, seq_len))
        return dict(timings)

    monkeypatch.setattr(probe, "step_seconds", fake)

    def use(flags):
        monkeypatch.setattr(devmod, "cpu_flags", lambda: flags)
        return timings, measured
    return use


def test_bf16_is_kept_where_it_measured_faster_and_the_verdict_is_reused(machine):
    timings, measured = machine(BF16)
    first = probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64)
    assert (first.autocast, first.orthogonalize) == (torch.bfloat16, torch.bfloat16)
    assert "1.50x" in first.note and "measured now" in first.note
    # a later run of the shape reads the verdict: no second measurement, even if it would
    # now come out the other way (a resume must not flip its precision)
    timings.update(float32=0.1)
    again = probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64)
    assert again.autocast == torch.bfloat16 and "measured before" in again.note
    assert measured == [(8, 64)]
    # another batch is measured on its own (the gain grows with the products' size)
    other_batch = probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 16, 64)
    assert other_batch.autocast == torch.float32 and measured == [(8, 64), (16, 64)]
    cache = json.loads(probe.cache_path().read_text())
    assert sorted(v["choice"] for v in cache.values()) == ["bfloat16", "float32"]
    assert sorted(v["speedup"] for v in cache.values()) == [0.5, 1.5]
    # another shape is another verdict
    other = parse_model({"preset": "tiny", "vocab_size": 128, "d_model": 128})
    slower = probe.auto_precision("auto", CPU, other, PretrainConfig(), 8, 64)
    assert slower.autocast == torch.float32 and slower.orthogonalize == torch.float32
    assert len(measured) == 3


def test_a_tie_is_not_worth_bf16s_rounding(machine):
    timings, _ = machine(BF16)
    timings.update(float32=0.21, bfloat16=0.20)  # 1.05x: under the margin
    assert probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.float32


def test_nothing_is_measured_where_bf16_is_emulated_or_not_asked_for_by_auto(machine):
    _, measured = machine(AVX2)
    assert probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.float32
    machine(BF16)
    assert probe.auto_precision("float32", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.float32
    asked = probe.auto_precision("bfloat16", CPU, MODEL, PretrainConfig(), 8, 64)
    assert asked.autocast == torch.bfloat16
    # every rank must agree, and one rank's timing is not every rank's
    ddp = probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64, distributed=True)
    assert ddp.autocast == torch.float32 and "distributed" in ddp.note
    assert measured == []


def test_the_environment_pins_what_auto_means(machine, monkeypatch):
    _, measured = machine(BF16)
    monkeypatch.setenv(probe.PIN_ENV, "float32")
    assert probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.float32
    monkeypatch.setenv(probe.PIN_ENV, "bfloat16")
    pinned = probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64)
    assert pinned.autocast == torch.bfloat16 and probe.PIN_ENV in pinned.note
    assert measured == []
    monkeypatch.setenv(probe.PIN_ENV, "fp8")
    with pytest.raises(UserError, match="LLMCORE_AUTO_DTYPE must be float32 or bfloat16"):
        probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64)


def test_a_broken_cache_is_measured_again_and_an_unwritable_one_costs_nothing(
        machine, monkeypatch, tmp_path):
    _, measured = machine(BF16)
    path = probe.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.bfloat16
    assert len(measured) == 1 and len(json.loads(path.read_text())) == 1
    # an entry edited into something else is measured again, not trusted or crashed on
    cache = json.loads(path.read_text())
    (key,) = cache
    cache[key] = {"choice": "fp8"}
    path.write_text(json.dumps(cache))
    assert probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.bfloat16
    assert len(measured) == 2 and json.loads(path.read_text())[key]["choice"] == "bfloat16"
    # a cache folder that cannot be made (under a file: refused even to root)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    assert probe.auto_precision("auto", CPU, MODEL, PretrainConfig(), 8, 64).autocast \
        == torch.bfloat16
    assert len(measured) == 3


def test_the_measurement_times_both_dtypes_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    secs = probe.step_seconds(MODEL, PretrainConfig(), batch_size=2, seq_len=16, rounds=1)
    assert set(secs) == {"float32", "bfloat16"}
    assert all(0 < s < 60 for s in secs.values())
    assert torch.equal(torch.rand(3), expected)


def test_alignment_runs_resolve_auto_as_training_does(machine):
    from llmcore.align.run import policy_context
    from llmcore.config.dpo import DPOConfig

    _, measured = machine(BF16)
    kw = {"seed": 0, "device": CPU, "dtype": "auto", "data": {}, "code": [],
          "log": lambda m: None}
    ctx = policy_context("dpo", DPOConfig(), model_cfg=MODEL, **kw)
    assert ctx.dtype == ctx.muon_dtype == torch.bfloat16
    assert measured == [(8, 256)]
    plain = policy_context("dpo", DPOConfig(), **kw)  # no shape given: precision() alone
    assert plain.dtype == torch.float32
