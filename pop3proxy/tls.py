"""TLS to the upstream POP3S server (RFC 8314 implicit TLS): context, connect, describe, classify.

Verification is always on: the chain is checked against the system store or the configured
CA file, and the host name against ``tls_server_name``, which is always passed to
:class:`~pop3proxy.streams.TLSStream` (without it, ``wrap_bio`` silently skips the host name
check).
TLS 1.2 is the floor (RFC 8314 section 4.1, RFC 8996). ``SSLKEYLOGFILE`` is ignored: a stray
environment variable must never write the session keys of mailbox passwords to disk.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import ssl
from pathlib import Path

import trio
from cryptography import x509

from pop3proxy.addresses import bracket_host
from pop3proxy.streams import SocketStream, TLSStream

__all__ = [
    "UpstreamError",
    "describe_peer",
    "looks_like_tls",
    "make_upstream_context",
    "not_tls_message",
    "open_upstream",
]

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

#: OpenSSL X509_V_ERR_* codes (x509_vfy.h) grouped into the reasons pop3proxy reports.
_VERIFY_REASONS = {
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    9: "expired",  # CERT_NOT_YET_VALID: outside its validity period all the same
    10: "expired",  # CERT_HAS_EXPIRED
    62: "hostname_mismatch",  # HOSTNAME_MISMATCH
    64: "hostname_mismatch",  # IP_ADDRESS_MISMATCH
}
#: OpenSSL reason strings that mean "no TLS version in common".
_VERSION_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "WRONG_SSL_VERSION",
        "WRONG_VERSION_NUMBER",
    }
)


#: A TLS record starts with its content type (RFC 8446 section 5.1: change_cipher_spec 20,
#: alert 21, handshake 22, application_data 23; RFC 6520: heartbeat 24) and the major
#: version 3 of its legacy_record_version. OpenSSL calls anything else a "wrong version
#: number" (or, since 3.2, a "record layer failure"), which is what a plaintext port answers.
_TLS_CONTENT_TYPES = range(20, 25)
_TLS_MAJOR_VERSION = 3
#: Octets of the server's first read kept for that diagnosis (and shown, if text).
_FIRST_OCTETS = 64
#: errno values of a connect that failed for want of something here, whatever the server:
#: file descriptors (this process: EMFILE, the system: ENFILE) or kernel memory. A socket()
#: that fails so fails for every address, and says nothing about the upstream.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class UpstreamError(Exception):
    """Connecting to the upstream failed; safe to log.

    Attributes:
        phase: ``"connect"`` or ``"handshake"``.
        reason: a stable class for logs and metrics: ``refused``, ``unreachable``, ``timeout``,
            ``dns``, ``local_resources`` (the proxy is out of file descriptors, memory or
            local ports), ``unknown_ca``, ``hostname_mismatch``, ``expired``, ``tls_version``,
            ``not_tls`` (the port answered in plaintext), ``tls_error``, ``closed``.
        message: the verifier's or the system's own words.
    """

    def __init__(self, phase: str, reason: str, message: str) -> None:
        super().__init__(phase, reason, message)
        self.phase = phase
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.phase} failed ({self.reason}): {self.message}"


def make_upstream_context(ca_file: Path | None, min_version: str = "1.2") -> ssl.SSLContext:
    """Build the client context once at start-up; it is shared by all sessions.

    With ``ca_file`` the system store is replaced by that CA: a private CA is the usual
    reason to set it, and trusting both would widen who may impersonate the server.
    """
    # Not ssl.create_default_context(): it opens $SSLKEYLOGFILE as soon as it is set.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cafile=str(ca_file))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = _TLS_VERSIONS[min_version]
    # A peer that drops TCP without close_notify must show up as such (truncation).
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    # No TLS 1.2 renegotiation (TLS 1.3 has none): a POP3 server has no use for it, it has
    # been an attack surface (CVE-2009-3555), and without it a write never waits for a read.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


async def open_upstream(
    host: str,
    port: int,
    *,
    server_name: str,
    context: ssl.SSLContext,
    connect_timeout: float,
    handshake_timeout: float,
) -> TLSStream:
    """Connect and complete the TLS handshake, each under its own deadline.

    Raises:
        UpstreamError: classified; the half-open connection is already closed.
    """
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise UpstreamError(
            "connect", "timeout", f"no connection within {connect_timeout:g}s"
        ) from None
    except OSError as exc:
        raise UpstreamError("connect", _connect_reason(exc), _os_message(exc)) from None
    transport = _FirstOctetsStream(socket.socket(fileno=tcp.socket.detach()))
    tls = TLSStream(transport, context, server_hostname=server_name)
    try:
        with trio.fail_after(handshake_timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise UpstreamError(
            "handshake", "timeout", f"no TLS handshake within {handshake_timeout:g}s"
        ) from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        server = f"{bracket_host(host)}:{port}"
        reason, message = _handshake_reason(exc.__cause__, transport.first, server)
        raise UpstreamError("handshake", reason, message) from None
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    tls.transport = SocketStream(transport.socket)  # the relay's reads skip the recording
    return tls


class _FirstOctetsStream(SocketStream):
    """The handshake's transport: keeps the start of the server's first read for diagnosis."""

    __slots__ = ("first",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.first = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await super().receive_some(max_bytes)
        if not self.first:
            self.first = data[:_FIRST_OCTETS]
        return data


def looks_like_tls(first: bytes) -> bool:
    """Whether a server's first octets can start a TLS record (content type, major version)."""
    if not first:
        return True  # nothing seen: no evidence against
    if first[0] not in _TLS_CONTENT_TYPES:
        return False
    return len(first) < 2 or first[1] == _TLS_MAJOR_VERSION


