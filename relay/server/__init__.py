"""The embedded Centrifugo-compatible server (see README "Embedded server").

`state` holds channels and their streams; `service_v6` and `service_v2` answer the two GRPC APIs,
`auth` checks the key. The HTTP side (`http_side`, on `server.http_listen`) serves `http_api`
(Centrifugo's HTTP API over the v6 service's operations) and `websocket` (the client protocol:
`client_protocol` sessions, `client_encoding` JSON or protobuf, `jwt` tokens, `delta` fossil
deltas), with `hub` knowing who is subscribed where. `app` binds them to ports (`EmbeddedServer`)
and runs `relay serve`.
"""
