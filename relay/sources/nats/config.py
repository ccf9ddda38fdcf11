"""The `[sources.NAME]` table of `type = "nats"` (README's option table is made from it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from relay.units import Duration


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: str = Field("", description="CA bundle (PEM) that signed the server's certificate; "
                                         "empty = the system's trust store.")
    cert_file: str = Field("", description="Client certificate (PEM), for servers that verify clients.")
    key_file: str = Field("", description="Private key (PEM) of the client certificate.")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["nats"]
    url: str = Field("nats://127.0.0.1:4222", description="Server URL(s), comma-separated; tls:// for TLS.")
    token_env: str = Field("", description="Environment variable holding an auth token.")
    username: str = Field("", description="User name (with password_env or password_file).")
    password_env: str = Field("", description="Environment variable holding the password.")
    password_file: str = Field("", description="File holding the password.")
    credentials_file: str = Field("", description="NATS credentials file (JWT and NKey seed).")
    tls: TlsConfig | None = Field(None, description="TLS files; set (even empty) to connect with TLS.")
    stream: str = Field(min_length=1, description="The JetStream stream to read.")
    subjects: list[str] = Field(default_factory=list,
                                description="Subject filters of the consumer; empty = the whole stream.")
    durable: str = Field("centrifugo-relay", min_length=1,
                         description="Durable consumer name; relays with the same durable share its messages "
                                     "(with ack_policy = explicit).")
    use_existing: bool = Field(False, description="Use the durable as it is and fail if it is missing, "
                                                  "instead of creating it.")
    deliver: Literal["all", "new"] = Field("all", description="Where a newly created durable starts: "
                                                              "all = the whole stream, new = new messages.")
    format: Literal["data", "centrifugo"] = Field(
        "data", description="data: the body is the publication data, routes decide the channels; "
                            "centrifugo: Centrifugo's own consumer format (method/payload JSON, the "
                            "centrifugo-method header, or centrifugo-* headers).")
    # 20,000, not 5,000: the server sends no more than this unacked, and a message stays unacked from
    # its delivery through the pipeline to the next commit (bench/nats_bench.py: 61k → 105k msg/s).
    max_ack_pending: int = Field(20_000, ge=1, description="Unacked messages the server hands this durable "
                                                           "at most (the in-flight cap), when created; a small "
                                                           "one is acked more often (with use_existing, the "
                                                           "durable's own sets the pace).")
    ack_policy: Literal["all", "explicit"] = Field(
        "all", description="How a durable the relay creates is acked: all = one ack per commit covers "
                           "every message before it (one relay per durable); explicit = an ack per "
                           "message (several relays may share the durable). An existing durable keeps "
                           "its own.")
    ack_wait: Duration = Field(30.0, description="Unacked messages are redelivered after this long, "
                                                 "when created.")
    fetch_batch: int = Field(500, ge=1, le=10_000, description="Messages asked for per pull request.")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if not all(u.strip() for u in self.url.split(",")):
            raise ValueError("url has an empty entry")
        ways = [bool(self.token_env), bool(self.username), bool(self.credentials_file)]
        if sum(ways) > 1:
            raise ValueError("set at most one of token_env, username, credentials_file")
        if self.username and not (self.password_env or self.password_file):
            raise ValueError("username needs password_env or password_file (never a password in the file)")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("password_env/password_file need username")
        if self.ack_wait <= 0:
            raise ValueError("ack_wait must be more than 0s")
        if self.tls is not None and bool(self.tls.cert_file) != bool(self.tls.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self
