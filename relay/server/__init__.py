"""The embedded Centrifugo-compatible GRPC server (see README "Embedded server").

`state` holds channels, `service_v6` and `service_v2` answer the two APIs, `auth` checks the key,
`app` binds them to a port (`EmbeddedServer`) and runs `relay serve`.
"""
