"""``pop3proxy check``: the pre-flight test of the upstream POP3S server.

It connects the way the proxy does and reports what an admin needs before go-live and when
something breaks: TCP reachability and time; the TLS version and cipher; the certificate
chain exactly as the server sent it (pyOpenSSL: the standard library on Python 3.11 only
shows the leaf); whether that chain verifies against the configured trust, and if not why
(naming the missing issuer for an unknown CA); whether the host name matches; the SHA-256
SPKI pin of the leaf; certificates that expire within 30 days; the ``+OK`` greeting (and
its APOP timestamp); ``CAPA``; and optionally a login with a password read from a file or
standard input (never from the command line, never printed).

Two connections are made. The first (pyOpenSSL, no verification, nothing sent but the
handshake) only reads the chain, so it can be shown even when it does not verify. The
second is the proxy's own :func:`pop3proxy.tls.open_upstream` with the proxy's context, so
its verdict is the proxy's verdict; POP3 is spoken over it only if it verified.

Exit status: 0 when every check passed (warnings allowed), 1 when one failed, 2 for a
usage error.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID
from OpenSSL import SSL

from pop3proxy.terminal import printable
from pop3proxy.tls import (
    UpstreamError,
    looks_like_tls,
    make_upstream_context,
    not_tls_message,
    open_upstream,
)

if TYPE_CHECKING:
    from pop3proxy.config import Settings

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertInfo",
    "CheckReport",
    "Finding",
    "cert_info",
    "main",
    "missing_issuer",
    "name_matches",
    "read_password",
    "run_check",
    "spki_pin",
]

EXPIRY_WARNING_DAYS: Final = 30
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
MAX_LINE: Final = 8192
MAX_CAPA_LINES: Final = 200
_HANDSHAKE_ROUNDS: Final = 50
_APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+@[^<>\s]+>")

Status = Literal["ok", "warn", "fail", "skip"]


class UsageError(Exception):
    """Bad options; the message is one line."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the verdict."""

    check: str
    status: Status
    message: str


@dataclass(frozen=True, slots=True)
class CertInfo:
    """One certificate of the chain, for the report."""

    subject: str
    issuer: str
    not_before: str
    not_after: str
    days_left: int
    sha256: str
    self_signed: bool
    names: tuple[str, ...]


@dataclass(slots=True)
class CheckReport:
    """Everything ``check`` found; :meth:`text` and :meth:`as_json` render it."""

    upstream: str
    server_name: str
    trust: str
    findings: list[Finding] = field(default_factory=list)
    tcp_ms: float | None = None
    tls_version: str | None = None
    cipher: str | None = None
    chain: list[CertInfo] = field(default_factory=list)
    spki_sha256: str | None = None
    greeting: str | None = None
    apop_timestamp: bool | None = None
    capabilities: list[str] | None = None
    login: dict[str, Any] | None = None

    def add(self, check: str, status: Status, message: str) -> None:
        self.findings.append(Finding(check, status, message))

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.status == "warn" for f in self.findings)

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = not self.failed
        data["warnings"] = self.warnings
        data["spki_pin"] = (
            f'pin-sha256="{_b64_of_hex(self.spki_sha256)}"' if self.spki_sha256 else None
        )
        return data

    def text(self) -> str:
        lines = [
            f"pop3proxy check: {self.upstream} (server name {self.server_name}, "
            f"trust: {self.trust})",
            "",
        ]
        lines += [f"  {f.status:<5} {f.check:<9} {f.message}" for f in self.findings]
        if self.chain:
            lines += ["", "Certificate chain as sent by the server:"]
            for index, cert in enumerate(self.chain):
                lines += [
                    f"  [{index}] subject: {cert.subject}",
                    f"      issuer:  {cert.issuer}",
                    f"      valid:   {cert.not_before} to {cert.not_after} "
                    f"({cert.days_left} days left)",
                    f"      sha256:  {cert.sha256}",
                ]
                if cert.names:
                    lines.append(f"      names:   {', '.join(cert.names)}")
        if self.spki_sha256:
            lines += [
                "",
                f'SPKI pin of the leaf: pin-sha256="{_b64_of_hex(self.spki_sha256)}"',
                f"                      sha256 hex {self.spki_sha256}",
            ]
        if self.capabilities is not None:
            lines += ["", "CAPA:", *(f"  {c}" for c in self.capabilities)]
        failures = sum(f.status == "fail" for f in self.findings)
        warn = f", {self.warnings} warning(s)" if self.warnings else ""
        verdict = f"FAILED: {failures} check(s) failed{warn}" if failures else f"OK{warn}"
        lines += ["", f"Result: {verdict}"]
        # The greeting, CAPA lines, replies, certificate names and error messages come from
        # the server (or whoever answers in its place): no raw control characters.
        return "\n".join(printable(line) for line in lines) + "\n"


