"""The `serve` subcommand: its options, the listening socket, and uvicorn."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from ..engine import Engine, load_model
from .settings import ServerSettings


def add_serve_parser(subparsers):
    from ..options import add_budget_args

    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve STORE over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                    "/v1/completions, /v1/models, /health, /metrics).")
    parser.add_argument("store", help="a store made by `moe-offload convert`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port; 0 picks a free one (default: 8000)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("MOE_OFFLOAD_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 and /metrics "
                             "(default: $MOE_OFFLOAD_API_KEY; the environment keeps it out of `ps`)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait for the model; more get 429 (default: 16)")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, metavar="N",
                        help="largest max_tokens a request may ask for (default: 2048)")
    parser.add_argument("--model-name", metavar="NAME",
                        help="model id clients send (default: the store folder's name)")
    add_budget_args(parser)
    parser.set_defaults(func=run_server)
    return parser


add_parser = add_serve_parser  # the name cli.build_parser looks for


def bind_socket(host: str, port: int) -> socket.socket:
    import moe_offload

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise moe_offload.MoeOffloadError(
            f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host.") from None
    return sock


def run_server(args) -> None:
    import moe_offload
    import uvicorn

    from .app import create_app  # the web stack, only for this command

    for name in ("max_queue", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise moe_offload.MoeOffloadError(f"--{name.replace('_', '-')} must be at least 1.")
    sock = bind_socket(args.host, args.port)  # before loading, so a busy port fails fast
    try:
        model, tokenizer = load_model(args)
    except BaseException:
        sock.close()
        raise
    engine = Engine(model, tokenizer, max_queue=args.max_queue)  # owns the model from here on
    settings = ServerSettings(model_name=args.model_name or Path(args.store).resolve().name,
                              api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                              max_queue=args.max_queue)
    app = create_app(engine, settings)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
    print(f"Serving '{settings.model_name}' at http://{shown_host}:{port}/v1 "
          f"(OpenAI-compatible). Ctrl-C stops.", flush=True)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it already handled by shutting down
    finally:
        engine.close()
