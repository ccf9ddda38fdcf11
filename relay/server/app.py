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
import ssl
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
from relay.server.client_protocol import ClientContext
from relay.server.handlers import add_service
from relay.server.http_api import HttpApi
from relay.server.http_side import HttpSide
from relay.server.hub import Hub
from relay.server.jwt import TokenVerifier
from relay.server.node import NodeInfo
from relay.server.service_v2 import LegacyCentrifugoService
from relay.server.service_v6 import CentrifugoApiService
from relay.server.state import NamespacePolicy, ServerState
from relay.tls import server_credentials, server_ssl_context

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


def top_level_policy(config: ServerSection) -> NamespacePolicy:
    options = config.without_namespace
    return NamespacePolicy("", options.history_size, options.history_ttl)


class EmbeddedServer:
    """Serves `centrifugal.centrifugo.api.CentrifugoApi` and `api.Centrifugo` from one store."""

    def __init__(self, config: ServerSection, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.state = ServerState(namespace_policies(config), top_level=top_level_policy(config), clock=clock,
                                 max_channels=config.max_channels, max_reply_bytes=config.max_reply_bytes)
        self.hub = Hub()
        self.state.on_publication = self.hub.deliver
        self._http: HttpSide | None = None
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._address = ""

    @property
    def address(self) -> str:
        """The host:port actually listened on (the real port when the config says 0)."""
        if not self._address:
            raise RuntimeError("the embedded server is not started")
        return self._address

    @property
    def http_address(self) -> str:
        """The host:port of the HTTP side (WebSocket and HTTP API); "" when it is off."""
        return self._http.address if self._http is not None else ""

    def _api_key(self) -> str:
        return _secret(self.config.api_key_env, self.config.api_key_file)

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
        self._refuse_open_remote("listen", host, key)
        http_host, http_port = self._http_listen()
        if self.config.http_listen:
            self._refuse_open_remote("http_listen", http_host, key)
            check_bindable(http_host, http_port)
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
        clients = self._client_context()
        self.hub.delta_publish = clients.delta_publish
        self.hub.previous_data = lambda channel, offset: self.state.publication_data(channel, offset - 1)
        service = CentrifugoApiService(self.state, node, transport_errors=transport,
                                       clients=clients if self.config.http_listen else None)
        add_service(server, api_pb2, "CentrifugoApi", service, self.state.call)
        add_service(server, legacy_pb2, "Centrifugo",
                    LegacyCentrifugoService(self.state, node, transport_errors=transport), self.state.call)
        await server.start()
        self._server = server
        if self.config.http_listen:
            http = HttpSide(self.config, clients, HttpApi(service, clients, key))
            try:
                await http.start(http_host, http_port, self._ssl_context())
            except OSError as err:
                await server.stop(0)
                self._server = None
                raise ServerStartError(f"cannot listen on {self.config.http_listen}: {err.strerror or err}") from None
            self._http = http
        self._address = str(HostPort(host, bound))
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="embedded-server-sweeper")

    def _ssl_context(self) -> ssl.SSLContext | None:
        try:
            return server_ssl_context(self.config.tls)
        except TlsError as err:
            raise ServerStartError(str(err)) from None

    def _refuse_open_remote(self, key_name: str, host: str, key: str) -> None:
        if not key and not is_loopback(host) and not self.config.allow_unauthenticated_remote:
            listen = getattr(self.config, key_name)
            raise ServerStartError(
                f"server.{key_name}: {listen} is reachable from other hosts and no API key is set; "
                "set server.api_key_env (or allow_unauthenticated_remote = true)")

    def _http_listen(self) -> tuple[str, int]:
        if not self.config.http_listen:
            return "", 0
        try:
            listen = parse_host_port(self.config.http_listen, any_port=True)
            return listen.host, listen.port
        except ValueError as err:
            raise ServerStartError(f"server.http_listen: {err}") from None

    def _client_context(self) -> ClientContext:
        secret = _secret(self.config.client_token_hmac_secret_env, self.config.client_token_hmac_secret_file)
        personal = self.config.subscribe_to_user_personal_channel
        return ClientContext(
            state=self.state, hub=self.hub, namespaces={ns.name: ns for ns in self.config.namespaces},
            without_namespace=self.config.without_namespace, verifier=TokenVerifier(secret),
            allow_anonymous=self.config.allow_anonymous_connect_without_token,
            max_subscriptions=self.config.max_subscriptions_per_connection,
            personal_namespace=personal.personal_channel_namespace if personal.enabled else None,
            version=NodeInfo().version)

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
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def _secret(env: str, file: str) -> str:
    try:
        secret = load_secret(env, file)
    except SecretError as err:
        raise ServerStartError(str(err)) from None
    return secret.reveal() if secret else ""


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
    if getattr(args, "http_listen", None) is not None:
        update["http_listen"] = args.http_listen
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
    if server.http_address:
        print(f"http on {server.http_address}", file=sys.stderr, flush=True)
    print(f"listening on {server.address}", file=sys.stderr, flush=True)
    try:
        await stopping.wait()
    finally:
        await server.stop(grace=1.0)