def _b64_of_hex(digest: str) -> str:
    return base64.b64encode(bytes.fromhex(digest)).decode()


# --------------------------------------------------------------------------------------------
# Certificates.
# --------------------------------------------------------------------------------------------


def spki_pin(cert: x509.Certificate) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, in hex (RFC 7469 pins use its base64)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return ()
    assert isinstance(san, x509.SubjectAlternativeName)
    dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def cert_info(cert: x509.Certificate, now: dt.datetime) -> CertInfo:
    not_after = cert.not_valid_after_utc
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=not_after.isoformat(),
        days_left=(not_after - now).days,
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
        self_signed=cert.issuer == cert.subject,
        names=_names(cert),
    )


def missing_issuer(chain: Sequence[x509.Certificate]) -> tuple[str, bool]:
    """Who must be trusted for ``chain`` to verify: ``(name, is_root)``.

    Follows the chain from the leaf through the certificates the server sent. If it ends
    at a certificate whose issuer was not sent, that issuer is missing (``is_root`` False);
    if it ends at a self-signed certificate, that root itself is the untrusted one.
    """
    by_subject = {cert.subject: cert for cert in chain}
    current = chain[0]
    for _ in range(len(chain) + 1):
        if current.issuer == current.subject:
            return current.subject.rfc4514_string(), True
        parent = by_subject.get(current.issuer)
        if parent is None or parent is current:
            return current.issuer.rfc4514_string(), False
        current = parent
    return current.issuer.rfc4514_string(), False


def name_matches(server_name: str, names: Sequence[str]) -> bool:
    """RFC 6125 matching of ``server_name`` against SAN entries (wildcard: one left label)."""
    try:
        wanted_ip = ipaddress.ip_address(server_name)
    except ValueError:
        wanted_ip = None
    host = server_name.rstrip(".").lower()
    for name in names:
        if wanted_ip is not None:
            try:
                if ipaddress.ip_address(name) == wanted_ip:
                    return True
            except ValueError:
                continue
            continue
        pattern = name.rstrip(".").lower()
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host:
            label, _, rest = host.partition(".")
            if label and rest == pattern[2:]:
                return True
    return False


# --------------------------------------------------------------------------------------------
# The two connections.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Probe:
    tcp_ms: float
    chain: list[x509.Certificate]
    version: str | None
    cipher: str | None


class _ProbeError(Exception):
    def __init__(self, phase: str, message: str, tcp_ms: float | None = None) -> None:
        super().__init__(phase, message)
        self.phase = phase
        self.message = message
        self.tcp_ms = tcp_ms


