import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from llmcore.config.model import parse_model
from llmcore.export.quantize import QuantSpec, quantize_model
from llmcore.infer.generate import Sampling, generate
from llmcore.model.modeldir import load_model_dir, save_model_dir, state_dict_for_save
from llmcore.model.qlinear import int8mm_available
from llmcore.model.quant import (
    dequantize_int4,
    dequantize_int8,
    load_quantized,
    quantizable,
    quantize_int4,
    quantize_int8,
)
from llmcore.model.transformer import Transformer

CFG = parse_model({"preset": "tiny", "vocab_size": 300, "max_seq_len": 128})


def test_int8_error_is_at_most_half_a_step_per_weight():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.linspace(0.1, 3, 64)[:, None]
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())
    assert float((dequantize_int8(q, s) - w).norm() / w.norm()) < 0.01


def test_int4_packs_two_per_byte_and_bounds_error():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    packed, s = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64) and s.shape == (16, 4)
    back = dequantize_int4(packed, s, 32)
    step = s.repeat_interleave(32, dim=1)
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    exact = torch.tensor([[-7.0, 7.0, 0.0, 1.0]]) * 0.5  # multiples of the scale 0.5
    p, sc = quantize_int4(exact, 4)
    assert torch.equal(dequantize_int4(p, sc, 4), exact)


def test_int4_pads_a_ragged_last_group():
    torch.manual_seed(4)
    w = torch.randn(3, 40)
    packed, s = quantize_int4(w, 16)
    assert packed.shape == (3, 24) and s.shape == (3, 3)
    back = dequantize_int4(packed, s, 16, 40)
    assert back.shape == (3, 40) and float((back - w).norm() / w.norm()) < 0.15
    with pytest.raises(ValueError, match="group_size must be even"):
        quantize_int4(w, 5)


def test_a_tied_matrix_is_quantized_once():
    model = Transformer(CFG)
    names = set(quantizable(model))
    assert "embed_tokens" in names and "lm_head" not in names
    assert "layers.0.mlp.down_proj" in names
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    assert "embed_tokens.qweight" in tensors
    assert "lm_head.weight" not in tensors and "embed_tokens.weight" not in tensors
    untied = Transformer(dataclasses.replace(CFG, tie_embeddings=False))
    names = set(quantizable(untied))
    assert "lm_head" in names and "embed_tokens" not in names


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_is_close_to_float(method, tmp_path, tiny_tokenizer):
    torch.manual_seed(2)
    model = Transformer(CFG).eval()
    spec = QuantSpec(method, group_size=32)
    tensors, errors = quantize_model(model, spec)
    bound = 0.01 if method == "int8" else 0.15
    assert errors and max(errors.values()) < bound
    tiny_tokenizer.save(tmp_path / "tok")
    save_model_dir(tmp_path / "q", CFG, tensors, tmp_path / "tok", {}, {}, spec.to_json())
    assert json.loads((tmp_path / "q/config.json").read_text())["quantization"]["method"] == method
    q_model, _ = load_model_dir(tmp_path / "q")
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        a, b = model(x), q_model(x)
    rel = float((a - b).norm() / a.norm())
    assert rel < (0.02 if method == "int8" else 0.2)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    prompts = [[5, 6, 7]]
    assert generate(q_model, prompts, Sampling(max_new_tokens=5))[0]  # loads and generates


def test_quantized_file_is_smaller(tmp_path, tiny_tokenizer):
    model = Transformer(dataclasses.replace(CFG, d_model=128, n_heads=4))
    tiny_tokenizer.save(tmp_path / "tok")
    save_model_dir(tmp_path / "fp", model.cfg, state_dict_for_save(model), tmp_path / "tok", {},
                   {})
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    save_model_dir(tmp_path / "q", model.cfg, tensors, tmp_path / "tok", {}, {},
                   QuantSpec("int8").to_json())
    fp = (tmp_path / "fp/model.safetensors").stat().st_size
    q = (tmp_path / "q/model.safetensors").stat().st_size
    assert fp / q > 3.5  # int8 everywhere but norms: close to 4x


@pytest.mark.skipif(not int8mm_available(torch.device("cpu")),
                    reason="torch._weight_int8pack_mm not available on this build")
