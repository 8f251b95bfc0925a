"""`xqchat serve`: the loaded model behind OpenAI's HTTP API (app/server.py)."""

from __future__ import annotations

import ipaddress
import os

import click

from .loading import load_engine
from .options import MemorySize, drafter_options, model_options, prepare

EXAMPLES = """
\b
Examples:
  xqchat serve                                  # http://127.0.0.1:8000/v1
  xqchat serve --cache xquant --cache-budget 4GB
  XQCHAT_API_KEY=secret xqchat serve --host 0.0.0.0
\b
Then any OpenAI client works, e.g.
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'
  xqchat chat --backend openai --url http://127.0.0.1:8000/v1
"""


ONEDNN_PRIMITIVES = 16


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@click.command(epilog=EXAMPLES)
@model_options
@drafter_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="XQCHAT_API_KEY",
    default=None,
    help="Clients must send it (Authorization: Bearer KEY); also read from XQCHAT_API_KEY.",
)
@click.option(
    "--cache-budget",
    type=MemorySize(zero=True),
    default="1GB",
    show_default=True,
    help="Memory for recent conversations' caches, reused when a client resends a "
    "conversation: the least recently used go first (0: no reuse).",
)
@click.option(
    "--queue",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Requests waiting or running at most; more are answered 429 with Retry-After.",
)
@click.pass_context
def serve(ctx, host, port, api_key, cache_budget, queue, **engine):
    """Serve the model over OpenAI's HTTP API (/v1/chat/completions, /v1/models, /health).

    Requests are answered one at a time in the order they came; a client that resends a
    conversation (as every OpenAI client does each turn) has only the new part read.
    """
    import uvicorn

    from .server import Server, create_app

    # oneDNN keeps every matmul primitive it builds (1024 by default, about 1 MB each here), one
    # per prompt length: a server that reads prompts of every length grew ~2 MB a request. A few
    # keep the decode shapes hot; read when the first primitive is built, so set before loading.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVES))
    checked, opts = prepare(ctx, **engine)
    files, tokenizer, model = load_engine(checked.files, opts)
    if not tokenizer.has_chat_template:
        raise click.UsageError(f"{files.name} has no chat template, so it cannot chat")
    server = Server(files.name, model, tokenizer, cache_budget, queue, api_key or None)
    if not loopback(host) and api_key is None:
        click.secho(
            f"WARNING: listening on {host} without --api-key: anyone who can reach this "
            "machine can use the model. Set --api-key (or XQCHAT_API_KEY), or bind 127.0.0.1.",
            err=True,
            fg="red",
            bold=True,
        )
    click.echo(f"serving {files.name} at http://{host}:{port}/v1 (Ctrl+C stops)", err=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