def not_tls_message(server: str, first: bytes) -> str:
    """Say that ``server`` answered TLS with something else, quoting it if it is text."""
    line = first.split(b"\n", 1)[0].rstrip(b"\r")
    text = line.decode("ascii", "replace")
    if line and text.isprintable():
        return (
            f"the server at {server} does not speak TLS: it sent {text!r} in plaintext "
            "(probably a POP3 port without implicit TLS, e.g. 110 instead of 995)"
        )
    octets = first[:8].hex(" ")
    return f"the server at {server} does not speak TLS: its first octets ({octets}) are not TLS"


def _connect_reason(exc: OSError) -> str:
    """The class of a failed connect; the proxy's own shortage is never the server's fault."""
    if isinstance(exc, socket.gaierror):
        return "dns"
    causes: list[BaseException] = [exc]
    # trio.open_tcp_stream wraps per-address failures in an OSError whose cause is a group.
    if isinstance(exc.__cause__, BaseExceptionGroup):
        causes = list(exc.__cause__.exceptions)
    codes = {getattr(c, "errno", None) for c in causes}
    if codes & _OUT_OF_RESOURCES:
        return "local_resources"
    if errno.ECONNREFUSED in codes:
        return "refused"
    if codes & {errno.ETIMEDOUT}:
        return "timeout"
    if codes == {errno.EADDRNOTAVAIL}:  # every attempt: no local port (or address) to use
        return "local_resources"
    return "unreachable"


def _os_message(exc: OSError) -> str:
    if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        return str(exc.__cause__.exceptions[0])
    return exc.strerror or str(exc)


def _handshake_reason(
    cause: BaseException | None, first: bytes = b"", server: str = "the upstream"
) -> tuple[str, str]:
    """The reason class and message of a failed handshake.

    ``first`` is the start of what the server sent: if it cannot be TLS, the port speaks
    something else (usually plaintext POP3), whatever words OpenSSL found for it.
    """
    if not looks_like_tls(first):
        return "not_tls", not_tls_message(server, first)
    return _tls_failure_reason(cause)


def _tls_failure_reason(cause: BaseException | None) -> tuple[str, str]:
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(cause.verify_code, "tls_error")
        return reason, cause.verify_message or str(cause)
    if isinstance(cause, ssl.SSLEOFError) or cause is None:
        return "closed", "the server closed the connection during the TLS handshake"
    if isinstance(cause, ssl.SSLError):
        if cause.reason in _VERSION_REASONS:
            return "tls_version", f"no common TLS version ({cause.reason})"
        return "tls_error", cause.reason or str(cause)
    if isinstance(cause, OSError):
        return "closed", cause.strerror or str(cause)
    return "tls_error", type(cause).__name__


def describe_peer(stream: TLSStream) -> dict[str, str | None]:
    """What to log about an established upstream: version, cipher and the leaf certificate."""
    der = stream.getpeercert(binary_form=True)
    cipher = stream.cipher()
    info: dict[str, str | None] = {
        "tls_version": stream.version(),
        "cipher": cipher[0] if cipher else None,
        "peer_subject": None,
        "peer_sha256": None,
        "peer_not_after": None,
    }
    if der:
        cert = x509.load_der_x509_certificate(der)
        info["peer_subject"] = cert.subject.rfc4514_string()
        info["peer_sha256"] = hashlib.sha256(der).hexdigest()
        info["peer_not_after"] = cert.not_valid_after_utc.isoformat()
    return info
