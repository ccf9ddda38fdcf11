"""TLS on both GRPC ends: the embedded server's certificate (and a client CA for mTLS), the sink's
CA, client certificate and server name; and, when a handshake fails, why, in one line.

Files are checked by `relay check` and when the relay starts (relay/certificates.py), so a missing
file, a file that is not PEM or a certificate that does not match its key is a clear error naming
the setting instead of gRPC's "cannot listen" or a handshake that fails later.

gRPC reports a refused handshake as UNAVAILABLE and often says no more than "Socket closed" (with
TLS 1.3 a server that wants a client certificate says so only after the client finished its side
of the handshake). `diagnose()` repeats the handshake with Python's ssl module, which does hear the
server's alert, and names the setting to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import grpc

from relay.addresses import parse_host_port
from relay.certificates import check_ca, check_pair, no_password
from relay.config import ServerTls, SinkTls

# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with its SETTINGS,
# or, if it refused our certificate, with a TLS alert.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
DIAGNOSE_TIMEOUT = 3.0

_NO_CLIENT_CERT = ("CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
_CLIENT_CERT_REFUSED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR",
                        "ACCESS_DENIED", "UNSUPPORTED_CERTIFICATE")
_NO_CLIENT_CERT_TEXT = ("the server demands a client certificate (mTLS): set sink.tls.cert_file and "
                        "sink.tls.key_file")
_CLIENT_CERT_REFUSED_TEXT = ("the server refused our client certificate (is sink.tls.cert_file signed by "
                             "a CA the server trusts?)")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials | None:
    """The embedded server's credentials (None without TLS); with a client CA, clients must
    present a certificate it signed. Raises TlsError."""
    if not tls.enabled:
        return None
    cert, key = check_pair(tls.cert_file, tls.key_file, "server.tls")
    ca = check_ca(tls.client_ca_file, "server.tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def server_ssl_context(tls: ServerTls) -> ssl.SSLContext | None:
    """The same server TLS for the embedded server's HTTP side (aiohttp): None without TLS; with a
    client CA, clients must present a certificate it signed. Raises TlsError."""
    if not tls.enabled:
        return None
    check_pair(tls.cert_file, tls.key_file, "server.tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file, password=no_password)
    if tls.client_ca_file:
        check_ca(tls.client_ca_file, "server.tls.client_ca_file")
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def channel_credentials(tls: SinkTls) -> grpc.ChannelCredentials:
    """The sink's credentials: a CA file (or the system's trust store) and, for mTLS, a client
    certificate and key. Raises TlsError."""
    ca = check_ca(tls.ca_file, "sink.tls.ca_file") if tls.ca_file else None
    cert = key = None
    if tls.cert_file:
        cert, key = check_pair(tls.cert_file, tls.key_file, "sink.tls")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _client_context(tls: SinkTls | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2"])
    if tls is None or not tls.enabled:
        # Only asking whether the server speaks TLS at all.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    else:
        ctx.load_default_certs()
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_password)
    return ctx


def _explain(err: ssl.SSLError, tls: SinkTls) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"the server's certificate is not trusted ({err.verify_message}); check sink.tls.ca_file"
                f"{' and sink.tls.server_name' if 'mismatch' in str(err.verify_message) else ''}")
    text = f"{err.reason or ''} {err}".upper()
    if any(word in text for word in _NO_CLIENT_CERT) or (
            not tls.cert_file and "HANDSHAKE_FAILURE" in text):
        return _NO_CLIENT_CERT_TEXT
    if any(word in text for word in _CLIENT_CERT_REFUSED):
        return _CLIENT_CERT_REFUSED_TEXT
    if any(word in text for word in _NOT_TLS):
        return "the server does not speak TLS (set sink.tls.enabled = false, or enable TLS on the server)"
    return f"TLS handshake failed: {err.reason or err}"


async def diagnose(address: str, tls: SinkTls | None, timeout: float = DIAGNOSE_TIMEOUT) -> str | None:
    """Why a gRPC connection to `address` fails for TLS reasons, as one line naming the setting to
    fix; None when TLS is not the problem (or the server cannot be reached at all)."""
    try:
        target = parse_host_port(address)
    except ValueError:
        return None
    host, port = target.host, target.port
    enabled = tls is not None and tls.enabled
    try:
        ctx = _client_context(tls)
    except (OSError, ssl.SSLError):
        return None  # the files were checked at start; a file changed since is reported by gRPC
    name = (tls.server_name if tls is not None and tls.server_name else host) if enabled else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=name), timeout)
    except ssl.SSLError as err:
        return _explain(err, tls) if enabled and tls is not None else None
    except (OSError, TimeoutError):
        return None
    try:
        if not enabled:
            return "the server speaks TLS: set sink.tls.enabled = true (and sink.tls.ca_file)"
        writer.write(_H2_PREFACE)
        await writer.drain()
        if await asyncio.wait_for(reader.read(1), timeout):
            return None
    except ssl.SSLError as err:
        return _explain(err, tls) if tls is not None else None
    except ConnectionError:
        pass  # reset by the server: see below
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    # Closed at once after our side of the handshake: a gRPC server does that (TLS 1.3, no alert
    # that reaches us) when it wants a client certificate and did not get one it trusts.
    assert tls is not None
    return _NO_CLIENT_CERT_TEXT if not tls.cert_file else _CLIENT_CERT_REFUSED_TEXT