def _probe_chain(settings: Settings) -> _Probe:
    """Handshake with pyOpenSSL without verification, only to read the presented chain."""
    assert settings.upstream is not None
    server_name = settings.tls_server_name
    started = time.monotonic()
    try:
        sock = socket.create_connection(
            (settings.upstream.host, settings.upstream.port), timeout=settings.connect_timeout
        )
    except OSError as exc:
        raise _ProbeError("tcp", _os_error(exc)) from None
    tcp_ms = (time.monotonic() - started) * 1000
    with sock:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(
            SSL.TLS1_3_VERSION if settings.tls_min_version == "1.3" else SSL.TLS1_2_VERSION
        )
        context.set_verify(SSL.VERIFY_NONE)  # look only: the verdict is the second connection's
        connection = SSL.Connection(context, None)
        try:
            ipaddress.ip_address(server_name)
        except ValueError:
            connection.set_tlsext_host_name(server_name.encode("idna"))
        connection.set_connect_state()
        sock.settimeout(settings.handshake_timeout)
        received = bytearray()
        try:
            _drive_handshake(sock, connection, received)
        except (SSL.Error, OSError) as exc:
            if not looks_like_tls(bytes(received)):  # plaintext, whatever OpenSSL calls it
                message = not_tls_message(str(settings.upstream), bytes(received))
                raise _ProbeError("tls", message, tcp_ms) from None
            raise _ProbeError("tls", _ssl_error(exc), tcp_ms) from None
        chain = connection.get_peer_cert_chain(as_cryptography=True) or []
        return _Probe(
            tcp_ms=tcp_ms,
            chain=list(chain),
            version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name(),
        )


def _drive_handshake(sock: socket.socket, connection: SSL.Connection, received: bytearray) -> None:
    """Run the handshake; ``received`` gets the start of what the server sent."""
    for _ in range(_HANDSHAKE_ROUNDS):
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            _flush(sock, connection)
            data = sock.recv(65536)
            if not data:
                raise OSError("the server closed the connection during the handshake") from None
            if not received:
                received += data[:64]
            connection.bio_write(data)
        else:
            _flush(sock, connection)
            return
    raise OSError("the handshake did not finish")


def _flush(sock: socket.socket, connection: SSL.Connection) -> None:
    while True:
        try:
            data = connection.bio_read(65536)
        except SSL.WantReadError:
            return
        if not data:
            return
        sock.sendall(data)


def _os_error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def _ssl_error(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(item[-1]) for item in exc.args[0] if item]
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, OSError):
        return _os_error(exc)
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# POP3 over the verified connection.
# --------------------------------------------------------------------------------------------