def test_int8_kernel_runtime_matches_dequantized():
    torch.manual_seed(3)
    model = Transformer(CFG).eval()
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    deq = load_quantized(Transformer(CFG).eval(), tensors, {"method": "int8"}, "dequant")
    kern = load_quantized(Transformer(CFG).eval(), tensors, {"method": "int8"}, "int8mm")
    assert type(kern.layers[0].mlp.down_proj).__name__ == "Int8Linear"
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():  # the kernel's activations are bf16 on a CPU (8-bit mantissa)
        a, b = deq(x), kern(x)
        assert (a - b).abs().max() < 0.05 * a.std()


BF16_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16"})


def test_auto_keeps_large_layers_int8_and_expands_small_ones():
    """On a CPU with the kernel: layers of at least MIN_KERNEL_WEIGHTS weights run int8 with
    bf16 activations, smaller ones are expanded to float32 (the casts would cost more)."""
    from llmcore.model.qlinear import AVX512_KERNELS, MIN_KERNEL_WEIGHTS, int8_runtime, int_mm_exact

    cpu = torch.device("cpu")
    avx512 = torch.backends.cpu.get_cpu_capability() in AVX512_KERNELS
    if avx512 and int_mm_exact(cpu):
        assert int8_runtime(cpu) == ("w8a8", torch.float32)
        kind = "W8A8Linear"
    elif avx512 and int8mm_available(cpu, torch.bfloat16):
        assert int8_runtime(cpu) == ("int8mm", torch.bfloat16)
        kind = "Int8Linear"
    else:
        assert int8_runtime(cpu) == ("dequant", torch.float32)
        pytest.skip("no int8 kernel auto would run on this CPU")
    cfg = dataclasses.replace(CFG, d_model=256, n_heads=4, n_kv_heads=4, d_ff=704)
    tensors, _ = quantize_model(Transformer(cfg).eval(), QuantSpec("int8"))
    loaded = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, "auto")
    big, small = loaded.layers[0].mlp.up_proj, loaded.layers[0].self_attn.q_proj
    assert 256 * 704 >= MIN_KERNEL_WEIGHTS > 256 * 256
    assert type(big).__name__ == kind
    assert isinstance(small, torch.nn.Linear) and small.weight.dtype == torch.float32


def test_w8a8_layer_is_within_its_rounding_bound_of_the_dequantized_product():
    """Each input rounded to int8 per row moves by at most half a step (max|row| / 254), so
    an output moves by at most that times the row of |weights| it meets (plus float32's
    rounding); the integer product itself is exact."""
    from llmcore.model.qlinear import W8A8Linear, int_mm_exact

    if not int_mm_exact(torch.device("cpu")):
        pytest.skip("torch._int_mm is not exact on this CPU (no int8 dot products)")
    torch.manual_seed(8)
    w, bias = torch.randn(48, 160), torch.randn(48)
    q, s = quantize_int8(w)
    layer = W8A8Linear(q, s, bias)
    x = torch.randn(3, 5, 160) * torch.linspace(0.1, 4, 160)  # rows of uneven range
    wq = dequantize_int8(q, s)
    y, ref = layer(x), x @ wq.t() + bias
    assert y.shape == ref.shape and y.dtype == torch.float32
    half_step = x.abs().amax(-1, keepdim=True) / 254
    bound = half_step * wq.abs().sum(1) + 1e-4 * ref.abs().amax()
    assert bool(((y - ref).abs() <= bound).all())
    assert float((y - ref).abs().max()) > 0  # the activations were rounded: not float
    zero = layer(torch.zeros(2, 160))  # a row of zeros has no range to divide by
    assert torch.allclose(zero, bias.expand(2, -1))


def test_a_wrong_int_mm_is_never_used(monkeypatch):
    """``w8a8`` runs only where the check of ``torch._int_mm`` finds exact sums: with a
    product that saturates (what torch gave with its kernels capped below VNNI), auto falls
    back to the weight-only kernel or to float, and a model asked for ``w8a8`` is expanded."""
    import llmcore.model.qlinear as qlinear

    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a, b).clamp(-32768, 32767))
    qlinear.int_mm_exact.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert not qlinear.int_mm_exact(cpu)
        assert qlinear.int8_runtime(cpu)[0] in ("int8mm", "dequant")
        tensors, _ = quantize_model(Transformer(CFG).eval(), QuantSpec("int8"))
        asked = load_quantized(Transformer(CFG).eval(), tensors, {"method": "int8"}, "w8a8")
        assert not any(isinstance(m, qlinear.W8A8Linear) for m in asked.modules())
    finally:
        qlinear.int_mm_exact.cache_clear()


