"""The GPU paths, exercised: bf16 + torch.compile + flash attention, DDP and FSDP over NCCL, and
the batching engine's decode rate. CUDA only: elsewhere it says why and exits 0.

    python benchmarks/gpu_check.py [--steps 30] [--presets gpt2-mini llama-0.5b] [--seq 1024]
                                   [--batch 8] [--no-dist] [--out reports/gpu_check.json]

1. Training throughput, per preset, on one GPU: bf16 autocast, ``torch.compile``, and
   ``scaled_dot_product_attention`` held to the flash kernel (``sdpa_kernel(FLASH_ATTENTION)``:
   if the model's attention cannot take it, the step fails instead of silently falling back).
   A few dozen optimizer steps on random tokens (throughput does not depend on the text);
   tokens/s, MFU against the GPU's datasheet bf16 dense peak (``PEAKS`` below, or
   ``--peak-tflops``), peak memory.
2. DDP and FSDP over NCCL on every visible GPU (torchrun, one process per GPU), through
   :func:`llmcore.train.fit.fit` itself, so the NCCL path of the real loop runs: loss curves of
   the two and their agreement.
3. The continuous-batching engine (:mod:`llmcore.infer.engine`): decode tokens/s at batch 1 and
   32 on the first preset.

Writes one JSON (the GPU, torch and CUDA versions, every figure) under reports/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.config.model import parse_model  # noqa: E402
from llmcore.config.train import OptimConfig  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity);
# matched against torch.cuda.get_device_name() in order
PEAKS = [("H200", 989.0), ("H100 SXM", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
         ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.0),
         ("3090", 71.0), ("V100", 125.0), ("T4", 65.0)]


def datasheet_peak(name: str) -> float | None:
    for key, tflops in PEAKS:
        if key in name:
            return tflops * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def train_throughput(preset: str, steps: int, seq: int, batch: int, vocab: int,
                     peak: float | None, device: torch.device, overrides: dict,
                     compile: bool = True) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmcore.model.transformer import Transformer, flops_per_token
    from llmcore.train.optim import make_optimizer

    cfg = parse_model({"preset": preset, "vocab_size": vocab, "max_seq_len": seq, **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = make_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3), torch.bfloat16)
    compiled = torch.compile(model) if compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = torch.randint(0, vocab, (batch, seq + 1), device=device)
    times, losses = [], []
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # no silent fallback to the math kernel
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = compiled(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab),
                                                     x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    steady = sorted(times[steps // 3:])[len(times[steps // 3:]) // 2]  # median after compile
    tps = batch * seq / steady
    fpt = flops_per_token(cfg, seq)
    return {"preset": preset, "params": model.num_parameters(), "seq": seq, "batch": batch,
            "first_step_s": round(times[0], 2), "step_s": round(steady, 4),
            "tokens_per_s": round(tps), "mfu": round(tps * fpt / peak, 4) if peak else None,
            "peak_memory_gb": peak_memory_gb(device),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "flash": True, "compiled": compile}


def decode_rate(preset: str, device: torch.device, overrides: dict, tokens: int,
                docs_n: int = 200) -> dict:
    """Greedy decode through the serving engine at batch 1 and 32 (random weights: the rate
    does not depend on them; no stop tokens, so every reply is 128 tokens)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_speed import _engine_run

    from llmcore.data.pydocs import builtin_documents
    from llmcore.data.tokenizer import LLMTokenizer, train_bpe
    from llmcore.infer.engine import Engine
    from llmcore.model.transformer import Transformer

    docs = [d.text for _, d in zip(range(docs_n), builtin_documents(), strict=False)]
    tok = LLMTokenizer(train_bpe(docs, vocab_size=2048 if docs_n >= 200 else 300,
                                 min_frequency=2))
    cfg = parse_model({"preset": preset, "vocab_size": tok.vocab_size, **overrides})
    model = Transformer(cfg).to(device).eval()
    out = {}
    for batch in (1, 32):
        engine = Engine(model, tok, max_batch=batch, own_thread=False)
        prompts = [tok.encode(docs[i % len(docs)][:200])[:32] for i in range(batch)]
        _engine_run(engine, prompts, 8)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        replies = _engine_run(engine, prompts, tokens)
        sync(device)
        out[f"batch_{batch}_tokens_per_s"] = round(sum(len(r) for r in replies)
                                                   / (time.perf_counter() - t0))
    return out


