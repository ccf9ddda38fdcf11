"""The config file: TOML read with tomllib into pydantic models, one problem per line on error.

Every error reads `FILE: dotted.key: what is wrong`, so a user can go straight to the line.
Source tables are validated by the model of their `type` (relay/sources/<type>.py).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from relay import sources
from relay.addresses import parse_host_port
from relay.certificates import TlsError, check_ca, check_pair
from relay.channels import NAMESPACE_NAME, channel_problem
from relay.errors import ConfigError
from relay.server.state import MAX_CHANNELS, MAX_REPLY_BYTES
from relay.templates import Template, TemplateError
from relay.units import Duration, Size, format_duration

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# gRPC keeps message size limits in a signed 32-bit integer.
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class RelaySection(Model):
    state_dir: str = Field("var/relay", description="Checkpoints and dead letters live here.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="text, or one JSON object per line.")
    metrics_listen: str = Field("127.0.0.1:9108", description='/metrics, /healthz, /readyz; "" turns it off.')
    shutdown_timeout: Duration = Field(10.0, description="Drain in-flight work on SIGTERM, then stop.")
    unmatched: Literal["drop", "dead_letter"] = Field(
        "drop", description="What happens to a message no route takes.")
    max_buffer_bytes: Annotated[Size, Field(ge=1024)] = Field(
        256 * 1024 * 1024, description="Message data read and not yet delivered, all sources together "
                                       "(source buffers and lanes); reading pauses at this, resumes at half.")

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_host_port(value, any_port=True)
        return value


class ChannelOptions(Model):
    """What clients may do in a channel, named as Centrifugo v6 names its channel options."""

    history_size: int = Field(1000, ge=0, description="Publications kept per channel; 0 turns history off.")
    history_ttl: Duration = Field(600.0, description="How long publications are kept; 0s turns history off.")
    allow_subscribe_for_client: bool = Field(
        True, description="Clients may subscribe without a subscription token (Centrifugo's default is false).")
    allow_subscribe_for_anonymous: bool = Field(
        True, description="Anonymous clients may subscribe too (Centrifugo's default is false).")
    allow_publish_for_client: bool = Field(False, description="Clients may publish.")
    allow_publish_for_subscriber: bool = Field(False, description="Subscribers of the channel may publish.")
    allow_publish_for_anonymous: bool = Field(False, description="Anonymous clients may publish too.")
    allow_history_for_client: bool = Field(False, description="Clients may read history.")
    allow_history_for_subscriber: bool = Field(False, description="Subscribers may read history.")
    allow_history_for_anonymous: bool = Field(False, description="Anonymous clients may read history too.")
    allow_presence_for_client: bool = Field(False, description="Clients may ask presence.")
    allow_presence_for_subscriber: bool = Field(False, description="Subscribers may ask presence.")
    allow_presence_for_anonymous: bool = Field(False, description="Anonymous clients may ask presence too.")
    presence: bool = Field(False, description="Keep presence (who is subscribed).")
    join_leave: bool = Field(False, description="Send join and leave messages.")
    force_push_join_leave: bool = Field(False, description="Push join/leave to every subscriber.")
    allow_recovery: bool = Field(False, description="Subscribers that ask may recover missed publications.")
    force_recovery: bool = Field(False, description="Every subscription is recoverable.")
    allow_positioning: bool = Field(False, description="Subscribers that ask are told the stream position.")
    force_positioning: bool = Field(False, description="Every subscription is positioned.")
    allowed_delta_types: list[Literal["fossil"]] = Field(
        default_factory=list, description='Delta compressions subscribers may ask for: ["fossil"].')
    delta_publish: bool = Field(False, description="Every publication is a delta publication.")


class NamespaceConfig(ChannelOptions):
    name: str = Field(description="Namespace name, the part of a channel before the first ':'.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAMESPACE_NAME.match(value):
            raise ValueError(f"namespace name {value!r} must match {NAMESPACE_NAME.pattern}")
        return value


class ServerTls(Model):
    enabled: bool = Field(False, description="Serve TLS (cert_file and key_file are then required).")
    cert_file: str = Field("", description="The server's certificate chain (PEM).")
    key_file: str = Field("", description="Its private key (PEM, unencrypted).")
    client_ca_file: str = Field("", description="Demand client certificates signed by this CA (mTLS).")

    @model_validator(mode="after")
    def _complete(self) -> ServerTls:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("tls.enabled needs cert_file and key_file")
        if not self.enabled and (self.cert_file or self.key_file or self.client_ca_file):
            raise ValueError("tls files are set but tls.enabled is false")
        return self


class PersonalChannel(Model):
    enabled: bool = Field(False, description="Subscribe every user (not anonymous) to a personal channel on connect.")
    personal_channel_namespace: str = Field(
        "", description='Its namespace: the channel is "NS:#USER" ("#USER" when empty).')


class ServerSection(Model):
    enabled: bool = Field(False, description="Run the embedded Centrifugo-compatible server.")
    listen: str = Field("127.0.0.1:10000", description="host:port of the embedded server.")
    api_key_env: str = Field("", description="Environment variable holding the API key; unset = no auth.")
    api_key_file: str = Field("", description="File holding the API key.")
    namespaces: list[NamespaceConfig] = Field(default_factory=list, description="Configured namespaces.")
    tls: ServerTls = Field(default_factory=lambda: ServerTls.model_validate({}))
    allow_unauthenticated_remote: bool = Field(
        False, description="Allow a non-loopback listen address without an API key.")
    error_mode: Literal["body", "transport"] = Field(
        "body", description="Like Centrifugo's grpc_api.error_mode: errors in the response body, or in "
                            "the GRPC status (a client can also ask per call with x-centrifugo-error-mode).")
    max_message_bytes: Annotated[Size, Field(ge=1024, le=MAX_GRPC_MESSAGE_BYTES)] = Field(
        4 * 1024 * 1024, description="Largest request accepted (Centrifugo's "
                                     "grpc_api.max_receive_message_size); a larger one is refused with "
                                     "RESOURCE_EXHAUSTED.")
    max_channels: int = Field(
        MAX_CHANNELS, ge=1, description="Channels held at most: about 1.5 KB of memory each with one small "
                                   "publication, 1.9 KB with an idempotency key too, plus what more they keep "
                                   "(bench/server_memory.py). Past it a call that would add a channel gets "
                                   "error 100, which clients retry: idle channels expire and make room.")
    max_reply_bytes: Annotated[Size, Field(ge=1024)] = Field(
        MAX_REPLY_BYTES, description="Bytes of publications (History) and channel names (Channels) one "
                                      "call may make the server answer with (16 MiB), all commands of a "
                                      "Batch together; past it a command gets error 107.")

    http_listen: str = Field(
        "", description='host:port of the HTTP side: WebSocket clients at /connection/websocket, the HTTP '
                        'server API at /api; "" = off.')
    without_namespace: ChannelOptions = Field(
        default_factory=lambda: ChannelOptions.model_validate({"history_size": 0}),
        description="Options of channels without a namespace (Centrifugo's channel.without_namespace).")
    client_token_hmac_secret_env: str = Field(
        "", description="Environment variable holding the HMAC secret (HS256, HS384, HS512) of connection "
                        "and subscription JWTs.")
    client_token_hmac_secret_file: str = Field("", description="File holding that secret.")
    subscribe_to_user_personal_channel: PersonalChannel = Field(
        default_factory=lambda: PersonalChannel.model_validate({}),
        description="Centrifugo's client.subscribe_to_user_personal_channel.")
    allow_anonymous_connect_without_token: bool = Field(
        True, description="Clients may connect without a token (as anonymous users).")
    max_connections: int = Field(10000, ge=1, description="WebSocket connections at most; more are refused.")
    max_subscriptions_per_connection: int = Field(
        128, ge=1, description="Channels one connection may subscribe to (Centrifugo's client.channel_limit).")
    max_client_message_bytes: Annotated[Size, Field(ge=1024)] = Field(
        65536, description="Largest WebSocket message a client may send (a larger one closes it).")
    client_queue_max_bytes: Annotated[Size, Field(ge=1024)] = Field(
        1024 * 1024, description="Bytes queued for a slow client before it is disconnected (3008 slow).")

    @field_validator("listen", "http_listen")
    @classmethod
    def _listen(cls, value: str, info: ValidationInfo) -> str:
        if value or info.field_name == "listen":
            parse_host_port(value, any_port=True)
        return value

    @field_validator("namespaces", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        # A bare name gets history on (1000, 10m): the embedded server is for trying things out.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class SinkTls(Model):
    enabled: bool = Field(False, description="Talk TLS to Centrifugo.")
    ca_file: str = Field("", description="CA bundle (PEM) that signed Centrifugo's certificate; empty = the "
                                         "system's trust store.")
    cert_file: str = Field("", description="Client certificate (PEM), for a server that demands one (mTLS).")
    key_file: str = Field("", description="Private key (PEM, unencrypted) of the client certificate.")
    server_name: str = Field("", description="The name Centrifugo's certificate must carry, when it is not "
                                             "the host of sink.address.")

    @model_validator(mode="after")
    def _complete(self) -> SinkTls:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if not self.enabled and (self.ca_file or self.cert_file or self.server_name):
            raise ValueError("tls settings are given but tls.enabled is false")
        return self


class RetryConfig(Model):
    initial_backoff: Annotated[Duration, Field(gt=0)] = 0.05
    max_backoff: Duration = 5.0
    max_elapsed: Duration = Field(0.0, description="0s = retry forever.")

    @field_validator("max_backoff")
    @classmethod
    def _not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial_backoff")
        if initial is not None and value < initial:
            raise ValueError(f"max_backoff ({format_duration(value)}) is less than initial_backoff "
                             f"({format_duration(initial)})")
        return value


class SinkSection(Model):
    address: str = Field("127.0.0.1:10000", description="Centrifugo's GRPC API address, host:port.")
    api: Literal["v6", "v2"] = Field(
        "v6", description="v6 = CentrifugoApi (v3..v6); v2 = legacy api.Centrifugo.")
    api_key_env: str = Field("", description="Environment variable holding the GRPC API key.")
    api_key_file: str = Field("", description="File holding the GRPC API key.")
    tls: SinkTls = Field(default_factory=lambda: SinkTls.model_validate({}))
    timeout: Annotated[Duration, Field(gt=0)] = Field(5.0, description="Per-call deadline.")
    batch_max_size: int = Field(500, ge=1, le=10000)
    batch_linger: Duration = Field(0.0, description="How long a lane waits to fill a batch that is not full "
                                                    "(0: only while the sources keep adding to it).")
    max_in_flight: int = Field(4, ge=1, le=256, description="Batches in flight at once (ordered lanes).")
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig.model_validate({}))
    idempotency: bool = Field(True, description="Every publication carries an idempotency key.")
    dead_letter: str = Field("", description='Dead letter file; default "<state_dir>/dead-letter.jsonl".')
    max_message_bytes: Annotated[Size, Field(ge=1024)] = Field(
        4 * 1024 * 1024, description="Largest GRPC request sent; a publication that cannot fit goes to "
                                     "the dead letter file. Lowered by itself if the server says its "
                                     "limit is less.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value


WhenValue = str
# One route is one Publish or one Broadcast; so is a Kafka record in Centrifugo's format.
MAX_CHANNELS_PER_PUBLICATION = 1000


def _check_channel_template(text: str) -> None:
    """A channel without placeholders is checked now, so a typo fails at start, not per message."""
    if Template.compile(text).is_constant:
        problem = channel_problem(text)
        if problem:
            raise ValueError(problem)

DATA_MODES = ("json", "wrap", "raw")


class RouteConfig(Model):
    source: str = Field(description="Name of the source whose messages this route takes.")
    when: dict[str, WhenValue] = Field(
        default_factory=dict, description="Globs on fields of the message (key, topic, header.NAME, json.PATH, "
                                          "file.name ...: what its source provides); all must hold.")
    channel: str = ""
    channels: list[str] = Field(default_factory=list)
    data: str = Field("json", description=(
        "json: the message data must be JSON (sent as is); wrap: {\"line\": text, \"file\": path}; "
        "raw: bytes as they are; or a template like '{\"room\": \"{{ key }}\"}' (must render to JSON)."))
    tags: dict[str, str] = Field(default_factory=dict)
    continue_: bool = Field(False, alias="continue")
    skip_history: bool = False

    @model_validator(mode="after")
    def _targets(self) -> RouteConfig:
        if bool(self.channel) == bool(self.channels):
            raise ValueError("a route needs exactly one of channel or channels")
        return self

    @field_validator("channel")
    @classmethod
    def _template(cls, value: str) -> str:
        if value:
            _check_channel_template(value)
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        if value in DATA_MODES:
            return value
        if Template.compile(value).is_constant:
            raise ValueError(f"data must be one of {', '.join(DATA_MODES)} or a {{{{ }}}} template, "
                             f"got {value!r}")
        return value

    @field_validator("channels")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_CHANNELS_PER_PUBLICATION:
            raise ValueError(f"a route has at most {MAX_CHANNELS_PER_PUBLICATION} channels, got {len(value)}")
        for item in value:
            _check_channel_template(item)
        return value

    @field_validator("tags")
    @classmethod
    def _tag_templates(cls, value: dict[str, str]) -> dict[str, str]:
        for item in value.values():
            Template.compile(item)
        return value

    @field_validator("when")
    @classmethod
    def _when_keys(cls, value: dict[str, str]) -> dict[str, str]:
        from relay.templates import TemplateError, check_field
        for key in value:
            try:
                check_field(key)
            except TemplateError:
                known = sources.describe_fields(sources.all_fields())
                raise ValueError(f"cannot match on {key!r} (known: {known})") from None
        for key, pattern in value.items():
            if not pattern:
                raise ValueError(f"glob for {key!r} is empty")
            if pattern.count("[") != pattern.count("]"):
                raise ValueError(f"glob {pattern!r} for {key!r} has an unbalanced [ ]")
        return value


class Config(Model):
    relay: RelaySection = Field(default_factory=lambda: RelaySection.model_validate({}))
    server: ServerSection = Field(default_factory=lambda: ServerSection.model_validate({}))
    sink: SinkSection = Field(default_factory=lambda: SinkSection.model_validate({}))
    sources: dict[str, Annotated[Any, Field()]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)

    @property
    def dead_letter_path(self) -> Path:
        return Path(self.sink.dead_letter or os.path.join(self.relay.state_dir, "dead-letter.jsonl"))


def _key(part: Any) -> str:
    """A key as TOML writes it in a dotted key: bare when it can be, else quoted (one line always)."""
    text = str(part)
    if _BARE_KEY.fullmatch(text):  # fullmatch: `$` would let a key ending in a newline pass
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    return quoted.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _key(part)
    return out or "(top level)"


def _field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        names.append(info.alias or name)
    return names


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the last key of `loc`, for did-you-mean suggestions."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation: Any = info.annotation
        for arg in getattr(annotation, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                annotation = arg
        model = annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _problems(file: str, err: ValidationError, root: type[BaseModel],
              prefix: tuple[Any, ...] = ()) -> list[str]:
    out = []
    for item in err.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
            owner = _model_at(root, loc)
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), _field_names(owner), n=1)
                if close:
                    msg += f" (did you mean {close[0]!r}?)"
        elif item["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = item["msg"].removeprefix("Value error, ")
        out.append(f"{file}: {_dotted(prefix + loc)}: {msg}")
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')
_TABLE_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_VALUE = re.compile(r"^\s*([^=\s][^=]*?)\s*=(.*)$")


def _deepest_key(text: str) -> str:
    """The dotted key whose value nests deepest: tomllib's RecursionError does not say where it was."""
    table, key, depth, deepest, where = "", "", 0, -1, "(toml)"
    arrays: dict[str, int] = {}
    for line in text.splitlines():
        line = _STRING.sub('""', line)
        if depth == 0:
            header = _TABLE_HEADER.match(line)
            if header:
                table = header.group(2).replace(" ", "")
                if header.group(1) == "[[":
                    arrays[table] = arrays.get(table, -1) + 1
                    table += f"[{arrays[table]}]"
                key = ""
                continue
            pair = _KEY_VALUE.match(line)
            if pair:
                key, line = pair.group(1).replace(" ", ""), pair.group(2)
        for char in line.split("#", 1)[0]:
            depth += char in "[{"
            depth -= char in "]}"
            if depth > deepest:
                deepest, where = depth, ".".join(part for part in (table, key) if part)
        depth = max(depth, 0)
    return where or "(toml)"


