"""How the CLI's client commands reach the daemon, and what they say when they cannot.

Owns `--target` (a host without a port means the daemon's default port, never gRPC's 443),
the client TLS flags, one-line error output for failed calls, and the diagnosis of a call
that never reached the daemon: nothing listening, or one side speaking TLS and the other
not (gRPC itself reports only "Socket closed" or a connect timeout for that).
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from broker.config import DEFAULT_LISTEN, ConfigError, parse_listen

DEFAULT_PORT = parse_listen(DEFAULT_LISTEN)[1]
# A probe that takes longer than this says "no answer" rather than hold the error line back.
PROBE_SECONDS = 2.0
# Target schemes gRPC resolves itself, passed through untouched (dns: is normalised below).
_PASSTHROUGH = ("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:", "xds:")
_DNS = re.compile(r"^dns:(//[^/]*/)?")
# OpenSSL's reasons for "the answer to a ClientHello was not a TLS record": a plaintext peer.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


def split_host_port(value: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address -> (host, port or None).
    A trailing ':' gives an empty port (not None), so the caller can say it is missing."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: an IPv6 address goes in brackets, e.g. [::1]:{DEFAULT_PORT}")
        return host, rest[1:] if rest else None
    if value.count(":") > 1:  # a bare IPv6 address: no port can be told apart
        return value, None
    host, sep, port = value.partition(":")
    return host, port if sep else None


def normalize_target(value: str) -> str:
    """A `--target` as gRPC should dial it: HOST[:PORT], the port defaulting to the daemon's."""
    v = value.strip()
    if not v:
        raise ValueError(f"empty: give HOST[:PORT], e.g. 127.0.0.1:{DEFAULT_PORT}")
    if v.startswith(_PASSTHROUGH):
        return v
    prefix = ""
    if m := _DNS.match(v):
        prefix, v = m.group(0), v[m.end() :]
    host, port = split_host_port(v)
    if not host:
        raise ValueError(f"{value!r} has no host: give e.g. 127.0.0.1{':' + port if port else ''}")
    if port == "":
        raise ValueError(
            f"{value!r}: missing the port after ':' (give {host}:PORT, or {host} alone for {DEFAULT_PORT})"
        )
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535, got {port!r}")
    shown = f"[{host}]" if ":" in host else host
    return f"{prefix}{shown}:{port or DEFAULT_PORT}"


def target_arg(value: str) -> str:
    """argparse `type=` for --target (MODEL_BROKER_TARGET goes through it too, as the default)."""
    try:
        return normalize_target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_problem(value: str) -> str | None:
    """Why `serve --listen VALUE` cannot be bound, in words an operator can act on, or None."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return f"{value!r} has no port: give HOST:PORT, e.g. {value or '127.0.0.1'}:{DEFAULT_PORT} (port 0 picks a free one)"
    problems = []
    if not host.strip("[]"):
        problems.append(
            "no host before the ':' (127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
        )
    if not port:
        problems.append(f"no port after the ':' (e.g. {host}:{DEFAULT_PORT})")
    elif not port.isdigit() or int(port) > 65535:
        problems.append(f"the port must be a number from 0 to 65535, got {port!r}")
    return f"{value!r}: " + "; ".join(problems) if problems else None


def listen_arg(value: str) -> str:
    problem = listen_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def add_target_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--target",
        type=target_arg,
        default=default,
        help=f"the daemon's HOST[:PORT]; without a port, {DEFAULT_PORT} (default: %(default)s, "
        "from $MODEL_BROKER_TARGET when set)",
    )


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """Client-side TLS flags; any file flag or a server name implies --tls."""
    from os import environ

    env = environ.get
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-cert)")
    p.add_argument(
        "--ca-cert", type=Path, default=env("MODEL_BROKER_CA_CERT"), help="PEM CA that signed the server"
    )
    p.add_argument(
        "--client-cert", type=Path, default=env("MODEL_BROKER_CLIENT_CERT"), help="PEM certificate for mTLS"
    )
    p.add_argument("--client-key", type=Path, default=env("MODEL_BROKER_CLIENT_KEY"), help="its PEM key")
    p.add_argument(
        "--tls-server-name", help="verify the server certificate for this name, not the target's host"
    )


def tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """BrokerClient's `credentials` and `options` from the TLS flags (plaintext when none is
    given); a bad file exits with its flag named."""
    from broker.tls import client_security

    try:
        creds, options = client_security(
            tls=args.tls,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.tls_server_name,
        )
    except ConfigError as exc:
        raise SystemExit("model-broker: " + "; ".join(exc.problems)) from None
    return {"credentials": creds, "options": options}


def uses_tls(args: argparse.Namespace) -> bool:
    return bool(
        getattr(args, "tls", False)
        or getattr(args, "ca_cert", None)
        or getattr(args, "client_cert", None)
        or getattr(args, "client_key", None)
        or getattr(args, "tls_server_name", None)
    )


def _address(target: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or dns: target; None for targets gRPC resolves otherwise."""
    if target.startswith(_PASSTHROUGH):
        return None
    m = _DNS.match(target)
    host, port = split_host_port(target[m.end() :] if m else target)
    return (host, int(port)) if port and port.isdigit() else None


