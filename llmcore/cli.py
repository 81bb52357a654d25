"""The ``llmcore`` command: generate from and chat with any model directory.

    llmcore generate data/models/sft "What is 12 + 7?"
    llmcore generate data/models/pretrain "The list type" --raw --temperature 0.8 --top-p 0.9
    llmcore chat data/models/chat-int8
    llmcore serve data/models/sft --host 127.0.0.1 --port 8000   # chat page at /
    llmcore serve models:/llmcore@best                         # a registry model
    llmcore export data/models/sft exports/sft-hf      # transformers LlamaForCausalLM
    llmcore export data/models/sft exports/sft.gguf --format gguf --gguf-type q8_0  # llama.cpp

``generate`` wraps the prompt in the chat template unless ``--raw``; ``chat`` keeps the
conversation and streams each reply (``/reset`` clears it, ``/quit`` or end of input leaves).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcore.schema import USER_ERROR

if TYPE_CHECKING:  # the commands import what they run lazily: `llmcore --help` stays fast
    from llmcore.data.tokenizer import LLMTokenizer
    from llmcore.model.protocols import LanguageModel


def _sampling(args: argparse.Namespace) -> Any:
    from llmcore.infer.generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _load(path: str, device: str) -> tuple[Any, Any]:
    from llmcore.data.tokenizer import LLMTokenizer
    from llmcore.device import pick_device
    from llmcore.model.modeldir import load_model_dir

    model, _ = load_model_dir(Path(path), pick_device(device))
    return model, LLMTokenizer.load(Path(path))


def _stream_reply(model: LanguageModel, tok: LLMTokenizer, ids: list[int],
                  args: argparse.Namespace,
                  out: Any) -> str:
    from llmcore.infer.generate import TextStreamer, stream

    streamer = TextStreamer(tok)
    pieces = []
    for token in stream(model, ids, _sampling(args), [tok.im_end_id, tok.eot_id]):
        piece = streamer.push(token)
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> int:
    model, tok = _load(args.model, args.device)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        # typed text is plain text: "<|im_end|>" in it is not a control token
        ids = (tok.encode_text(prompt) if args.raw else
               tok.encode_prompt([{"role": "user", "content": prompt}]))
        if not ids:
            print("llmcore: empty prompt", file=sys.stderr)
            return USER_ERROR
        _stream_reply(model, tok, ids, args, sys.stdout)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tok = _load(args.model, args.device)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_prompt(history)  # user text cannot forge a turn
        if interactive:
            sys.stdout.write("model> ")
        reply = _stream_reply(model, tok, ids, args, sys.stdout)
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from llmcore.serve.app import create_app

    model, name = Path(args.model), None
    if args.model.startswith("models:/"):
        from llmcore.tracking import default_uri, fetch_registered_model

        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri(Path.cwd())
        cache = Path.home() / ".cache" / "llmcore" / "registry"
        try:
            model, name = fetch_registered_model(args.model, tracking_uri, cache)
        except LookupError as exc:
            print(f"llmcore: {exc}", file=sys.stderr)
            return USER_ERROR
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(model, args.device, name=name, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_body=args.max_body, engine_thread=False,
                     compile=args.compile)
    if args.compile:
        print("llmcore: compiling the decode step (torch.compile, once)...", file=sys.stderr)
        app.state.engine.warm_up()
    print(f"llmcore: serving {name or model.name} on http://{args.host}:{args.port}/ "
          f"(max batch {args.max_batch}, queue {args.max_queue})", file=sys.stderr)
    _run_server(app, args.host, args.port)
    return 0


def _run_server(app: Any, host: str, port: int) -> None:
    """HTTP in a thread, the decode loop in the main thread (see Engine.own_thread).

    SIGTERM / SIGINT ask uvicorn to shut down (open streams are cut after 3 s); its lifespan
    stops the engine, which ends the loop here.
    """
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=3))
    http = threading.Thread(target=server.run, name="http", daemon=True)

    def shutdown(*_: Any) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    http.start()
    engine = app.state.engine
    def watch() -> None:
        http.join()
        engine.stop(0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()  # the server thread ended (shut down, or failed to bind): end the loop
    engine.run()
    http.join(10)


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from llmcore.export.gguf import export_gguf

        print(export_gguf(Path(args.model), Path(args.out), args.gguf_type))
        return 0
    from llmcore.export.hf import export_hf

    print(export_hf(Path(args.model), Path(args.out)))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="a model directory, e.g. data/models/sft")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--device", default="auto")

    g = sub.add_parser("generate", help="complete prompts (arguments, or one per stdin line)")
    sampling_args(g)
    g.add_argument("prompt", nargs="*")
    g.add_argument("--raw", action="store_true", help="no chat template: plain continuation")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="a multi-turn conversation on stdin/stdout")
    sampling_args(c)
    c.add_argument("--system", default=None, help="a system message")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP service and a chat page at /")
    s.add_argument("model", help="a model directory, or a registry URI models:/<name>@<alias>")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto")
    s.add_argument("--max-batch", type=_positive, default=8,
                   help="requests decoded together (continuous batching)")
    s.add_argument("--max-queue", type=_nonnegative, default=64,
                   help="requests that may wait for a free slot; past it: 429")
    s.add_argument("--max-body", type=_positive, default=1 << 20, help="request body bytes")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model before serving (slower start, faster tokens)")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("export", help="write a transformers (Llama) directory or a GGUF file")
    e.add_argument("model", help="a model directory")
    e.add_argument("out", help="the Hugging Face directory, or the .gguf file, to write")
    e.add_argument("--format", choices=("hf", "gguf"), default="hf")
    e.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"), default="f32",
                   help="GGUF weight type (norms stay f32)")
    e.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # UserError (bad model dir, tokenizer), bad sampling values, ...
        print(f"llmcore: {exc}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
