"""Load on a real ``llmcore serve``: 1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve_load.py [--model data/models/sft] [--clients 1 8 32]
    python benchmarks/serve_load.py --tree /path/to/other/checkout --label before
    python benchmarks/serve_load.py --shape 8x512 --label 27m    # random weights, speed only

Starts the server on 127.0.0.1 (from this checkout, or from ``--tree``, another checkout of
the project, to measure a different version on the same machine), then for each concurrency
level runs that many asyncio clients, each sending ``--requests`` streaming chat requests one
after the other (greedy, ``--max-tokens`` at most, held-out questions as prompts). Reports per
level: aggregate generated tokens/s (tokens from the server's usage when it sends it, else the
streamed pieces), p50/p95 time to first token, p50/p95 gap between streamed pieces (per-token
latency), errors, and the cores the clients themselves took (``client_cores``: they run on
the server's machine and compete with it). Prints a table, writes reports/serve_load[-LABEL].json.

The bound it is read against: the same engine in this process (no HTTP, no JSON, no event
loop), on the same model, prompts and server flags, with as many requests at once as the
largest level has clients, ``--requests`` rounds, measured before the server starts and after
it stops (``in_process``); ``http_vs_in_process`` is the largest level's rate over their mean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.device import describe  # noqa: E402
from tests.serve.live_server import free_port, get_json  # noqa: E402

PROMPTS = ["What is 12 + 7?", "Spell the word 'list'.", "What does a Python list hold?",
           "Reverse the letters of the word 'tuple'.", "How many letters are in 'string'?",
           "What is a dictionary in Python?", "What is 31 + 45?", "Explain a for loop."]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int
                      ) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, last, gaps, pieces, usage = None, None, [], 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"{r.status_code} {r.text[:120]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now - start
                    else:
                        gaps.append(now - last)
                    last, pieces = now, pieces + 1
    return {"ttft": first, "gaps": gaps, "tokens": usage if usage is not None else pieces}


async def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w: int) -> list[dict]:
            out = []
            for r in range(requests):
                try:
                    out.append(await one_request(client, url, PROMPTS[(w + r) % len(PROMPTS)],
                                                 max_tokens))
                except httpx.HTTPError as exc:
                    out.append({"error": repr(exc)[:120]})
            return out

        start, cpu = time.perf_counter(), time.process_time()
        results = [x for xs in await asyncio.gather(*(worker(w) for w in range(clients)))
                   for x in xs]
        wall = time.perf_counter() - start
        # the clients run on the server's machine: the cores they take are not the server's
        client_cores = (time.process_time() - cpu) / wall
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": sorted({r["error"] for r in results if "error" in r})[:3],
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1),
            "ttft_p95_ms": round(1000 * pct(ttft, 0.95), 1),
            "token_p50_ms": round(1000 * pct(gaps, 0.5), 2),
            "token_p95_ms": round(1000 * pct(gaps, 0.95), 2),
            "mean_tokens": round(statistics.mean([r["tokens"] for r in ok]), 1) if ok else 0,
            "client_cores": round(client_cores, 2)}


def in_process(model: Path, clients: int, rounds: int, max_tokens: int, server_args: list[str]
               ) -> dict:
    """Generated tokens/s of the engine run here on ``clients`` requests at once, ``rounds``
    times: what the server could deliver if HTTP cost nothing."""
    from llmcore.data.tokenizer import LLMTokenizer
    from llmcore.device import pick_device
    from llmcore.infer.engine import Engine, Request
    from llmcore.infer.generate import Sampling
    from llmcore.model.modeldir import load_model_dir

    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--max-batch", type=int, default=8)
    flags.add_argument("--compile", action="store_true")
    known, _ = flags.parse_known_args(server_args)
    model_obj, _ = load_model_dir(model, pick_device("auto"))
    tok = LLMTokenizer.load(model)
    engine = Engine(model_obj, tok, max_batch=known.max_batch, max_queue=clients + 1,
                    own_thread=False, compile=known.compile)
    prompts = [tok.encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0)

    def batch(n: int) -> int:
        counts: list[int] = []
        for i in range(n):
            engine.submit(Request(prompts[i % len(prompts)], sampling,
                                  lambda e: counts.append(e.tokens) if e.finish else None,
                                  (tok.im_end_id, tok.eot_id)))
        engine.run(until_idle=True)
        return sum(counts)

    batch(2)  # warm-up (and the compile, with --compile)
    start, tokens = time.perf_counter(), sum(batch(clients) for _ in range(rounds))
    wall = time.perf_counter() - start
    return {"requests": clients * rounds, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def start_server(tree: Path, model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "llmcore.cli", "serve", str(model), "--port",
                             str(port), *extra], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            get_json(url + "/health")
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit(f"the server from {tree} did not start") from None
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "data/models/sft")
    ap.add_argument("--shape", help="random weights of LxD (as benchmarks/decode_speed.py "
                    "--shape): L layers of width D; replies then run to --max-tokens")
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose server to run")
    ap.add_argument("--label", default="", help="suffix of the report file")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per client (default: 8 at 1 client, 4 at 8, 2 at 32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="--max-batch 32 --max-queue 64",
                    help="extra `llmcore serve` flags ('' for a server without them)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            from benchmarks.decode_speed import random_model_dir
            args.model = random_model_dir(Path(tmp) / f"random-{args.shape}", "cpu-mini",
                                          args.shape)
        run(args)


def run(args: argparse.Namespace) -> None:
    model = args.model.resolve()
    top = max(args.clients)
    top_rounds = args.requests or {1: 8, 8: 4}.get(top, 2)
    engine_runs = [in_process(model, top, top_rounds, args.max_tokens, args.server_args.split())]
    print(f"in process, {top} at once: {engine_runs[0]['tokens_per_s']:.1f} tok/s", flush=True)
    proc, url = start_server(args.tree.resolve(), model, args.server_args.split())
    rows = []
    try:
        asyncio.run(level(url, 1, 2, args.max_tokens))  # warm-up
        for c in args.clients:
            n = args.requests or {1: 8, 8: 4}.get(c, 2)
            row = asyncio.run(level(url, c, n, args.max_tokens))
            rows.append(row)
            print(f"{c:>3} clients  {row['tokens_per_s']:>7.1f} tok/s  ttft p50 "
                  f"{row['ttft_p50_ms']:>7.1f} ms p95 {row['ttft_p95_ms']:>7.1f} ms  token p50 "
                  f"{row['token_p50_ms']:>6.2f} ms p95 {row['token_p95_ms']:>6.2f} ms  errors "
                  f"{row['errors']}  client cores {row['client_cores']:.2f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(20)
    engine_runs.append(in_process(model, top, top_rounds, args.max_tokens,
                                  args.server_args.split()))
    print(f"in process, {top} at once: {engine_runs[1]['tokens_per_s']:.1f} tok/s", flush=True)
    bound = statistics.mean(r["tokens_per_s"] for r in engine_runs)
    served = next((r["tokens_per_s"] for r in rows if r["clients"] == top), None)
    single = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    source = (f"random weights, shape {args.shape}" if args.shape else
              str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model))
    report = {"machine": describe(torch.device("cpu"), torch.float32), "model": source,
              "tree": str(args.tree),
              "server_args": args.server_args, "max_tokens": args.max_tokens, "levels": rows,
              "scaling_vs_1_client": {r["clients"]: round(r["tokens_per_s"] / single, 2)
                                      for r in rows} if single else None,
              "in_process": {"requests_at_once": top, "runs": engine_runs,
                             "tokens_per_s": round(bound, 1)},
              "http_vs_in_process": round(served / bound, 3) if served and bound else None}
    out = REPO / "reports" / f"serve_load{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"scaling vs 1 client: {report['scaling_vs_1_client']}; {top} clients over the "
          f"engine in process: {report['http_vs_in_process']}; wrote {out}")


if __name__ == "__main__":
    main()
