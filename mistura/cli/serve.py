"""`mistura serve CKPT`: an OpenAI-compatible HTTP server over a checkpoint (mistura.serve.app), run by uvicorn.

The address is bound before the model loads, so a port in use is a one-line error; `--port 0` takes a
free port, and the line printed when the server is ready says which.
"""

from __future__ import annotations

import argparse
import os

from mistura.cli.options import add_device_options, device_and_dtype
from mistura.model.paged_attention import ATTENTION


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the subcommands."""
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions), "
        "continuous batching over a paged KV cache",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory (anything mistura.load reads)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--model-name", help="the model's name in the API (default: the checkpoint folder's name)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MISTURA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* "
        "(default: the MISTURA_API_KEY environment variable; none: no key)",
    )
    p.add_argument("--max-seqs", type=int, default=16, help="sequences in the running batch at most (default: 16)")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument(
        "--kv-blocks",
        type=int,
        metavar="N",
        help="KV cache blocks in the pool (default: enough for --max-seqs full contexts)",
    )
    pool.add_argument("--kv-bytes", metavar="SIZE", help="KV cache pool size, e.g. 2GB or 512MiB")
    p.add_argument("--block-size", type=int, default=8, help="positions per KV block (default: 8)")
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=256,
        help="tokens in one forward at most; longer prompts are prefilled in chunks (default: 256)",
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting for a place at most; beyond, 429 (default: 256)"
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt in full")
    p.add_argument(
        "--scheduling",
        choices=["continuous", "static"],
        default="continuous",
        help="continuous: requests join the running batch at every step; static: only when it is empty "
        "(default: continuous)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        default="gather",
        help="how attention reads the paged KV cache: gather copies each sequence's context out of the pool "
        "for SDPA (the faster); flex runs FlexAttention on the pool's blocks in place, compiled at start-up "
        "for each query count bucket (CPU only) (default: gather)",
    )
    add_device_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from mistura.errors import ConfigError

    require_serve_extra()
    import uvicorn

    from mistura.serve.app import app_from_checkpoint
    from mistura.shards import parse_size

    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be >= 1, got {args.max_queue}")
    options = dict(
        max_seqs=args.max_seqs,
        block_size=args.block_size,
        n_blocks=args.kv_blocks,
        kv_bytes=None if args.kv_bytes is None else parse_size(args.kv_bytes, "--kv-bytes"),
        max_batched_tokens=args.max_batched_tokens,
        prefix_caching=not args.no_prefix_caching,
        static_batching=args.scheduling == "static",
        attention=args.attention,
    )
    where = device_and_dtype(args)
    with listen(args.host, args.port) as sock:
        app = app_from_checkpoint(
            args.checkpoint, *where, args.model_name, api_key=args.api_key, max_queue=args.max_queue, **options
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving {app.state.model_name} at http://{shown}:{port}/v1 (OpenAI API; /health, /metrics; "
            f"{app.state.runner.engine.pool.attention} paged attention)",
            flush=True,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
        server.run(sockets=[sock])
    if server.should_exit:  # stopped by a signal: uvicorn re-raises it, but asyncio's runner can swallow a SIGINT
        raise KeyboardInterrupt


def require_serve_extra() -> None:
    """A ConfigError naming what is missing when the `serve` extra is not installed."""
    from importlib.util import find_spec

    from mistura.errors import ConfigError

    for package in ("fastapi", "uvicorn", "prometheus_client"):
        if find_spec(package) is None:
            raise ConfigError(f"mistura serve needs {package}: pip install -e '.[serve]'")


def listen(host: str, port: int):
    """A socket bound to host:port and listening; an address that cannot be had is a ConfigError."""
    import socket

    from mistura.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err}") from err
