"""The embedded Centrifugo-compatible GRPC server: both APIs on one port, and `relay serve`.

`EmbeddedServer(config.server)` is what `relay run` starts when `[server] enabled = true`;
`serve_from_args` is `relay serve`, which runs only the server until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import signal
import socket
import sys
import time
from collections.abc import Callable

import grpc
from pydantic import ValidationError

from relay.addresses import HostPort, parse_host_port
from relay.certificates import TlsError
from relay.config import NamespaceConfig, ServerSection, load_config
from relay.errors import ConfigError, FatalError
from relay.proto.centrifugo import api_pb2
from relay.proto.centrifugo_v2 import api_pb2 as legacy_pb2
from relay.secrets import SecretError, load_secret
from relay.server.auth import ApiKeyInterceptor
from relay.server.handlers import add_service
from relay.server.node import NodeInfo
from relay.server.service_v2 import LegacyCentrifugoService
from relay.server.service_v6 import CentrifugoApiService
from relay.server.state import NamespacePolicy, ServerState
from relay.tls import server_credentials

SWEEP_INTERVAL = 1.0
DEFAULT_NAMESPACES = ["chat"]


class ServerStartError(Exception):
    """The server could not start: bad listen address, port taken, unreadable key or TLS files."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bindable(host: str, port: int) -> None:
    """Raise ServerStartError when host:port cannot be bound, with the system's reason.

    grpc reports a taken port as a generic failure (and logs a line of its own), so ask first.
    """
    if port == 0:
        return
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as err:
        raise ServerStartError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def namespace_policies(config: ServerSection) -> list[NamespacePolicy]:
    return [NamespacePolicy(ns.name, ns.history_size, ns.history_ttl) for ns in config.namespaces]


class EmbeddedServer:
    """Serves `centrifugal.centrifugo.api.CentrifugoApi` and `api.Centrifugo` from one store."""

    def __init__(self, config: ServerSection, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.state = ServerState(namespace_policies(config), clock=clock, max_channels=config.max_channels,
                                 max_reply_bytes=config.max_reply_bytes)
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._address = ""

    @property
    def address(self) -> str:
        """The host:port actually listened on (the real port when the config says 0)."""
        if not self._address:
            raise RuntimeError("the embedded server is not started")
        return self._address

    def _api_key(self) -> str:
        try:
            secret = load_secret(self.config.api_key_env, self.config.api_key_file)
        except SecretError as err:
            raise ServerStartError(str(err)) from None
        return secret.reveal() if secret else ""

    def _credentials(self) -> grpc.ServerCredentials | None:
        try:
            return server_credentials(self.config.tls)
        except TlsError as err:
            raise ServerStartError(str(err)) from None

    async def start(self) -> None:
        """Bind and serve; raises ServerStartError when it cannot."""
        try:
            listen = parse_host_port(self.config.listen, any_port=True)
        except ValueError as err:
            raise ServerStartError(f"server.listen: {err}") from None
        host, port = listen.host, listen.port
        key = self._api_key()
        if not key and not is_loopback(host) and not self.config.allow_unauthenticated_remote:
            raise ServerStartError(
                f"server.listen: {self.config.listen} is reachable from other hosts and no API key is set; "
                "set server.api_key_env (or allow_unauthenticated_remote = true)")
        credentials = self._credentials()
        check_bindable(host, port)
        server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(key)] if key else None,
            options=[("grpc.max_receive_message_length", self.config.max_message_bytes),
                     # Without this a second server could bind the same port and share the traffic.
                     ("grpc.so_reuseport", 0)])
        bind = str(listen)
        try:
            bound = (server.add_secure_port(bind, credentials) if credentials
                     else server.add_insecure_port(bind))
        except RuntimeError:
            raise ServerStartError(f"cannot listen on {self.config.listen}") from None
        if not bound:
            raise ServerStartError(f"cannot listen on {self.config.listen}")
        node = NodeInfo(bound)
        # The server-wide default of Centrifugo's grpc_api.error_mode; a call can still ask per call.
        transport = getattr(self.config, "error_mode", "body") == "transport"
        add_service(server, api_pb2, "CentrifugoApi",
                    CentrifugoApiService(self.state, node, transport_errors=transport), self.state.call)
        add_service(server, legacy_pb2, "Centrifugo",
                    LegacyCentrifugoService(self.state, node, transport_errors=transport), self.state.call)
        await server.start()
        self._server = server
        self._address = str(HostPort(host, bound))
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="embedded-server-sweeper")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.state.sweep()

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting calls, let running ones finish for up to `grace` seconds."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def _server_section(args: argparse.Namespace) -> ServerSection:
    """The [server] table of `-c FILE` (or defaults), with the command line's flags on top."""
    where = "relay serve"
    if args.config:
        section = load_config(args.config).server
        where = args.config
    else:
        section = ServerSection.model_validate({})
    update: dict[str, object] = {}
    if args.listen:
        update["listen"] = args.listen
    if args.api_key_env:
        update.update(api_key_env=args.api_key_env, api_key_file="")
    names = args.namespace
    if names is None and "namespaces" not in section.model_fields_set:
        names = DEFAULT_NAMESPACES
    if names is not None:
        try:
            update["namespaces"] = [NamespaceConfig.model_validate({"name": name}) for name in names]
        except ValidationError as err:
            raise ConfigError([f"{where}: --namespace: {e['msg'].removeprefix('Value error, ')}"
                               for e in err.errors()]) from None
    section = section.model_copy(update=update)
    try:
        parse_host_port(section.listen, any_port=True)
    except ValueError as err:
        raise ConfigError([f"{where}: server.listen: {err}"]) from None
    return section


async def serve_from_args(args: argparse.Namespace) -> None:
    """`relay serve`: run the embedded server until SIGINT/SIGTERM; FatalError when it cannot start."""
    server = EmbeddedServer(_server_section(args))
    try:
        await server.start()
    except ServerStartError as err:
        raise FatalError(str(err)) from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # What was loaded to start is there for good: keep the collector from walking it again and again.
    gc.freeze()
    print(f"listening on {server.address}", file=sys.stderr, flush=True)
    try:
        await stopping.wait()
    finally:
        await server.stop(grace=1.0)