def distributed(steps: int, device: torch.device, docs_n: int = 200) -> dict:
    """fit() under torchrun on every GPU (2 CPU processes for a smoke run), ddp then fsdp."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        subprocess.run([sys.executable, "-c", _MAKE_SHARDS, str(shards), str(docs_n)],
                       check=True, cwd=REPO, timeout=600)
        result: dict = {"gpus": gpus}
        for parallel in ("ddp", "fsdp"):
            out = Path(tmp) / parallel
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={gpus}", str(REPO / "tests/train/dist_fit.py"),
                   str(shards), str(out), "--parallel", parallel, "--optimizer", "muon",
                   "--steps", str(steps), "--device", device.type, "--dtype",
                   "auto" if device.type == "cuda" else "float32"]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
            result[parallel] = {"returncode": run.returncode,
                                "seconds": round(time.perf_counter() - t0, 1)}
            if run.returncode:
                result[parallel]["error"] = run.stderr[-2000:]
                continue
            result[parallel]["losses"] = json.loads(out.with_suffix(".json").read_text())[
                "losses"]
        if "losses" in result["ddp"] and "losses" in result["fsdp"]:
            a, b = result["ddp"]["losses"], result["fsdp"]["losses"]
            result["max_rel_loss_difference"] = max(abs(x - y) / abs(x)
                                                    for x, y in zip(a, b, strict=True))
        return result


_MAKE_SHARDS = """
import sys
from pathlib import Path
from llmcore.data.packing import pack_all
from llmcore.data.pydocs import builtin_documents
from llmcore.data.tokenizer import LLMTokenizer, train_bpe
docs = [d.text for _, d in zip(range(int(sys.argv[2])), builtin_documents())]
tok = LLMTokenizer(train_bpe(docs, vocab_size=300, min_frequency=2))
out = Path(sys.argv[1])
pack_all(tok, {"train": docs[8:], "val": docs[:8]}, {"train": [], "val": []}, out,
         seq_len=32, rows_per_shard=256)
tok.save(out / "tok")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--presets", nargs="+", default=["gpt2-mini", "llama-0.5b"])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--no-dist", action="store_true", help="skip DDP/FSDP over NCCL")
    ap.add_argument("--out", type=Path, default=None,
                    help="default reports/gpu_check.json (smoke: gpu_check-smoke-cpu.json)")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="every step on the CPU at toy sizes, without compile (checks the "
                         "script, not a GPU)")
    a = ap.parse_args()
    overrides: dict = {}
    tokens = 128
    if a.smoke_cpu:
        device = torch.device("cpu")
        overrides = {"n_layers": 1, "d_model": 64, "n_heads": 2, "n_kv_heads": 2, "d_ff": 128}
        a.seq, a.batch, a.steps, tokens = 64, 2, 3, 8
        a.out = a.out or REPO / "reports" / "gpu_check-smoke-cpu.json"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing "
              "to check. Run it on a machine with an NVIDIA GPU.")
        return
    else:
        device = torch.device("cuda")
        a.out = a.out or REPO / "reports" / "gpu_check.json"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else datasheet_peak(name)
    report: dict = {"gpu": name, "gpus": torch.cuda.device_count(), "smoke": a.smoke_cpu, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "peak_flops": peak,
                    "peak_source": "--peak-tflops" if a.peak_tflops else "datasheet"}
    report["train"] = []
    for preset in a.presets:
        print(f"gpu_check: training {preset} ({a.steps} steps, bf16, "
              f"{'eager' if a.smoke_cpu else 'compile'}, flash) ...", flush=True)
        try:
            report["train"].append(train_throughput(preset, a.steps, a.seq, a.batch, a.vocab,
                                                    peak, device, overrides,
                                                    compile=not a.smoke_cpu))
        except Exception as exc:  # a failed check is a result: say which and go on
            report["train"].append({"preset": preset, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(report["train"][-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        report["decode"] = decode_rate(a.presets[0], device, overrides, tokens,
                                       40 if a.smoke_cpu else 200)
    except Exception as exc:
        report["decode"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"decode": report["decode"]}), flush=True)
    if not a.no_dist:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        report["distributed"] = distributed(a.steps, device, 40 if a.smoke_cpu else 200)
        print(json.dumps({"distributed": {k: v for k, v in report["distributed"].items()
                                          if k not in ("ddp", "fsdp")}}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