def test_auto_int8_is_close_to_float_with_kernels_capped_below_vnni(tmp_path):
    """In a process whose oneDNN is held to AVX-512 without VNNI (or to AVX2), where
    ``torch._int_mm`` was measured to return wrong sums, ``auto``'s int8 model computes what
    the dequantized one does, within bf16 rounding: whatever kernel it picked there is right."""
    import subprocess
    import sys

    code = """
import dataclasses, torch
from llmcore.export.quantize import QuantSpec, quantize_model
from llmcore.model.quant import load_quantized
from llmcore.model.qlinear import int8_runtime
from llmcore.model.transformer import Transformer
from tests.export.test_quantize import CFG
cfg = dataclasses.replace(CFG, d_model=256, n_heads=4, n_kv_heads=4, d_ff=704)
torch.manual_seed(4)
tensors, _ = quantize_model(Transformer(cfg).eval(), QuantSpec("int8"))
deq = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, "dequant")
auto = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, "auto")
x = torch.randint(0, 300, (2, 16))
with torch.no_grad():
    a, b = deq(x), auto(x)
print(int8_runtime(torch.device("cpu"))[0], float((a - b).abs().max() / a.std()))
"""
    for isa in ("AVX512_CORE", "AVX2"):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
        assert out.returncode == 0, out.stderr[-2000:]
        mode, rel = out.stdout.split()
        assert float(rel) < 0.05, (isa, mode, rel)


def test_a_kernel_cap_means_no_native_bf16(monkeypatch):
    """``ATEN_CPU_CAPABILITY=avx2`` (the benchmarks' imitation of an AVX2 machine) holds
    torch to AVX2 kernels: bf16 is emulated then, whatever the CPU's flags say."""
    import llmcore.device as devmod

    monkeypatch.setattr(devmod, "cpu_flags", lambda: BF16_FLAGS)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not devmod.native_bf16(torch.device("cpu"))
    assert devmod.cpu_kind().startswith("AVX2 (")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert devmod.native_bf16(torch.device("cpu")) and devmod.cpu_kind() == "AVX-512 BF16"


@pytest.mark.skipif(not int8mm_available(torch.device("cpu"), torch.bfloat16),
                    reason="torch._weight_int8pack_mm with bf16 activations not in this build")
def test_int8_kernel_with_bf16_activations_stays_close_and_picks_the_same_tokens():
    """bf16 activations round each input of a product to 8 bits of mantissa: the logits move
    by far less than their spread, and the dequantized model (float32) and the kernel one pick
    the same token wherever the choice is not a near-tie."""
    from llmcore.model.qlinear import Int8Linear

    torch.manual_seed(5)
    model = Transformer(CFG).eval()
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    deq = load_quantized(Transformer(CFG).eval(), tensors, {"method": "int8"}, "dequant")
    kern = load_quantized(Transformer(CFG).eval(), tensors, {"method": "int8"}, "dequant")
    for name, layer in list(kern.named_modules()):
        if isinstance(layer, torch.nn.Linear) and f"{name}.qweight" in tensors:
            parent, _, child = name.rpartition(".")
            setattr(kern.get_submodule(parent), child,
                    Int8Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], None,
                               torch.bfloat16))
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        a, b = deq(x), kern(x)
    assert b.dtype == torch.float32
    diff = (a - b).abs().max()
    assert diff < 0.05 * a.std()
    # greedy picks agree wherever the float model's top two are further apart than the change
    top2 = a.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * diff
    assert decided.any()
    assert torch.equal(a.argmax(-1)[decided], b.argmax(-1)[decided])


def test_int8_layers_own_fresh_aligned_weights(tmp_path):
    """A tensor read from a safetensors file may sit at any byte offset of its mapping; the
    kernel's vector loads crashed (SIGSEGV, a 0.5B model) on such weights, so an Int8Linear
    holds its own copy, aligned as torch allocates."""
    from llmcore.model.qlinear import Int8Linear

    model = Transformer(CFG).eval()
    tensors, _ = quantize_model(model, QuantSpec("int8"))
    (tmp_path / "tok").mkdir()
    save_model_dir(tmp_path / "q", model.cfg, tensors, tmp_path / "tok", {}, {},
                   QuantSpec("int8").to_json())
    loaded, _ = load_model_dir(tmp_path / "q", torch.device("cpu"), quant_runtime="int8mm")
    layers = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    if not layers:
        pytest.skip("torch._weight_int8pack_mm not in this build")
    for layer in layers:
        assert layer.qweight.data_ptr() % 64 == 0 and layer.qweight.is_contiguous()
        assert layer.qweight.untyped_storage().nbytes() == layer.qweight.numel()


