"""llmcore: generate from, chat with, serve and export a model directory.

Examples:
    llmcore generate data/models/sft "What is 12 + 7?"
    llmcore generate data/models/pretrain "The list type" --raw --temperature 0.8 --top-p 0.9
    llmcore chat data/models/chat-int8
    llmcore serve data/models/sft --host 127.0.0.1 --port 8000   # chat page at /
    llmcore serve models:/llmcore@best --host 0.0.0.0 --api-key "$KEY"   # a registry model
    llmcore export data/models/sft exports/sft-hf      # transformers LlamaForCausalLM
    llmcore export data/models/sft exports/sft.gguf --format gguf --gguf-type q8_0  # llama.cpp

generate wraps the prompt in the chat template unless --raw; chat keeps the conversation and
streams each reply (/reset clears it, /quit or end of input leaves). Text that UTF-8 cannot
encode (a lone surrogate, which undecodable bytes in arguments become) is refused in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcore.schema import USER_ERROR

API_KEY_ENV = "LLMCORE_API_KEY"

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
    prepare = getattr(model, "prepare_inference", None)
    if prepare is not None:  # generation only: fused projections, a RoPE table
        prepare()
    return model, LLMTokenizer.load(Path(path))


def _stream_reply(model: LanguageModel, tok: LLMTokenizer, ids: list[int],
                  args: argparse.Namespace,
                  out: Any) -> str:
    from llmcore.infer.generate import Detokenizer, stream

    detok = Detokenizer(tok)
    pieces = []
    for token in stream(model, ids, _sampling(args), [tok.im_end_id, tok.eot_id]):
        piece = detok.stream(token)
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces)


def _decoded(raw: bytes, where: str) -> str | None:
    """One line of stdin as text, or None after a one-line error when it is not UTF-8.

    Lines are read as bytes and decoded one by one, so a bad line costs only itself (a text
    stream decodes whole chunks and would drop the good lines around it)."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        print(f"llmcore: {where} is not UTF-8 text (byte {exc.start + 1}: "
              f"{raw[exc.start:exc.start + 1]!r})", file=sys.stderr)
        return None


def _stdin_lines() -> list[str] | None:
    """The non-blank lines of stdin, or None (after a one-line error) if one is not UTF-8."""
    lines = []
    for i, raw in enumerate(sys.stdin.buffer, 1):
        line = _decoded(raw, f"stdin line {i}")
        if line is None:
            return None
        if line.strip():
            lines.append(line)
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    from llmcore.data.corpus import check_encodable

    prompts = args.prompt or _stdin_lines()
    if prompts is None:
        return USER_ERROR
    for i, prompt in enumerate(prompts):  # before the model loads: a bad prompt fails at once
        check_encodable(prompt, f"prompt {i + 1}")
    model, tok = _load(args.model, args.device)
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
    from llmcore.data.corpus import check_encodable, unencodable

    if args.system:
        check_encodable(args.system, "--system")
    model, tok = _load(args.model, args.device)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        raw = sys.stdin.buffer.readline()
        if not raw:
            return 0
        line = _decoded(raw, "that line")
        if line is None:  # said so; the conversation goes on
            continue
        line = line.strip()
        if not line:
            continue
        bad = unencodable(line, "your message")
        if bad is not None:  # one line, and the conversation goes on
            print(f"llmcore: {bad}", file=sys.stderr)
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
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        print("llmcore: --api-key is empty; give a key or leave the flag out", file=sys.stderr)
        return USER_ERROR
    if key is None and not _loopback(args.host):
        print(f"llmcore: warning: serving on {args.host} without an API key: anyone who can "
              f"reach this address can use the model (set --api-key or {API_KEY_ENV})",
              file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(model, args.device, name=name, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_body=args.max_body, engine_thread=False,
                     compile=args.compile, api_key=key)
    if args.compile:
        print("llmcore: compiling the decode step (torch.compile, once)...", file=sys.stderr)
        app.state.engine.warm_up()
    from llmcore.model.qlinear import kernel_layers

    kernels = "".join(f", {n} layers run {kind}"  # a quantized directory's kernels
                      for kind, n in kernel_layers(app.state.engine.model).items())
    print(f"llmcore: serving {name or model.name} on http://{args.host}:{args.port}/ "
          f"(max batch {args.max_batch}, queue {args.max_queue}{kernels}"
          f"{', API key required' if key else ''})", file=sys.stderr)
    _run_server(app, args.host, args.port)
    return 0


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


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
    summary, _, details = (__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(prog="llmcore", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    device_help = "auto (a GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="a model directory, e.g. data/models/sft")
        p.add_argument("--max-new-tokens", type=int, default=128,
                       help="new tokens per reply at most (default: %(default)s)")
        p.add_argument("--temperature", type=float, default=0.0,
                       help="sampling temperature; 0 = greedy (default: %(default)s)")
        p.add_argument("--top-k", type=int, default=None,
                       help="sample from the k likeliest tokens only (default: all)")
        p.add_argument("--top-p", type=float, default=None,
                       help="nucleus sampling: the likeliest tokens up to this probability mass")
        p.add_argument("--seed", type=int, default=None,
                       help="seed of the sampling, for replies that repeat (default: random)")
        p.add_argument("--device", default="auto", help=device_help)

    g = sub.add_parser("generate", help="complete prompts (arguments, or one per stdin line)",
                       description="Complete prompts given as arguments, or one per stdin line.")
    sampling_args(g)
    g.add_argument("prompt", nargs="*", help="prompts (none: read one per line from stdin)")
    g.add_argument("--raw", action="store_true", help="no chat template: plain continuation")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="a multi-turn conversation on stdin/stdout",
                       description="A multi-turn conversation: /reset clears it, /quit leaves.")
    sampling_args(c)
    c.add_argument("--system", default=None, help="a system message")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP service and a chat page at /",
                       description="An OpenAI-compatible HTTP service (continuous batching) "
                                   "and a chat page at /.")
    s.add_argument("model", help="a model directory, or a registry URI models:/<name>@<alias>")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: "
                        "%(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--device", default="auto", help=device_help)
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but / and /health "
                        f"(default: the {API_KEY_ENV} environment variable, which, unlike a flag, "
                        "other users cannot read in ps; neither: open)")
    s.add_argument("--max-batch", type=_positive, default=8,
                   help="requests decoded together (continuous batching; default: %(default)s)")
    s.add_argument("--max-queue", type=_nonnegative, default=64,
                   help="requests that may wait for a free slot; past it: 429 "
                        "(default: %(default)s)")
    s.add_argument("--max-body", type=_positive, default=1 << 20,
                   help="largest request body in bytes; past it: 413 (default: %(default)s)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model before serving (slower start, faster tokens)")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("export", help="write a transformers (Llama) directory or a GGUF file",
                       description="Write a model directory as a transformers (Llama) "
                                   "directory or a GGUF file for llama.cpp / Ollama.")
    e.add_argument("model", help="a model directory")
    e.add_argument("out", help="the Hugging Face directory, or the .gguf file, to write")
    e.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: transformers directory; gguf: llama.cpp file (default: %(default)s)")
    e.add_argument("--gguf-type", choices=("f32", "f16", "q8_0", "q4_0"), default="f32",
                   help="GGUF weight type (norms stay f32; default: %(default)s)")
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
