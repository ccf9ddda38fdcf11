"""`relay check`: the resolved pipeline, sources → routes → sink, as a person reads it.

Secret values never appear: only the names of the variables or files that hold them, and
whether they are set.
"""

from __future__ import annotations

import os
from typing import Any

from relay.config import Config
from relay.units import format_duration

SECRET_HINTS = ("password", "secret", "token", "api_key", "apikey")


def _secret_ref(env: str, file: str) -> str:
    if file:
        return f"from file {file}"
    if env:
        return f"from ${env} ({'set' if os.environ.get(env) else 'unset: no auth'})"
    return "none"


def _fields(model: Any) -> str:
    """Non-default options of a source, secrets shown by reference only."""
    defaults = _defaults(model)
    parts = []
    for key, value in model.model_dump(exclude={"type"}).items():
        if defaults.get(key) == value:
            continue
        if any(h in key for h in SECRET_HINTS) and not key.endswith(("_env", "_file")):
            value = "***"
        parts.append(f"{key}={value!r}")
    return " ".join(parts)


def _defaults(model: Any) -> dict[str, Any]:
    """The defaults of the model's optional fields, serialised as model_dump() would."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if not info.is_required():
            value = info.get_default(call_default_factory=True)
            out[name] = value.model_dump() if hasattr(value, "model_dump") else value
    # Durations serialise as text ("1s"): compare them the way model_dump() writes them.
    dumped = type(model).model_construct(**out).model_dump(include=set(out)) if out else {}
    return {name: dumped.get(name, value) for name, value in out.items()}


def describe(config: Config, path: str) -> str:
    lines = [f"{path}: ok", "", "sources:"]
    for name, src in config.sources.items():
        lines.append(f"  {name} ({src.type}) {_fields(src)}".rstrip())
    lines += ["", "routes (first match wins unless continue):"]
    for i, route in enumerate(config.routes):
        when = " ".join(f"{k}={v!r}" for k, v in route.when.items())
        targets = ", ".join(route.channels or [route.channel])
        extra = " (continue)" if route.continue_ else ""
        tags = f" tags={route.tags}" if route.tags else ""
        lines.append(f"  [{i}] {route.source}{' when ' + when if when else ''} → {targets} "
                     f"data={route.data}{tags}{extra}")
    lines.append(f"  unmatched → {config.relay.unmatched}")
    sink = config.sink
    retry = sink.retry
    forever = "forever" if retry.max_elapsed == 0 else f"for {format_duration(retry.max_elapsed)}"
    lines += ["", "sink:",
              f"  grpc {sink.api} → {sink.address}{' (tls)' if sink.tls.enabled else ''}, "
              f"api key {_secret_ref(sink.api_key_env, sink.api_key_file)}",
              f"  batches of up to {sink.batch_max_size}, linger {format_duration(sink.batch_linger)}, "
              f"{sink.max_in_flight} in flight, timeout {format_duration(sink.timeout)}",
              f"  retry {format_duration(retry.initial_backoff)}..{format_duration(retry.max_backoff)} "
              f"{forever}; idempotency {'on' if sink.idempotency else 'off'}",
              f"  dead letters → {config.dead_letter_path}"]
    server = config.server
    if server.enabled:
        namespaces = ", ".join(
            f"{ns.name} (history {ns.history_size}, {format_duration(ns.history_ttl)})"
            if ns.history_size and ns.history_ttl else f"{ns.name} (no history)" for ns in server.namespaces)
        lines += ["", "embedded server:",
                  f"  listening on {server.listen}{' (tls)' if server.tls.enabled else ''}, api key "
                  f"{_secret_ref(server.api_key_env, server.api_key_file)}",
                  f"  namespaces: {namespaces or 'none'}"]
        if server.http_listen:
            lines.append(f"  websocket clients and http api on {server.http_listen}, client token secret "
                         f"{_secret_ref(server.client_token_hmac_secret_env, server.client_token_hmac_secret_file)}")
    relay = config.relay
    lines += ["", f"state in {relay.state_dir}; metrics at "
                  f"{relay.metrics_listen or 'off'}; shutdown timeout {format_duration(relay.shutdown_timeout)}"]
    return "\n".join(lines)