def test_int4_kernel_layer_computes_the_dequantized_product():
    from llmcore.model.qlinear import Int4Linear, int4_kernel_threshold

    if int4_kernel_threshold(64) is None:
        pytest.skip(f"the int4 kernel is not used on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()})")
    torch.manual_seed(5)
    w, bias = torch.randn(96, 256), torch.randn(96)
    packed, s = quantize_int4(w, 64)
    layer = Int4Linear(packed, s, 64, bias)
    x = torch.randn(3, 7, 256)
    ref = x @ dequantize_int4(packed, s, 64).t() + bias
    y = layer(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float((y - ref).abs().max()) < 0.01 * float(ref.abs().max())  # bf16 activations


def test_auto_runs_int4_weights_in_the_kernel_where_it_pays(monkeypatch):
    """int4 under ``auto``: large layers whose out width the kernel's layout takes run in
    Int4Linear and give the dequantized model's greedy tokens; under AVX2 only layers of 2^22
    weights and up would (slower than float32 below), so this model's are all expanded, and
    without AVX2 none runs in the kernel."""
    import llmcore.model.qlinear as qlinear

    cfg = dataclasses.replace(CFG, d_model=256, n_heads=4, n_kv_heads=4, d_ff=704)
    torch.manual_seed(6)
    tensors, _ = quantize_model(Transformer(cfg).eval(), QuantSpec("int4", group_size=64))
    info = {"method": "int4", "group_size": 64}
    deq = load_quantized(Transformer(cfg).eval(), tensors, info, "dequant")
    if qlinear.int4_kernel_threshold(64) == qlinear.MIN_KERNEL_WEIGHTS:
        auto = load_quantized(Transformer(cfg).eval(), tensors, info, "auto")
        assert type(auto.layers[0].mlp.up_proj).__name__ == "Int4Linear"  # 704 x 256
        assert isinstance(auto.layers[0].self_attn.q_proj, torch.nn.Linear)  # under the size
        prompts = [[1, 2, 3], [7, 8, 9, 10]]
        a = generate(deq, prompts, Sampling(max_new_tokens=12), [])
        b = generate(auto, prompts, Sampling(max_new_tokens=12), [])
        same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False))
        assert same >= 0.75 * sum(len(r) for r in a)  # bf16 activations may flip a near tie
    has_kernel = qlinear.int4_kernel_threshold(64) is not None  # in this torch, on this CPU
    for cap, threshold in (("AVX2", 1 << 22), ("DEFAULT", None)):
        qlinear.int4_kernel_threshold.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda cap=cap: cap)
        try:
            assert qlinear.int4_kernel_threshold(64) == (threshold if has_kernel else None)
            capped = load_quantized(Transformer(cfg).eval(), tensors, info, "auto")
            assert not any(type(m).__name__ == "Int4Linear" for m in capped.modules())
        finally:
            qlinear.int4_kernel_threshold.cache_clear()


def test_int8_is_expanded_where_torch_kernels_are_avx2(monkeypatch):
    """Under AVX2 the int8 kernel decoded no faster than float32: ``auto`` expands there, and
    runs the kernel where torch's kernels are AVX-512."""
    from llmcore.model.qlinear import int8_runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert int8_runtime(cpu) == ("dequant", torch.float32)
    cfg = dataclasses.replace(CFG, d_model=256, n_heads=4, n_kv_heads=4, d_ff=704)
    tensors, _ = quantize_model(Transformer(cfg).eval(), QuantSpec("int8"))
    loaded = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, "auto")
    assert not any(type(m).__name__ == "Int8Linear" for m in loaded.modules())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    from llmcore.model.qlinear import int_mm_exact

    if int_mm_exact(cpu):
        assert int8_runtime(cpu) == ("w8a8", torch.float32)
    elif int8mm_available(cpu, torch.bfloat16):
        assert int8_runtime(cpu) == ("int8mm", torch.bfloat16)


