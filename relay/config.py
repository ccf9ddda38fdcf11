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
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relay import sources
from relay.channels import NAMESPACE_NAME, channel_problem
from relay.templates import Template, TemplateError
from relay.units import Duration, Size

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


class NamespaceConfig(Model):
    name: str = Field(description="Namespace name, the part of a channel before the first ':'.")
    history_size: int = Field(1000, ge=0, description="Publications kept per channel; 0 turns history off.")
    history_ttl: Duration = Field(600.0, description="How long publications are kept; 0s turns history off.")

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
    initial_backoff: Duration = 0.05
    max_backoff: Duration = 5.0
    max_elapsed: Duration = Field(0.0, description="0s = retry forever.")


class SinkSection(Model):
    address: str = Field("127.0.0.1:10000", description="Centrifugo's GRPC API address, host:port.")
    api: Literal["v6", "v2"] = Field(
        "v6", description="v6 = CentrifugoApi (v3..v6); v2 = legacy api.Centrifugo.")
    api_key_env: str = Field("", description="Environment variable holding the GRPC API key.")
    api_key_file: str = Field("", description="File holding the GRPC API key.")
    tls: SinkTls = Field(default_factory=lambda: SinkTls.model_validate({}))
    timeout: Duration = Field(5.0, description="Per-call deadline.")
    batch_max_size: int = Field(500, ge=1, le=10000)
    batch_linger: Duration = Field(0.0, description="How long a lane waits to fill a batch that is not full.")
    max_in_flight: int = Field(4, ge=1, le=256, description="Batches in flight at once (ordered lanes).")
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig.model_validate({}))
    idempotency: bool = Field(True, description="Every publication carries an idempotency key.")
    dead_letter: str = Field("", description='Dead letter file; default "<state_dir>/dead-letter.jsonl".')
    max_message_bytes: Annotated[Size, Field(ge=1024)] = Field(
        4 * 1024 * 1024, description="Largest GRPC request sent; a publication that cannot fit goes to "
                                     "the dead letter file. Lowered by itself if the server says its "
                                     "limit is less.")


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


class ConfigError(Exception):
    """One or more problems in a config file, each a line `FILE: dotted.key: what is wrong`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _key(part: Any) -> str:
    """A key as TOML writes it in a dotted key: bare when it can be, else quoted (one line always)."""
    text = str(part)
    if _BARE_KEY.match(text):
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
    source_tables, problems = _validate_sources(file, raw.pop("sources", {}))
    try:
        config = Config.model_validate({**raw, "sources": {}})
    except ValidationError as err:
        problems.extend(_problems(file, err, Config))
        raise ConfigError(problems) from None
    config = config.model_copy(update={"sources": source_tables})
    problems.extend(_cross_checks(file, config, raw_source_names=source_tables.keys() | set()))
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(file: str, config: Config, raw_source_names: Any) -> list[str]:
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
    """Read and validate a config file; raises ConfigError."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{file}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: not UTF-8 text"]) from None
    return parse_config(text, file)


def default_config_path() -> str:
    return os.environ.get("RELAY_CONFIG") or "config.toml"


__all__ = ["Config", "ConfigError", "Duration", "Size", "TemplateError", "load_config", "parse_config"]
