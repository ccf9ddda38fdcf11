"""Certificate and key files named by the config: read and checked with Python's ssl module.

Each error names the setting (`server.tls.cert_file: cannot read ...`), so a missing file, a file
that is not PEM or a certificate that does not match its key is found by `relay check` and at
start, never first by a handshake. The server's and the sink's credentials (relay/tls.py) are built
from what these return.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from relay.secrets import SecretError


class TlsError(SecretError):
    """A TLS file named by the config is missing, unreadable, or not what it should be."""


def no_password() -> bytes:
    # An encrypted private key fails cleanly instead of OpenSSL prompting on the terminal.
    return b""


def read_pem(path: str, setting: str) -> bytes:
    """The bytes of a PEM file; TlsError naming `setting` when it cannot be read or is not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TlsError(f"{setting}: cannot read {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{setting}: {path} is not a PEM file")
    return data


def check_pair(cert_file: str, key_file: str, section: str) -> tuple[bytes, bytes]:
    """A certificate and its (unencrypted) private key, checked to be a pair."""
    cert = read_pem(cert_file, f"{section}.cert_file")
    key = read_pem(key_file, f"{section}.key_file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as err:
        raise TlsError(f"{section}: {cert_file} and {key_file} are not a PEM certificate and its "
                       f"(unencrypted) private key ({err.reason or err})") from None
    return cert, key


def check_ca(ca_file: str, setting: str) -> bytes:
    """A CA bundle holding at least one usable certificate."""
    data = read_pem(ca_file, setting)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
    except ssl.SSLError as err:
        raise TlsError(f"{setting}: {ca_file} holds no usable CA certificate ({err.reason or err})") from None
    return data
