"""TLS and mTLS: server credentials for the gRPC port, channel credentials for the CLI clients.

Certificates are PEM files read once at start (a rotated certificate is picked up on
restart, as Kubernetes rolls pods when a Secret changes). With `tls.client_ca_file` the
server requires a client certificate signed by that CA, so a caller without one fails the
handshake before any RPC runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from broker.config import ConfigError, TLSConfig

# gRPC's channel argument for "verify the server's certificate against this name instead of
# the target's host" (connect by IP, or through a tunnel, to a cert issued for a DNS name).
SERVER_NAME_OPTION = "grpc.ssl_target_name_override"


def read_pem(path: Path, where: str) -> bytes:
    """The file's bytes, or a ConfigError naming the setting (`tls.cert_file`, `--ca-cert`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc.strerror}"]) from None
    if b"-----BEGIN " not in data:
        raise ConfigError([f"{where}: {path} is not a PEM file (no -----BEGIN line)"])
    return data


def server_credentials(cfg: TLSConfig) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; requires client certificates when a client CA is set."""
    if cfg.cert_file is None or cfg.key_file is None:
        raise ConfigError(["tls: cert_file and key_file are required for TLS"])
    cert = read_pem(cfg.cert_file, "tls.cert_file")
    key = read_pem(cfg.key_file, "tls.key_file")
    client_ca = read_pem(cfg.client_ca_file, "tls.client_ca_file") if cfg.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    *,
    ca_cert: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> grpc.ChannelCredentials:
    """Client-side TLS: the system roots unless `ca_cert`; a certificate pair for mTLS."""
    if (client_cert is None) != (client_key is None):
        raise ConfigError(["--client-cert and --client-key go together: give both or neither"])
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_cert, "--ca-cert") if ca_cert else None,
        private_key=read_pem(client_key, "--client-key") if client_key else None,
        certificate_chain=read_pem(client_cert, "--client-cert") if client_cert else None,
    )


def channel_options(server_name: str | None) -> list[tuple[str, Any]]:
    return [(SERVER_NAME_OPTION, server_name)] if server_name else []


def client_security(
    *,
    tls: bool = False,
    ca_cert: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    server_name: str | None = None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """What the CLI's --tls/--ca-cert/--client-cert/--client-key/--tls-server-name ask for.

    Any of the file flags or a server name implies TLS, so `--ca-cert ca.pem` alone works.
    Returns (None, []) for a plaintext channel.
    """
    if not (tls or ca_cert or client_cert or client_key or server_name):
        return None, []
    creds = channel_credentials(ca_cert=ca_cert, client_cert=client_cert, client_key=client_key)
    return creds, channel_options(server_name)