def _validate_sources(file: str, raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    built: dict[str, Any] = {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        return built, [f"{file}: sources: expected a table of named sources"]
    for name, table in raw.items():
        where = f"sources.{_key(name)}"
        if not isinstance(table, dict):
            problems.append(f"{file}: {where}: expected a table")
            continue
        kind = table.get("type")
        if kind not in sources.TYPES:
            close = difflib.get_close_matches(str(kind), sources.TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (one of {', '.join(sources.TYPES)})"
            what = "required key is missing" if kind is None else f"unknown source type {kind!r}{hint}"
            problems.append(f"{file}: {where}.type: {what}")
            continue
        model = sources.config_model(kind)
        try:
            built[name] = model.model_validate(table)
        except ValidationError as err:
            problems.extend(_problems(file, err, model, ("sources", name)))
    return built, problems


def parse_config(text: str, file: str = "config.toml") -> Config:
    """Parse and validate config text; raises ConfigError with every problem found."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{file}: (toml): {err}"]) from None
    except RecursionError:
        raise ConfigError([f"{file}: {_deepest_key(text)}: arrays or tables nested too deeply"]) from None
    source_tables, problems = _validate_sources(file, raw.pop("sources", {}))
    try:
        config = Config.model_validate({**raw, "sources": {}})
    except ValidationError as err:
        problems.extend(_problems(file, err, Config))
        raise ConfigError(problems) from None
    config = config.model_copy(update={"sources": source_tables})
    problems.extend(_cross_checks(file, config))
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(file: str, config: Config) -> list[str]:
    problems = []
    for i, route in enumerate(config.routes):
        if route.source not in config.sources:
            close = difflib.get_close_matches(route.source, list(config.sources), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{file}: routes[{i}].source: no source named {route.source!r}{hint}")
            continue
        problems.extend(f"{file}: routes[{i}].{problem}"
                        for problem in _fields_not_provided(route, config.sources[route.source].type))
    names = [ns.name for ns in config.server.namespaces]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{file}: server.namespaces: namespace {dup!r} is listed twice")
    return problems


def _named_files(model: BaseModel, where: str) -> Iterator[tuple[str, str]]:
    """(dotted key, path) of every `*_file` option that names a file, in `model` and the tables inside."""
    for name, value in model:
        if isinstance(value, BaseModel):
            yield from _named_files(value, f"{where}.{name}")
        elif name.endswith("_file") and isinstance(value, str) and value:
            yield f"{where}.{name}", value


def _file_problems(file: str, config: Config) -> list[str]:
    """The files a config names that `relay run` could not use: unreadable ones, and TLS files that
    are not PEM or not a pair. Checked here so `relay check` fails where `relay run` would."""
    problems = []
    named = [*_named_files(config.server, "server"), *_named_files(config.sink, "sink")]
    for name, source in config.sources.items():
        named += _named_files(source, f"sources.{_key(name)}")
    for key, path in named:
        try:
            Path(path).open("rb").close()
        except OSError as err:
            problems.append(f"{file}: {key}: cannot read {path}: {err.strerror}")
    if problems:
        return problems
    server, sink = config.server.tls, config.sink.tls
    checks: list[Callable[[], object]] = []
    if server.enabled:
        checks.append(lambda: check_pair(server.cert_file, server.key_file, "server.tls"))
        if server.client_ca_file:
            checks.append(lambda: check_ca(server.client_ca_file, "server.tls.client_ca_file"))
    if sink.enabled and sink.ca_file:
        checks.append(lambda: check_ca(sink.ca_file, "sink.tls.ca_file"))
    if sink.enabled and sink.cert_file:
        checks.append(lambda: check_pair(sink.cert_file, sink.key_file, "sink.tls"))
    for check in checks:
        try:
            check()
        except TlsError as err:
            problems.append(f"{file}: {err}")
    return problems
def _route_fields(route: RouteConfig) -> list[tuple[str, str]]:
    """(config key, field) for every template field and `when` key a route uses."""
    used = [(f"when.{_key(key)}", key) for key in route.when]
    texts = [("channel", route.channel)] if route.channel else []
    texts += [(f"channels[{n}]", text) for n, text in enumerate(route.channels)]
    if route.data not in DATA_MODES:
        texts.append(("data", route.data))
    texts += [(f"tags.{_key(name)}", text) for name, text in route.tags.items()]
    for where, text in texts:
        used += [(where, name) for name in Template.compile(text).fields]
    return used


def _fields_not_provided(route: RouteConfig, source_type: str) -> list[str]:
    """A route's fields that its source never provides, so that every message would be a dead letter."""
    available = sources.fields(source_type)
    return [f"{where}: source {route.source!r} ({source_type}) never provides "
            f"{name if where.startswith('when') else '{{ ' + name + ' }}'} "
            f"(it provides {sources.describe_fields(available)})"
            for where, name in _route_fields(route) if not sources.provides(available, name)]


def load_config(path: str | Path) -> Config:
    """Read and validate a config file, and the files it names; raises ConfigError."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{file}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: not UTF-8 text"]) from None
    config = parse_config(text, file)
    problems = _file_problems(file, config)
    if problems:
        raise ConfigError(problems)
    return config


def default_config_path() -> str:
    return os.environ.get("RELAY_CONFIG") or "config.toml"


__all__ = ["Config", "ConfigError", "Duration", "Size", "TemplateError", "load_config", "parse_config"]