class _Lines:
    """CRLF lines from a trio stream, each within a deadline."""

    def __init__(self, stream: trio.abc.Stream, timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout
        self.buffer = bytearray()

    async def line(self) -> bytes:
        with trio.fail_after(self.timeout):
            while b"\n" not in self.buffer:
                if len(self.buffer) > MAX_LINE:
                    raise ValueError("reply line too long")
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.buffer += data
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.rstrip(b"\r")

    async def command(self, text: bytes) -> bytes:
        await self.stream.send_all(text + b"\r\n")
        return await self.line()


def _show_line(line: bytes) -> str:
    return line.decode("utf-8", "replace")[:200]


async def _pop3(
    report: CheckReport,
    stream: trio.abc.Stream,
    reply_timeout: float,
    user: str | None,
    password: str | None,
) -> None:
    lines = _Lines(stream, reply_timeout)
    greeting = await lines.line()
    report.greeting = _show_line(greeting)
    report.apop_timestamp = _APOP_TIMESTAMP.search(greeting) is not None
    if not greeting.startswith(b"+OK"):
        report.add("greeting", "fail", f"not +OK: {report.greeting}")
        return
    apop = "with an APOP timestamp" if report.apop_timestamp else "no APOP timestamp"
    report.add("greeting", "ok", f"{report.greeting} ({apop})")
    reply = await lines.command(b"CAPA")
    if reply.startswith(b"+OK"):
        capabilities = []
        for _ in range(MAX_CAPA_LINES):
            line = await lines.line()
            if line == b".":
                break
            capabilities.append(_show_line(line[1:] if line.startswith(b"..") else line))
        report.capabilities = capabilities
        report.add("capa", "ok", " ".join(c.split(" ")[0] for c in capabilities))
    else:
        report.add("capa", "warn", f"CAPA not supported: {_show_line(reply)}")
    if user is not None and password is not None:
        await _login(report, lines, user, password)
    else:
        report.add("login", "skip", "no --user given")
    with contextlib.suppress(EOFError, trio.BrokenResourceError, trio.TooSlowError):
        await lines.command(b"QUIT")


async def _login(report: CheckReport, lines: _Lines, user: str, password: str) -> None:
    if any(c in user for c in "\r\n\0") or any(c in password for c in "\r\n\0"):
        report.add("login", "fail", "the user name or password holds a line break or NUL")
        return
    started = time.monotonic()
    reply = await lines.command(b"USER " + user.encode())
    if reply.startswith(b"+OK"):
        reply = await lines.command(b"PASS " + password.encode())
    elapsed = round((time.monotonic() - started) * 1000, 1)
    ok = reply.startswith(b"+OK")
    # The server's reply never contains the password (it never saw it echoed back).
    text = _show_line(reply).replace(password, "***") if password else _show_line(reply)
    report.login = {"user": user, "mechanism": "USER", "ok": ok, "reply": text, "ms": elapsed}
    if ok:
        report.add("login", "ok", f"{user} logged in with USER/PASS in {elapsed} ms")
    else:
        report.add("login", "fail", f"{user} was refused: {text}")


# --------------------------------------------------------------------------------------------
# The check as a whole.
# --------------------------------------------------------------------------------------------


async def _run(settings: Settings, user: str | None, password: str | None) -> CheckReport:
    assert settings.upstream is not None
    host, port = settings.upstream.host, settings.upstream.port
    server_name = settings.tls_server_name
    trust = str(settings.upstream_ca_file) if settings.upstream_ca_file else "the system store"
    report = CheckReport(str(settings.upstream), server_name, trust)
    now = dt.datetime.now(dt.UTC)

    try:
        probe = await trio.to_thread.run_sync(_probe_chain, settings)
    except _ProbeError as exc:
        if exc.phase == "tcp":
            report.add("tcp", "fail", f"cannot connect to {settings.upstream}: {exc.message}")
            return report
        report.tcp_ms = round(exc.tcp_ms or 0.0, 1)
        report.add("tcp", "ok", f"connected to {settings.upstream} in {report.tcp_ms} ms")
        report.add("tls", "fail", f"TLS handshake failed: {exc.message}")
        return report
    report.tcp_ms = round(probe.tcp_ms, 1)
    report.add("tcp", "ok", f"connected to {settings.upstream} in {report.tcp_ms} ms")
    report.tls_version, report.cipher = probe.version, probe.cipher
    report.chain = [cert_info(cert, now) for cert in probe.chain]
    if probe.chain:
        report.spki_sha256 = spki_pin(probe.chain[0])

    context = make_upstream_context(settings.upstream_ca_file, settings.tls_min_version)
    try:
        stream = await open_upstream(
            host,
            port,
            server_name=server_name,
            context=context,
            connect_timeout=settings.connect_timeout,
            handshake_timeout=settings.handshake_timeout,
        )
    except UpstreamError as exc:
        _report_tls_failure(report, exc, probe.chain, server_name)
        _report_expiry(report)
        report.add("pop3", "skip", "not checked: the TLS connection was not verified")
        return report
    report.tls_version = stream.version() or report.tls_version
    cipher = stream.cipher()
    report.cipher = cipher[0] if cipher else report.cipher
    report.add("tls", "ok", f"{report.tls_version}, {report.cipher}")
    report.add("chain", "ok", f"verifies against {trust}")
    report.add("hostname", "ok", f"{server_name} matches the certificate")
    _report_expiry(report)
    try:
        async with stream:
            await _pop3(report, stream, settings.handshake_timeout, user, password)
    except (EOFError, ValueError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        message = "no reply in time" if isinstance(exc, trio.TooSlowError) else str(exc)
        report.add("pop3", "fail", message or type(exc).__name__)
    return report


def _report_tls_failure(
    report: CheckReport, exc: UpstreamError, chain: Sequence[x509.Certificate], server_name: str
) -> None:
    names = _names(chain[0]) if chain else ()
    if exc.reason in {"unknown_ca", "hostname_mismatch", "expired"}:
        report.add("tls", "ok", f"{report.tls_version}, {report.cipher}")
    else:
        report.add("tls", "fail", f"{exc.reason}: {exc.message}")
        return
    if exc.reason == "unknown_ca" and chain:
        name, is_root = missing_issuer(chain)
        if is_root:
            why = f"the root {name} that the server sent is not trusted"
        else:
            why = f"missing issuer {name}: not in {report.trust} and not sent by the server"
        report.add("chain", "fail", f"does not verify ({exc.message}); {why}")
    elif exc.reason in {"expired", "unknown_ca"}:
        report.add("chain", "fail", f"does not verify: {exc.message}")
    if exc.reason == "hostname_mismatch":
        report.add("chain", "ok", f"verifies against {report.trust}")
        report.add(
            "hostname",
            "fail",
            f"{server_name} does not match the certificate (names: {', '.join(names) or 'none'})",
        )
    elif names and name_matches(server_name, names):
        report.add("hostname", "ok", f"{server_name} matches the certificate's names")
    else:
        report.add(
            "hostname",
            "fail",
            f"{server_name} does not match the certificate (names: {', '.join(names) or 'none'})",
        )


def _report_expiry(report: CheckReport) -> None:
    now = dt.datetime.now(dt.UTC)
    problems = False
    for cert in report.chain:
        not_before = dt.datetime.fromisoformat(cert.not_before)
        if not_before > now:
            report.add("expiry", "fail", f"{cert.subject} is not valid before {cert.not_before}")
            problems = True
        elif cert.days_left < 0:
            report.add("expiry", "fail", f"{cert.subject} expired on {cert.not_after}")
            problems = True
        elif cert.days_left < EXPIRY_WARNING_DAYS:
            report.add(
                "expiry",
                "warn",
                f"{cert.subject} expires in {cert.days_left} days ({cert.not_after})",
            )
            problems = True
    if report.chain and not problems:
        soonest = min(cert.days_left for cert in report.chain)
        report.add("expiry", "ok", f"every certificate valid for {soonest} days or more")


def run_check(
    settings: Settings, *, user: str | None = None, password: str | None = None
) -> CheckReport:
    """Run every check against ``settings.upstream`` (blocking; starts its own trio run)."""
    if settings.upstream is None:
        raise UsageError("--upstream is required")
    return trio.run(_run, settings, user, password)


def read_password(source: str, stdin: TextIO | None = None) -> str:
    """The password from file ``source``, or standard input for ``-``; one line ending removed.

    Errors never quote ``source``: a password typed where its file name belongs must not be
    echoed (any readable file will do, e.g. ``<(pass show mail)``, a pipe).
    """
    if source == "-":
        text = (stdin or sys.stdin).readline()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except ValueError as exc:  # a NUL in the name, or not UTF-8 (UnicodeDecodeError)
            problem = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not a file name"
            raise UsageError(f"pop3proxy check: --password-file: {problem}") from None
        except OSError as exc:
            why = exc.strerror or type(exc).__name__  # str(exc) would quote the name
            raise UsageError(f"pop3proxy check: --password-file: cannot read it: {why}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("pop3proxy check: the password is empty")
    return password


def main(settings: Settings, options: Mapping[str, Any]) -> int:
    """The ``check`` command: prints the report (text or JSON); returns the exit status."""
    user = options.get("user")
    password_file = options.get("password_file")
    if (user is None) != (password_file is None):
        print("pop3proxy check: --user and --password-file go together", file=sys.stderr)
        return EXIT_USAGE
    try:
        password = read_password(password_file) if password_file is not None else None
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    report = run_check(settings, user=user, password=password)
    if options.get("json"):
        print(json.dumps(report.as_json(), indent=2))
    else:
        sys.stdout.write(report.text())
    return EXIT_FAILED if report.failed else EXIT_OK
