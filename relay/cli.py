"""The `relay` command: run, check, serve, tail, publish.

Exit status: 0 clean stop; 2 bad usage or bad config (one line per problem); 1 a fatal runtime
error (one line, no traceback unless --debug).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from relay import __version__
from relay.addresses import parse_host_port
from relay.config import Config, default_config_path, load_config
from relay.errors import ConfigError, FatalError
from relay.secrets import redact

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2


def _address(text: str) -> str:
    """An argparse type: a `host:port` flag is checked like the config's addresses."""
    try:
        parse_host_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay",
                                     description="Feeds Centrifugo channels from other sources.")
    parser.add_argument("--version", action="version", version=f"centrifugo-relay {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of fatal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline in the foreground")
    run.add_argument("-c", "--config", default=None,
                     help="config file (default $RELAY_CONFIG, then ./config.toml)")

    check = sub.add_parser("check", help="validate the config and print the resolved pipeline")
    check.add_argument("-c", "--config", default=None)

    serve = sub.add_parser("serve", help="run only the embedded Centrifugo-compatible server")
    serve.add_argument("--listen", default=None, help="host:port (default 127.0.0.1:10000)")
    serve.add_argument("--http-listen", default=None,
                       help='host:port of WebSocket clients and the HTTP API ("" = off)')
    serve.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    serve.add_argument("--namespace", action="append", default=None,
                       help="a namespace with history on (repeatable); default: chat")
    serve.add_argument("-c", "--config", default=None, help="take the [server] table of this config file")

    for name, text in (("tail", "follow a channel's publications through the History API"),
                       ("publish", "publish one message, for a quick try")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("channel")
        if name == "publish":
            cmd.add_argument("data", help="publication data (JSON)")
        else:
            cmd.add_argument("--from-start", action="store_true", help="print what history holds first")
            cmd.add_argument("--poll", default="200ms", help="how often to ask History (default 200ms)")
        cmd.add_argument("--address", default="127.0.0.1:10000", type=_address,
                         help="Centrifugo GRPC API address")
        cmd.add_argument("--api-key-env", default="CENTRIFUGO_GRPC_API_KEY",
                         help="environment variable holding the API key")
        cmd.add_argument("--api", choices=["v6", "v2"], default="v6")
    return parser


def _load(path: str | None) -> Config:
    return load_config(path or default_config_path())


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "check":
        from relay.check import describe
        print(describe(_load(args.config), args.config or default_config_path()))
        return EXIT_OK
    if command == "run":
        from relay.daemon import run_pipeline
        return _run_async(run_pipeline, _load(args.config), args.config or default_config_path())
    if command == "serve":
        from relay.server.app import serve_from_args
        return _run_async(serve_from_args, args)
    if command == "tail":
        from relay.client_commands import tail
        return _run_async(tail, args)
    if command == "publish":
        from relay.client_commands import publish
        return _run_async(publish, args)
    raise AssertionError(command)


def _tune_gc() -> None:
    # Messages and requests are short-lived and free of cycles: a young-generation collection every
    # 700 allocations is pure overhead on the hot path (about 8% of throughput), and what was loaded
    # at start never needs scanning again.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _run_async(func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> int:
    _tune_gc()
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(func(*args))
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except ConfigError as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        code = EXIT_USAGE
    except FatalError as err:
        if args.debug:
            raise
        if not err.logged:
            print(redact(f"relay: {err}"), file=sys.stderr)
        code = EXIT_FATAL
    except Exception as err:  # a bug or an environment failure: one line unless --debug
        if args.debug:
            raise
        print(redact(f"relay: fatal: {type(err).__name__}: {err}"), file=sys.stderr)
        code = EXIT_FATAL
    sys.exit(code)