def _speaks_tls(sock: socket.socket, host: str) -> bool | None:
    """Whether the peer answers a TLS ClientHello as a TLS server does: True (the handshake
    completed, or it sent a TLS alert, e.g. for a missing client certificate), False (it
    answered with bytes that are not TLS), None (it hung up or stayed silent). No
    verification: this only asks the question."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=None if _is_ip(host) else host):
            return True
    except ssl.SSLEOFError:
        return None
    except ssl.SSLError as exc:
        return exc.reason not in _NOT_TLS
    except OSError:
        return None


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def diagnose(target: str, tls: bool) -> str | None:
    """Why nothing reached the daemon at `target`, when a probe can tell; else None."""
    addr = _address(target)
    if addr is None:
        return None
    host, port = addr
    try:
        sock = socket.create_connection((host, port), timeout=PROBE_SECONDS)
    except ConnectionRefusedError:
        return (
            f"nothing is listening on {target} (connection refused): start the daemon "
            "(`model-broker serve`) or point --target / MODEL_BROKER_TARGET at it"
        )
    except TimeoutError:
        return f"no answer from {target} within {PROBE_SECONDS:g}s (a firewall, or the wrong host?)"
    except OSError as exc:
        return f"cannot reach {target}: {exc.strerror or exc}"
    with sock:
        sock.settimeout(PROBE_SECONDS)
        speaks_tls = _speaks_tls(sock, host)
    if speaks_tls is True and not tls:
        return (
            f"{target} speaks TLS and this client sent plaintext: add --tls "
            "(with --ca-cert FILE for a private CA, --client-cert/--client-key for mTLS)"
        )
    if speaks_tls is False and tls:
        return f"{target} does not speak TLS (a plaintext port?): drop --tls and the certificate flags"
    return None


def is_unreached(err: Any) -> bool:
    """A BrokerError that never reached the daemon: UNAVAILABLE from gRPC itself (the
    daemon's own UNAVAILABLE answers carry an ErrorInfo reason)."""
    import grpc

    return bool(err.code == grpc.StatusCode.UNAVAILABLE and not err.reason)


def fail(err: Exception, args: argparse.Namespace | None = None) -> int:
    """Print a failed call as `error: CODE: message [REASON]` (field violations and a retry
    delay indented below) and return exit code 1. A call that never reached the daemon is
    explained by `diagnose` when the target can be probed."""
    from modelbroker.client import BrokerError

    if not isinstance(err, BrokerError):
        raise err
    if args is not None and is_unreached(err):
        why = diagnose(args.target, uses_tls(args))
        if why:
            print(f"error: UNAVAILABLE: {why}", file=sys.stderr)
            return 1
    reason = f" [{err.reason}]" if err.reason else ""
    print(f"error: {err.code.name}: {err.message}{reason}", file=sys.stderr)
    for fld, desc in err.field_violations:
        print(f"  {fld}: {desc}", file=sys.stderr)
    if err.retry_delay is not None:
        print(f"  retry after {err.retry_delay:g}s", file=sys.stderr)
    return 1