@pytest.mark.parametrize("runtime", ["w8a8", "int8mm"])
def test_prepared_int8_layers_are_stacked_and_compute_what_the_separate_ones_do(runtime):
    """Prepared for inference, an int8 model's q/k/v and gate/up run as one stacked layer each
    (one product; for w8a8 one rounding of the input), the separate layers' weights views of
    the stacked ones; logits and greedy tokens are the unstacked model's, and ``train()``
    gives every layer its own weights back."""
    from llmcore.model.qlinear import W8A8Linear, int_mm_exact

    cpu = torch.device("cpu")
    if runtime == "w8a8" and not int_mm_exact(cpu):
        pytest.skip("torch._int_mm is not exact on this CPU (no int8 dot products)")
    if runtime == "int8mm" and not int8mm_available(cpu, torch.bfloat16):
        pytest.skip("torch._weight_int8pack_mm with bf16 activations not in this build")
    cfg = dataclasses.replace(CFG, d_model=128, n_heads=4, n_kv_heads=2, d_ff=352)
    torch.manual_seed(9)
    tensors, _ = quantize_model(Transformer(cfg).eval(), QuantSpec("int8"))
    plain = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, runtime)
    prepared = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, runtime)
    prepared.prepare_inference()
    attn, mlp = prepared.layers[0].self_attn, prepared.layers[0].mlp
    assert callable(attn.qkv) and callable(mlp.gate_up)
    stacked = attn.qkv.__self__
    assert type(stacked) is type(attn.q_proj) and (runtime != "w8a8" or
                                                   isinstance(stacked, W8A8Linear))
    assert stacked.out_features == 128 + 2 * 64
    ptr = stacked.qweight.untyped_storage().data_ptr()
    assert attn.k_proj.qweight.untyped_storage().data_ptr() == ptr  # a view: no copy
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), plain(x), rtol=1e-5, atol=1e-5)
    s = Sampling(max_new_tokens=10)
    assert generate(prepared, [[5, 6, 7], [9, 8]], s) == generate(plain, [[5, 6, 7], [9, 8]], s)
    prepared.train()
    assert attn.qkv is None and attn.k_proj.qweight.untyped_storage().data_ptr() != ptr


def test_stacking_copies_where_a_view_would_start_off_a_64_byte_boundary():
    """A layer whose rows would start inside the stacked weights at an offset that is not a
    multiple of 64 bytes keeps its own (aligned) weights; the stacked product is unchanged."""
    from llmcore.model.qlinear import Int8Linear, fuse_quantized, weight_only_act

    torch.manual_seed(2)
    act = weight_only_act(torch.device("cpu"))
    layers = [Int8Linear(*quantize_int8(torch.randn(out, 48)), None, act) for out in (5, 16)]
    alone = [m.qweight.untyped_storage().data_ptr() for m in layers]
    fused = fuse_quantized(layers)
    assert fused is not None
    stacked = fused.__self__.qweight.untyped_storage().data_ptr()
    assert layers[0].qweight.untyped_storage().data_ptr() == stacked  # offset 0: a view
    assert layers[1].qweight.untyped_storage().data_ptr() == alone[1]  # 5 * 48 bytes: kept
    x = torch.randn(2, 48)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in layers], dim=-1))


def test_int8mm_expands_layers_too_narrow_for_the_bf16_kernel():
    """torch's weight-only kernel with bf16 activations crashed the process on a width that
    is not a multiple of 16; such layers are expanded, the others keep the kernel, and the
    model computes what the expanded one does."""
    from llmcore.model.qlinear import Int8Linear, weight_only_act

    cpu = torch.device("cpu")
    if weight_only_act(cpu) != torch.bfloat16:
        pytest.skip("the weight-only kernel runs float32 activations on this CPU")
    cfg = dataclasses.replace(CFG, d_model=40, n_heads=2, n_kv_heads=2, d_ff=96)
    torch.manual_seed(3)
    tensors, _ = quantize_model(Transformer(cfg).eval(), QuantSpec("int8"))
    deq = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, "dequant")
    kern = load_quantized(Transformer(cfg).eval(), tensors, {"method": "int8"}, "int8mm")
    mlp = kern.layers[0].mlp
    assert type(mlp.up_proj) is torch.nn.Linear  # 40 wide: expanded
    assert isinstance(mlp.down_proj, Int8Linear)  # 96 wide: the kernel
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        a, b = deq(x), kern(x)
    assert float((a - b).abs().max()) < 0.05 * float(a.std())
